"""README.md and docs/*.md stay true to the tree and the CLI: every relative link resolves (file, and #anchor as
GitHub slugs it), and every `kdcli <cmd> [<subcmd>]` in a fenced code block is a real command whose `--help`
succeeds. The checkers are plain functions, tested on broken input too, so a checker that finds nothing fails."""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from kdcli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_PREFIXES = {"$", "do", "then", "else", "time", "nohup", "exec", "env", "sudo", "!"}


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): lines inside fenced code blocks apart from the rest, fences themselves dropped."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and not line.strip()[len(m.group(1)):].strip():
            fence = None
        elif fence is None:
            prose.append(line)
        else:
            code.append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower-cased, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link -> its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers (not underscores inside words)
    text = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in split_fences(text)[0]:
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """Link targets in prose (inline links, images and reference definitions), code spans and blocks left out."""
    out = []
    for line in split_fences(text)[0]:
        m = _REF_DEF.match(line)
        if m:
            out.append(m.group(1))
            continue
        out += _INLINE_LINK.findall(_CODE_SPAN.sub("", line))
    return out


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """'target: why' for every relative link of `page` that does not resolve."""
    text = page.read_text(encoding="utf-8") if text is None else text
    bad = []
    for target in links(text):
        if _EXTERNAL.match(target) or target.startswith("//"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if path and not dest.exists():
            bad.append(f"{target}: no such file {dest}")
        elif anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                bad.append(f"{target}: an anchor into something that is not a Markdown page")
            elif anchor not in anchors(text if dest == page else dest.read_text(encoding="utf-8")):
                bad.append(f"{target}: no heading with the anchor #{anchor} in {dest.name}")
    return bad


@cache
def _groups() -> dict[str, frozenset[str]]:
    """The app's command groups and their subcommands (a group needs a subcommand to name a command)."""
    root = get_command(app)
    return {name: frozenset(getattr(cmd, "commands", {})) for name, cmd in root.commands.items()
            if getattr(cmd, "commands", None)}


def command_paths(text: str) -> set[tuple[str, ...]]:
    """Every `kdcli CMD [SUBCMD]` run in the fenced code blocks of a page: `kdcli` where a shell command starts
    (a line, or after `&&`, `;`, `|`, `(`, `do`, `VAR=value`, a `$ ` prompt) or after `-m` (`python -m kdcli`,
    `torchrun ... -m kdcli`); a `kdcli` inside a comment or a tree's description is not a command."""
    paths = set()
    for line in split_fences(text)[1]:
        line = re.sub(r"(^|\s)#.*", "", line)  # shell comments
        for segment in re.split(r"&&|\|\||[;|()`]", line):
            words = segment.split()
            while words and (words[0] in _PREFIXES or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
                words = words[1:]
            for i, word in enumerate(words[:-1]):
                if word != "kdcli" or not (i == 0 or words[i - 1] == "-m") or not _NAME.match(words[i + 1]):
                    continue
                path = (words[i + 1],)
                if path[0] in _groups() and i + 2 < len(words) and _NAME.match(words[i + 2]):
                    path += (words[i + 2],)
                paths.add(path)
    return paths


def failing_commands(paths: set[tuple[str, ...]]) -> list[str]:
    """'kdcli CMD ...: why' for every path whose `--help` fails."""
    runner, bad = CliRunner(), []
    for path in sorted(paths):
        result = runner.invoke(app, [*path, "--help"])
        if result.exit_code != 0:
            why = [w.strip("│╭╮╰╯─ ") for w in (result.output or repr(result.exception)).splitlines()]
            why = [w for w in why if w]
            bad.append(f"kdcli {' '.join(path)}: exit {result.exit_code}: {why[-1] if why else ''}")
    return bad


def test_pages_exist():
    names = {p.name for p in PAGES[1:]}
    assert {"README.md", "data.md", "train-distill.md", "unlabeled.md", "studies.md", "deploy.md", "performance.md",
            "results.md", "dataset-dir.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert links(page.read_text(encoding="utf-8")), f"{page.name} links to nothing: is the link reader broken?"
    assert broken_links(page) == []


def test_commands_in_code_blocks_are_real():
    paths = set().union(*(command_paths(p.read_text(encoding="utf-8")) for p in PAGES))
    assert {("prepare", "vedai"), ("distill",), ("train",)} <= paths  # the reader finds what is there
    assert failing_commands(paths) == []


def test_readme_keeps_the_ci_set_up_and_the_users_examples():
    """.ci/run installs and tests as the README says; the user's own two commands stay on the first page."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -c constraints.txt -e ".[dev]" && python -m pytest -q' in readme
    assert 'pip install -q -c constraints.txt -e ".[dev]"' in ci and "python -m pytest -q" in ci
    code = "\n".join(split_fences(readme)[1])
    assert "kdcli prepare vedai --res 25" in code and "kdcli distill --teacher t.pt --method defeat" in code


# The checkers themselves, on pages made to be broken.

def test_slugs_follow_github():
    assert slug("A from-scratch teacher is level") == "a-from-scratch-teacher-is-level"
    assert slug("Datasets: citations and licences") == "datasets-citations-and-licences"
    assert slug("`kdcli benchmark`") == "kdcli-benchmark"
    assert slug("The detector (methods.md)") == "the-detector-methodsmd"
    assert slug("Studies: configurations x folds x seeds") == "studies-configurations-x-folds-x-seeds"
    assert anchors("# Run\n## Run\n```\n# not a heading\n```\n") == {"run", "run-1"}


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n## Part two\n")
    page = tmp_path / "page.md"
    text = ("# Page\n[ok](other.md) [ok](other.md#part-two) [ok](#page) ![img](missing.png)\n"
            "[gone](nowhere.md) [bad anchor](other.md#part-three) `[not a link](x.md)`\n"
            "```\n[in code](also-nowhere.md)\n```\n[ref]: gone-too.md\n[web](https://example.com/x)\n")
    bad = broken_links(page, text)
    assert [b.split(":")[0] for b in bad] == ["missing.png", "nowhere.md", "other.md#part-three", "gone-too.md"]


def test_an_unknown_command_is_found():
    text = ("prose kdcli nosuch is not code\n```bash\nkdcli prepare vedai --res 25  # ok, not kdcli nosuch2\n"
            "kdcli trian recipes/x.yaml\nkdcli prepare vedia\nkdcli data --help\npython -m kdcli benchmark --tiny\n"
            "ls kdcli/ && pip install kdcli && X=1 kdcli val best.pt; for m in a; do kdcli predcit x; done\n```\n"
            "```\nrun/  table.md   written by kdcli version 3\n```\n")
    paths = command_paths(text)
    assert paths == {("prepare", "vedai"), ("trian",), ("prepare", "vedia"), ("data",), ("benchmark",), ("val",),
                     ("predcit",)}
    bad = failing_commands(paths)
    assert sorted(b.split(":")[0] for b in bad) == ["kdcli predcit", "kdcli prepare vedia", "kdcli trian"]
