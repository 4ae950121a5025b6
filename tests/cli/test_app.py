"""The CLI shell: version, help with examples, exit codes, one-line errors, the installed console script."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kdcli import __version__
from kdcli.cli.app import app

runner = CliRunner()


def commands(group=None, prefix=()):
    """Every leaf command path of the app."""
    import typer.main

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"kdcli {__version__}"


def test_no_args_shows_help():
    r = runner.invoke(app, [])
    assert "prepare" in r.output and "Usage" in r.output


@pytest.mark.parametrize("path", list(commands()), ids=lambda p: " ".join(p))
def test_every_command_help_has_an_example(path):
    r = runner.invoke(app, [*path, "--help"], terminal_width=200)
    assert r.exit_code == 0
    assert "Example:" in r.output and "kdcli" in r.output


def test_bad_option_is_usage_error():
    r = runner.invoke(app, ["prepare", "vedai", "--res", "abc"])
    assert r.exit_code == 2


def test_user_error_is_one_red_line_without_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path))
    monkeypatch.delenv("KDCLI_DEBUG", raising=False)
    r = runner.invoke(app, ["prepare", "vedai", "--res", "25"])
    assert r.exit_code == 2
    assert "error: VEDAI not found at" in r.output and "Traceback" not in r.output
    assert str(tmp_path / "raw" / "VEDAI") in r.output.replace("\n", "")


def test_debug_flag_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path))
    r = runner.invoke(app, ["--debug", "prepare", "vedai"])
    assert r.exit_code != 0 and r.exception is not None and type(r.exception).__name__ == "KdcliError"
    r = runner.invoke(app, ["prepare", "vedai"])  # the flag does not stick to later invocations
    assert r.exit_code == 2 and r.exception is None or isinstance(r.exception, SystemExit)


def test_console_script_and_module_entry_points():
    exe = subprocess.run([sys.executable, "-m", "kdcli", "--version"], capture_output=True, text=True, check=True)
    assert exe.stdout.strip() == f"kdcli {__version__}"
    bindir = __import__("pathlib").Path(sys.executable).parent
    script = bindir / "kdcli"
    if script.exists():
        r = subprocess.run([str(script), "prepare", "vedai", "--src", "/nonexistent/x"], capture_output=True,
                           text=True)
        assert r.returncode == 2 and "VEDAI not found" in r.stderr and "Traceback" not in r.stderr
