"""The study ledger survives a cut last line and reports done and failed cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.errors import KdcliError
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
    led.path.write_text('{"config": "a", "fold": 1, "seed": 0, "status": "ok"}')
    assert len(led.read()) == 1
    led.append({"config": "a", "fold": 2, "seed": 0, "status": "ok"})
    assert len(led.read()) == 2


def test_malformed_middle_line_is_an_error(tmp_path: Path):
    led = Ledger(tmp_path / "l.jsonl")
    led.path.write_text('{"config": "a", "fold": 1, "seed": 0}\nnot json\n{"config": "a", "fold": 2, "seed": 0}\n')
    with pytest.raises(KdcliError, match=r"l\.jsonl:2: malformed ledger line"):
        led.read()
