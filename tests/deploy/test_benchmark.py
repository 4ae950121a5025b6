"""Benchmark timing: distillation rows timed in turn, round after round, so that each ratio to the hard step is
taken between steps moments apart (a machine whose load changes moves both), reported as the median with its
spread; a format listed twice in --formats is measured once, and said so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.deploy import benchmark as bench


def test_rows_are_warmed_up_then_timed_once_per_round(monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []
    clock = {"t": 0.0}
    # seconds of each call: the hard step (0) is slowed 8x once, by a load burst in the first timed round
    durations = {0: [1, 1, 8, 1, 1, 1, 1], 1: [2] * 7}

    def make(i: int):
        def step() -> dict[str, float]:
            clock["t"] += durations[i][sum(1 for c in calls if c == i)]
            calls.append(i)
            return {}
        return step

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    times, peaks = bench._time_round_robin([make(0), make(1)], bench.torch.device("cpu"), warmup=2, repeats=5)
    assert calls == [0, 0, 1, 1] + [0, 1] * 5  # every row warmed up, then one step of each per round
    assert times == [[8, 1, 1, 1, 1], [2, 2, 2, 2, 2]] and peaks == [0, 0]
    ratios = [t / b for t, b in zip(times[1], times[0])]
    assert sorted(ratios)[2] == 2.0  # the median shrugs off the burst that one step's ratio (0.25) takes whole
    assert bench.spread(ratios) == {"min": 0.25, "q1": 2.0, "q3": 2.0, "max": 2.0, "n": 5}


def test_distill_rows_report_the_median_ratio_and_its_spread():
    from kdcli.config.schema import ModelConfig

    teacher = ModelConfig(backbone="resnet18", neck="pafpn", channels=16)
    student = ModelConfig(backbone="resnet18", neck="fpn", channels=16)
    d = bench.distill_steps(teacher, student, 64, 2, bench.torch.device("cpu"), None, repeats=5,
                            rows=[("hard", "none", False), ("hard", "mse", False)])
    hard, mse = d["rows"]
    assert hard["time_ratio"] == 1.0 and hard["time_ratio_spread"] == {"min": 1.0, "q1": 1.0, "q3": 1.0, "max": 1.0,
                                                                        "n": 5}
    sp = mse["time_ratio_spread"]
    assert sp["n"] == 5 and sp["min"] <= sp["q1"] <= mse["time_ratio"] <= sp["q3"] <= sp["max"]


def test_a_format_listed_twice_is_measured_once(tiny_checkpoint: Path):
    res = CliRunner().invoke(app, ["benchmark", "--formats", "torch,torch", "--model", str(tiny_checkpoint),
                                   "--repeats", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert "--formats torch,torch: torch given more than once, measured once" in res.stderr
    rows = json.loads(res.stdout.strip().splitlines()[-1])["models"][0]["rows"]
    assert [r["format"] for r in rows] == ["torch"]
