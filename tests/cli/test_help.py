"""Every command's `--help`, rendered as a user sees it: each default shown, no help text eaten by rich markup (a
"[default: X]" written into a help is a markup tag to rich), and every registered method, source and backbone
listed where the help lists them."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from rich.text import Text
from typer.core import TyperOption
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.cli.listing import fill

runner = CliRunner()


def _commands() -> list[tuple[list[str], Any]]:
    """(argv path, command) of every command and group under `kdcli`, the root included."""
    found: list[tuple[list[str], Any]] = []

    def walk(path: list[str], cmd: Any) -> None:
        found.append((path, cmd))
        for name, sub in getattr(cmd, "commands", {}).items():  # a group's commands
            walk([*path, name], sub)

    walk([], typer.main.get_command(app))
    return found


COMMANDS = _commands()


def _flat(text: str) -> str:
    """The help with the table borders gone and whitespace collapsed, so that a wrapped cell reads as one line."""
    return " ".join(text.replace("│", " ").split())


def _help(path: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at the terminal width: keep rows whole where it can
    r = runner.invoke(app, [*path, "--help"], terminal_width=250)
    assert r.exit_code == 0, r.output
    return _flat(r.output)


def _shown_default(p: Any) -> str | None:
    """What `[default: ...]` should say for `p`, or None where nothing is due (no default, or an off flag)."""
    show = getattr(p, "show_default", None)
    if isinstance(show, str):
        return f"({show})"
    if p.default is None or show is False:
        return None
    if isinstance(p, TyperOption) and p.is_flag:
        if not p.secondary_opts:
            return None if not p.default else "True"
        return (p.opts if p.default else p.secondary_opts)[0].lstrip("-")
    if isinstance(p.default, (list, tuple)):
        return ", ".join(map(str, p.default))
    return str(p.default)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "kdcli" for p, _ in COMMANDS])
def test_help_shows_every_default_and_eats_no_text(path: list[str], cmd: Any,
                                                   monkeypatch: pytest.MonkeyPatch):
    flat = _help(path, monkeypatch)
    assert "{methods}" not in flat and "{backbones}" not in flat, flat  # every listing was filled in
    assert not re.search(r"\w \.( |$)", flat), flat  # "Folder to write ." : a bracket eaten before the stop
    for p in cmd.params:
        text = fill(getattr(p, "help", None))  # what the command prints: its registry lists filled in
        if not text or getattr(p, "hidden", False):
            continue
        plain = Text.from_markup(text).plain
        # help texts of options are plain text: markup would be rich's reading of a "[...]" meant literally
        assert plain == text.replace("\\[", "["), f"{p.name}: rich read markup in {text!r}"
        default = _shown_default(p)
        if default is not None:
            assert f"{_flat(plain)} [default: {default}]" in flat, f"{' '.join(path)} {p.name}: default not shown"
        elif "[default:" in plain:
            assert _flat(plain) in flat, f"{' '.join(path)} {p.name}: documented default lost"


def test_every_registered_name_is_listed_where_the_help_lists_them(monkeypatch: pytest.MonkeyPatch):
    from kdcli.config.schema import method_names
    from kdcli.data.sources import discover
    from kdcli.models.backbones import BACKBONES

    methods, sources = method_names(), discover()
    assert {"mse", "pdf", "defeat"} <= set(methods) and {"yolo", "dota"} <= set(sources)
    distill = _help(["distill"], monkeypatch)
    listed = distill.split("one or more of:")[1].split(".")[0]
    assert [m.strip() for m in listed.split(",")] == methods and "none, or comma-separated" in distill
    benchmark = _help(["benchmark"], monkeypatch)
    assert all(f"{m}," in benchmark or f"{m};" in benchmark for m in methods)
    prepare = _help(["prepare"], monkeypatch)
    assert f"({', '.join(sources)})" in prepare and all(f" {name} " in prepare for name in sources)
    synthetic = _help(["prepare", "synthetic"], monkeypatch)
    generators = [n for n, s in sources.items() if s.synthetic]
    assert f"Raw format to write: {', '.join(generators)}." in synthetic
    assert f"model.backbone: {', '.join(BACKBONES)}." in _help(["info", "model"], monkeypatch)


def test_the_cli_imports_no_torch_to_list_registries():
    """The method and backbone lists import torch: only a help that shows them may pay for that."""
    import subprocess
    import sys

    code = "import sys, kdcli.cli.app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
