"""Leak-free splits: no group straddles train, val and test, for a carved val, for folds over groups and for
folds over a coarser unit (a flight); the rule is recorded and printed; bad groupings are one-line errors.

The fixture mimics a drone set of two flights from generated scenes: 24 video frames `Drone2_(n).jpg` (a group
is a block of ten frames) and 16 tiles `k_n.jpg` of another flight (a group is a window k)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.data import groups
from kdcli.data.sources import coco_json, dota, yolo
from kdcli.data.sources.common import val_split
from kdcli.data.synthetic import generate
from kdcli.errors import KdcliError

FRAMES, WINDOWS, PER_WINDOW = 24, 4, 4
GROUP = r"^(\d+)_|^(Drone2_\(\d*?)\d\)"  # tiles: the window; frames: the tens of the frame number


def true_group(name: str) -> str:
    """Each file's group, computed by hand from the names the fixture writes (not by the code under test)."""
    if name.startswith("Drone2_("):
        return f"video block {int(name[len('Drone2_('):name.index(')')]) // 10}"
    return f"window {name.split('_')[0]}"


@pytest.fixture(scope="session")
def flights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain YOLO folder (images/ + labels/ + names.txt) of two flights, built from synthetic YOLO scenes."""
    raw = tmp_path_factory.mktemp("raw") / "synthetic-yolo"
    generate("yolo", raw, seed=0, images=FRAMES + WINDOWS * PER_WINDOW, size=48)
    root = tmp_path_factory.mktemp("flights") / "drone"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    scenes = sorted(raw.glob("images/*/*.jpg"))
    names = [f"Drone2_({n + 1}).jpg" for n in range(FRAMES)]
    names += [f"{k}_{n + 1}.jpg" for k in range(WINDOWS) for n in range(PER_WINDOW)]
    for scene, name in zip(scenes, names):
        shutil.copy(scene, root / "images" / name)
        label = raw / "labels" / scene.parent.name / f"{scene.stem}.txt"
        if label.is_file():
            shutil.copy(label, root / "labels" / f"{Path(name).stem}.txt")
    (root / "names.txt").write_text("car\ntruck\nbus\n")
    return root


def split_files(out: Path) -> dict[str, list[str]]:
    """split name -> the source file names of its images, read back from the written JSON."""
    found = {}
    for path in sorted((out / "annotations").glob("*.json")):
        data = json.loads(path.read_text())
        found[path.stem] = [Path(im.get("yolo_file") or im["source_file"]).name for im in data["images"]]
    return found


def assert_no_straddle(parts: dict[str, list[str]]) -> None:
    """Fails when a group has images in two splits of one fold (or of the unfolded dataset)."""
    by_fold: dict[str, dict[str, set[str]]] = {}
    for split, names in parts.items():
        fold = split.split("_")[0] if "_" in split else ""
        for name in names:
            by_fold.setdefault(fold, {}).setdefault(true_group(name), set()).add(split)
    straddling = {(f, g): s for f, gs in by_fold.items() for g, s in gs.items() if len(s) > 1}
    assert not straddling, f"groups straddle splits: {straddling}"


def test_assert_no_straddle_catches_a_leak():
    with pytest.raises(AssertionError, match="straddle"):
        assert_no_straddle({"train": ["Drone2_(1).jpg", "0_1.jpg"], "val": ["Drone2_(2).jpg"]})


def test_group_key_is_the_first_capture_that_took_part_else_the_whole_match():
    pattern = re.compile(GROUP)
    assert groups.key_of(pattern, "3_17.jpg") == "3"
    assert groups.key_of(pattern, "Drone2_(7).jpg") == "Drone2_("
    assert groups.key_of(pattern, "Drone2_(123).jpg") == "Drone2_(12"
    assert groups.key_of(re.compile(r"^[a-z]+\d"), "abc12_x.png") == "abc1"
    assert groups.key_of(pattern, "other.jpg") is None


def test_grouped_val_split_moves_whole_groups():
    ids = list(range(10))
    by = dict(zip(ids, "aaaaabbbcc"))  # a: 5 images, b: 3, c: 2
    for seed in range(6):
        train, val = val_split(ids, 0.3, seed, groups=by)
        assert sorted(train + val) == ids and val
        assert not {by[i] for i in train} & {by[i] for i in val}
        assert {by[i] for i in train}  # at least one group stays
    assert val_split(ids, 0, 0, groups=by) == (ids, [])
    assert val_split(ids, 0.9, 0, groups=dict.fromkeys(ids, "one"))[1] == []  # one group: nothing to carve


@pytest.mark.parametrize("seed", range(4))
def test_carved_val_never_shares_a_group_with_train(flights: Path, tmp_path: Path, seed: int):
    meta = yolo.prepare(flights, tmp_path / "out", names=flights / "names.txt", val_fraction=0.25, seed=seed,
                        group=GROUP)
    parts = split_files(tmp_path / "out")
    assert sorted(parts) == ["train", "val"] and parts["val"]
    assert sorted(parts["train"] + parts["val"]) == sorted(p.name for p in (flights / "images").iterdir())
    assert_no_straddle(parts)
    n_groups = len({true_group(n) for n in parts["train"] + parts["val"]})
    assert meta["split_rule"]["groups"] == n_groups == 3 + WINDOWS
    assert meta["split_rule"]["group"] == GROUP and meta["split_rule"]["unmatched"] == "error"
    assert {s: v["groups"] for s, v in meta["splits"].items()} == {
        s: len({true_group(n) for n in names}) for s, names in parts.items()}


def test_folds_hold_out_disjoint_groups(flights: Path, tmp_path: Path):
    meta = yolo.prepare(flights, tmp_path / "out", names=flights / "names.txt", val_fraction=0.2, group=GROUP,
                        folds=3)
    parts = split_files(tmp_path / "out")
    assert meta["folds"] == [1, 2, 3] and sorted(parts) == sorted(f"fold0{k}_{s}" for k in (1, 2, 3)
                                                                   for s in ("train", "val", "test"))
    assert_no_straddle(parts)
    every = sorted(p.name for p in (flights / "images").iterdir())
    tests = [parts[f"fold0{k}_test"] for k in (1, 2, 3)]
    assert sorted(n for t in tests for n in t) == every  # each image tested exactly once
    test_groups = [{true_group(n) for n in t} for t in tests]
    assert all(not a & b for i, a in enumerate(test_groups) for b in test_groups[i + 1:])
    for k in (1, 2, 3):
        assert sorted(parts[f"fold0{k}_train"] + parts[f"fold0{k}_val"] + parts[f"fold0{k}_test"]) == every
        assert parts[f"fold0{k}_val"]
    assert max(len(t) for t in tests) - min(len(t) for t in tests) <= 10  # dealt by size (groups of 4 to 10)
    assert meta["split_rule"]["val_from"] == "train" and "3 folds" in meta["split_rule"]["rule"]


def test_fold_by_trains_on_one_flight_and_tests_on_the_other(flights: Path, tmp_path: Path):
    meta = yolo.prepare(flights, tmp_path / "out", names=flights / "names.txt", val_fraction=0.3, group=GROUP,
                        fold_by=r"^(Drone2)_")
    parts = split_files(tmp_path / "out")
    assert_no_straddle(parts)
    video = {n for n in parts["fold01_train"] + parts["fold01_val"] + parts["fold01_test"] if n.startswith("Drone2")}
    assert meta["split_rule"]["held_out"] == {"fold01": [groups.UNMATCHED_UNIT], "fold02": ["Drone2"]}
    assert set(parts["fold01_train"]) == video and len(video) == FRAMES  # fold 1: trains on the video only
    assert set(parts["fold02_train"]) == {n for n in parts["fold01_val"] + parts["fold01_test"]}  # and reverse
    for k, held in ((1, WINDOWS * PER_WINDOW), (2, FRAMES)):
        val, test = parts[f"fold0{k}_val"], parts[f"fold0{k}_test"]
        assert val and test and len(val) + len(test) == held
    assert meta["split_rule"]["units"] == {groups.UNMATCHED_UNIT: WINDOWS * PER_WINDOW, "Drone2": FRAMES}


def test_a_group_that_spans_two_fold_units_is_refused(flights: Path, tmp_path: Path):
    with pytest.raises(KdcliError, match=r"group '1' spans fold units") as e:  # frames 10-19 and window 1
        yolo.prepare(flights, tmp_path / "out", names=flights / "names.txt", group=r"^(\d+)_|^Drone2_\((\d*?)\d\)",
                     fold_by=r"^(Drone2)_")
    assert "unit" in e.value.hint and not (tmp_path / "out").exists()


def test_group_file_gives_groups_no_expression_can(flights: Path, tmp_path: Path):
    rows = ["file,group", "# video: one group per block of ten frames"]
    rows += [f"{p.name},{true_group(p.name)}" for p in sorted((flights / "images").iterdir())]
    table = tmp_path / "groups.csv"
    table.write_text("\n".join(rows + ["gone.jpg,window 9"]) + "\n")
    meta = yolo.prepare(flights, tmp_path / "out", names=flights / "names.txt", group_file=table, folds=2)
    assert_no_straddle(split_files(tmp_path / "out"))
    assert meta["split_rule"]["groups"] == 3 + WINDOWS and meta["split_rule"]["group_file_rows_unused"] == 1
    table.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(KdcliError, match=r"Drone2_\(9\).jpg: not listed in --group-file"):
        yolo.prepare(flights, tmp_path / "o2", names=flights / "names.txt", group_file=table)
    table.write_text("file,group\n0_1.jpg,a\n0_1.jpg,b\n")
    with pytest.raises(KdcliError, match=r"groups.csv:3: 0_1.jpg is given group 'b', line 2 gave 'a'"):
        yolo.prepare(flights, tmp_path / "o3", names=flights / "names.txt", group_file=table)


def test_declared_val_sharing_a_group_with_train_is_refused(yolo_raw_small: Path, tmp_path: Path):
    # the synthetic export puts scene_00004 in val and scene_00000..3 in train: group '0000' straddles
    with pytest.raises(KdcliError, match=r"group '0000' straddles train .* and val"):
        yolo.prepare(yolo_raw_small, tmp_path / "out", group=r"scene_(\d{4})")
    meta = yolo.prepare(yolo_raw_small, tmp_path / "out", group=r"scene_(\d{5})")  # one image a group: fine
    assert "checked by --group" in meta["split_rule"]["rule"]


@pytest.fixture(scope="session")
def yolo_raw_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("raw") / "synthetic-yolo"
    generate("yolo", raw, seed=0, images=10, size=48)
    return raw


def test_cli_prints_the_rule_and_an_unmatched_name_is_a_one_line_error(flights: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "drone"
    base = ["prepare", "yolo", "--src", str(flights), "--names", str(flights / "names.txt"), "--out", str(out)]
    r = runner.invoke(app, [*base, "--group", GROUP, "--fold-by", "^(Drone2)_", "--val-fraction", "0.3"])
    assert r.exit_code == 0, r.output
    assert "split rule: 2 folds holding out --fold-by '^(Drone2)_' units" in " ".join(r.output.split())
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta["folds"] == [1, 2] and meta["split_rule"]["fold_by"] == "^(Drone2)_"
    assert all("groups" in s for s in meta["splits"].values())
    assert runner.invoke(app, ["data", "check", str(out)]).exit_code == 0
    r = runner.invoke(app, [*base, "--force", "--group", r"^(\d+)_"])
    assert r.exit_code == 2
    assert "Drone2_(1).jpg: file name does not match --group '^(\\d+)_'" in " ".join(r.output.split())
    r = runner.invoke(app, [*base, "--force", "--group", "^(unclosed"])
    assert r.exit_code == 2 and "not a regular expression" in r.output
    r = runner.invoke(app, [*base, "--force", "--group", GROUP, "--folds", "50"])
    assert r.exit_code == 2 and "only 7 groups" in r.output


def test_coco_source_carves_val_and_folds_by_group(flights: Path, tmp_path: Path):
    files = sorted(p.name for p in (flights / "images").iterdir())
    data = {"images": [{"id": i + 1, "file_name": f, "width": 48, "height": 48} for i, f in enumerate(files)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 10, 10]}
                            for i in range(len(files))],
            "categories": [{"id": 1, "name": "car"}]}
    (tmp_path / "train.json").write_text(json.dumps(data))
    meta = coco_json.prepare(tmp_path / "train.json", flights / "images", tmp_path / "out", val_fraction=0.3,
                             group=GROUP)
    parts = split_files(tmp_path / "out")
    assert_no_straddle(parts)
    assert sorted(parts) == ["train", "val"] and meta["split_rule"]["groups"] == 3 + WINDOWS
    meta = coco_json.prepare(tmp_path / "train.json", flights / "images", tmp_path / "o2", group=GROUP,
                             fold_by="^(Drone2)_")
    assert_no_straddle(split_files(tmp_path / "o2"))
    assert meta["folds"] == [1, 2] and Counter(s.split("_")[1] for s in meta["splits"]) == {"train": 2, "val": 2,
                                                                                           "test": 2}


def test_dota_splits_images_by_group_before_tiling(tmp_path: Path):
    raw = tmp_path / "dota"
    generate("dota", raw, seed=0, images=6, size=120)
    table = tmp_path / "groups.csv"
    table.write_text("".join(f"P000{i}.png,{'low' if i < 3 else 'high'}\n" for i in range(6)))
    meta = dota.prepare(raw, tmp_path / "out", tile=64, overlap=0.2, val_fraction=0.4, group_file=table)
    scenes = meta["scenes"]
    assert scenes["val"] and scenes["train"]
    halves = [{s[4] in "012" for s in part} for part in (scenes["train"], scenes["val"])]
    assert all(len(h) == 1 for h in halves) and halves[0] != halves[1]  # P0000-2 and P0003-5 never mix
    assert meta["split_rule"]["groups"] == 2
