"""The study ledger survives a cut last line and reports done and failed cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.study.ledger import Ledger


def test_append_read_and_cut_last_line(tmp_path: Path):
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"config": "hard", "fold": 1, "seed": 0, "status": "ok", "metrics": {"mAP50": 0.5}})
    led.append({"config": "hard", "fold": 2, "seed": 0, "status": "failed", "error": "OOM"})
    with open(led.path, "a") as f:
        f.write('{"config": "hard", "fold": 3, "se')  # killed mid-write
    assert [r["fold"] for r in led.read()] == [1, 2]
    assert led.done() == {("hard", 1, 0)} and led.failed() == {("hard", 2, 0)}
    led.append({"config": "hard", "fold": 2, "seed": 0, "status": "ok", "metrics": {"mAP50": 0.6}})  # a retry
    assert led.done() == {("hard", 1, 0), ("hard", 2, 0)} and led.failed() == set()
    assert led.path.read_text().count("\n") == 3 and '"fold": 3' not in led.path.read_text()


def test_whole_last_line_without_newline_is_kept(tmp_path: Path):
    led = Ledger(tmp_path / "l.jsonl")
    led.path.write_text('{"config": "a", "fold": 1, "seed": 0, "status": "ok", "metrics": {"mAP50": 0.5}}')
    assert len(led.read()) == 1
    led.append({"config": "a", "fold": 2, "seed": 0, "status": "ok", "metrics": {"mAP50": 0.5}})
    assert len(led.read()) == 2


@pytest.mark.parametrize("line,why", [
    ("not json", "not JSON"),
    ('{"config": 5, "fold": 1, "seed": 0, "status": "ok", "metrics": {"mAP50": 0.5}}', "'config'"),
    ('[1, 2, 3]', "a list, not a record"),
    ('"hard"', "a str, not a record"),
    ('{"config": "a", "fold": "1", "seed": 0, "status": "ok", "metrics": {"mAP50": 0.5}}', "'fold'"),
    ('{"config": "a", "fold": 1, "seed": 0, "status": "ok", "metrics": {"mAP50": "high"}}', "'mAP50' is not"),
    ('{"config": "a", "fold": 1, "seed": 0, "status": "ok"}', "status ok without metrics"),
    ('{"config": "a", "fold": 1, "seed": 0, "status": "done", "metrics": {"mAP50": 0.5}}', "'status'"),
])
def test_a_bad_middle_line_is_reported_with_its_line_and_skipped(line: str, why: str, tmp_path: Path, capsys):
    led = Ledger(tmp_path / "l.jsonl")
    good = '{"config": "a", "fold": %d, "seed": 0, "status": "ok", "metrics": {"mAP50": 0.5, "mAP50_ci95": [0.4, 0.6]}}'
    led.path.write_text(f"{good % 1}\n{line}\n{good % 2}\n")
    assert [r["fold"] for r in led.read()] == [1, 2]
    led.read()  # reported once per process
    err = capsys.readouterr().err
    assert err.count("l.jsonl:2: ledger line skipped") == 1 and why in err
