"""Bad input to `kdcli benchmark --suite` and to a study's cells, table-driven with the harness of test_bad_input:
exit code 2, one `error:` line holding the stated fragment, no traceback, and the folder left as it was (a study
refused before its first cell writes no study dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.cli.app import app
from tests.cli.test_bad_input import TINY_STUDY, Case, _write, run_case, runner


def study_case(id: str, extra: str, fragment: str, dry_run: bool = True) -> Case:
    """A study of TINY_STUDY's recipes whose st.yaml ends with `extra` (line 5 on), with a hard+pdf@pool row."""
    text = "teacher: t.yaml\nstudent: s.yaml\nconfigs: [teacher, hard, hard+pdf@pool]\nfolds: 1-2\n" + extra
    return Case(id, ["study", "{tmp}/st.yaml", *(["--dry-run"] if dry_run else [])], fragment,
                {**TINY_STUDY, "st.yaml": text})


SUITE = ["benchmark", "--suite", "gpu", "--device", "cpu", "--tiny"]

CASES = [
    # --suite's own options without --suite: the full default benchmark would run instead, ignoring them
    Case("benchmark-tiny-without-suite", ["benchmark", "--tiny"], "--tiny only goes with --suite"),
    Case("benchmark-out-without-suite", ["benchmark", "--out", "{tmp}/x"], "--out only goes with --suite"),
    Case("benchmark-out-force-without-suite", ["benchmark", "--out", "{tmp}/x", "--force"],
         "--out, --force only go with --suite"),
    # options the suite does not read
    Case("benchmark-suite-ignores-models", [*SUITE, "--out", "{tmp}/s", "--models", "a.pt"],
         "--suite runs its own fixed stages: --models is not used by it"),
    Case("benchmark-suite-ignores-no-eval", [*SUITE, "--out", "{tmp}/s", "--no-eval", "--batch", "8"],
         "--batch, --eval/--no-eval are not used by it"),
    # its --out
    Case("benchmark-suite-out-is-a-file", [*SUITE, "--out", "{tmp}/afile"],
         "afile: the --out folder exists as a file, not a folder", {"afile": "keep"}),
    Case("benchmark-suite-out-under-a-file", [*SUITE, "--out", "{tmp}/afile/s"],
         "cannot create the --out folder: " , {"afile": "keep"}),
    Case("benchmark-suite-rerun-into-its-out", [*SUITE, "--out", "{tmp}/old"],
         "old: the folder is not empty (a suite measures only what it runs",
         {"old/summary.json": "{}", "old/suite.json": "{}", "old/study/ledger.jsonl": "{}\n"}),
    Case("benchmark-suite-force-not-a-suite", [*SUITE, "--out", "{tmp}/mine", "--force"],
         "mine: not the folder of an earlier suite", {"mine/notes.txt": "keep"}),
    # a study's cells checked before the first runs (and by --dry-run): file, line, close key
    study_case("study-variant-unknown-key", "variants:\n  pool: [distill.unlabelled=rest]\n",
               "st.yaml:6: variants.pool: 'distill.unlabelled=rest': unknown recipe key 'distill.unlabelled' "
               "hint: did you mean 'distill.unlabeled'?"),
    study_case("study-variant-unknown-key-run", "variants:\n  pool: [distill.unlabelled=rest]\n",
               "st.yaml:6: variants.pool: 'distill.unlabelled=rest': unknown recipe key", dry_run=False),
    study_case("study-pool-of-the-rest-without-a-rest",
               "variants:\n  pool: [distill.unlabeled=rest, data.label_fraction=1]\n",
               "st.yaml:6: cell hard+pdf@pool/f1/s0: distill.unlabeled=rest distils on the training images "
               "data.label_fraction leaves unlabelled, and it is 1"),
    study_case("study-pool-of-the-rest-without-a-rest-run", "variants:\n  pool: [distill.unlabeled=rest]\n",
               "cell hard+pdf@pool/f1/s0: distill.unlabeled=rest", dry_run=False),
    study_case("study-variant-bad-value",
               "variants:\n  pool:\n    - distill.unlabeled=rest\n    - data.label_fraction=2\n",
               "st.yaml:8: cell hard+pdf@pool/f1/s0: override 'data.label_fraction=2': data.label_fraction: "
               "Input should be less than or equal to 1"),
    study_case("study-overrides-unknown-key", "variants: {pool: [distill.unlabeled=rest, data.label_fraction=0.5]}\n"
               "overrides: [train.epoch=3]\n", "st.yaml:6: overrides: 'train.epoch=3': unknown recipe key"),
    study_case("study-student-overrides-unknown-key",
               "variants: {pool: [distill.unlabeled=rest, data.label_fraction=0.5]}\n"
               "student_overrides:\n  - distill.methd=pdf\n",
               "st.yaml:7: student_overrides: 'distill.methd=pdf': unknown recipe key 'distill.methd' hint: did you "
               "mean 'distill.method'?"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_deploy_and_study_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = run_case(case, tmp_path, monkeypatch, width=300)
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1, out


def test_a_good_study_passes_the_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path / "datasets"))
    case = study_case("good", "variants: {pool: [distill.unlabeled=rest, data.label_fraction=0.25]}\n", "")
    _write(tmp_path, case.files)
    r = runner.invoke(app, ["study", str(tmp_path / "st.yaml"), "--out", str(tmp_path / "o"), "--dry-run"],
                      terminal_width=300)
    assert r.exit_code == 0 and "0 done, 6 to run" in r.output, r.output
