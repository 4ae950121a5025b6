"""VEDAI: the line parser on hand-written lines, and `prepare` end to end on synthetic raw data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kdcli.data.sources import vedai
from kdcli.data.sources.common import NON_FINITE
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError


def test_parse_line_per_image_with_negative_orientation():
    obj = vedai.parse_line("181.250000 96.500000 -0.785398 1 1 0 176 184 187 179 91 88 102 105", "f.txt:1")
    assert obj.xc == 181.25 and obj.yc == 96.5 and obj.orientation == pytest.approx(-0.785398)
    assert (obj.cls, obj.contained, obj.occluded) == (1, 1, 0)
    assert obj.xs == (176, 184, 187, 179) and obj.ys == (91, 88, 102, 105)


def test_parse_line_combined_15_fields_reorders():
    obj = vedai.parse_line("00000012 181.250000 96.500000 0.785398 176 184 187 179 91 88 102 105 11 1 1", "a:3")
    assert (obj.cls, obj.contained, obj.occluded) == (11, 1, 1)
    assert obj.xs == (176, 184, 187, 179) and obj.ys == (91, 88, 102, 105)


def test_parse_line_short_line_names_file_line_and_count():
    with pytest.raises(KdcliError, match=r"f\.txt:7: expected 14 fields .* found 9"):
        vedai.parse_line("1 2 3 4 5 6 7 8 9", "f.txt:7")


def test_parse_line_five_field_form_is_a_known_skip():
    with pytest.raises(vedai.ShortLine):
        vedai.parse_line("100.0 200.0 1 1 0", "f.txt:2")


def test_parse_line_bad_number():
    with pytest.raises(KdcliError, match=r"f\.txt:1: malformed number"):
        vedai.parse_line("x 96.5 0.1 1 1 0 176 184 187 179 91 88 102 105", "f.txt:1")


def test_read_objects_counts_five_field_lines(tmp_path: Path):
    f = tmp_path / "00000001.txt"
    f.write_text("10.0 10.0 0.0 1 1 0 5 15 15 5 8 8 12 12\n100.0 200.0 1 1 0\n\n")
    tally = Tally()
    objs = vedai.read_objects(f, tally)
    assert len(objs) == 1 and objs[0][0] == f"{f}:1"
    assert tally["5-field line without corners (skipped)"] == 1


def test_read_objects_drops_and_counts_nan_and_inf(tmp_path: Path):
    f = tmp_path / "00000001.txt"
    f.write_text("10.0 10.0 0.0 1 1 0 5 nan 15 5 8 8 12 12\n"  # a corner: was an error, now dropped and counted
                 "inf 10.0 0.0 1 1 0 5 15 15 5 8 8 12 12\n"  # the centre
                 "10.0 10.0 0.0 1 1 0 5 15 15 5 8 8 12 1e999\n"  # a corner that overflows to inf: was a crash
                 "10.0 10.0 0.0 1 1 0 5 15 15 5 8 8 12 12\n")
    tally = Tally()
    objs = vedai.read_objects(f, tally)
    assert [where for where, _ in objs] == [f"{f}:4"]
    assert tally.as_dict()[NON_FINITE] == {"count": 3, "example": f"{f}:1"}


def test_presets():
    p8 = vedai.preset("vedai8")
    assert p8.classes == ["car", "pickup", "camping car", "truck", "other", "tractor", "boat", "van"]
    assert p8.label(8) == p8.classes.index("other") and p8.label(7) == p8.classes.index("other")
    assert p8.label(31) is None
    assert vedai.preset("vedai9").label(31) == 8
    assert vedai.preset("vehicle").label(31) is None and vedai.preset("vehicle").label(23) == 0
    assert len(vedai.preset("all").classes) == 11
    with pytest.raises(KdcliError, match="unknown VEDAI class preset"):
        vedai.preset("vedai7")


def _load(d: Path, name: str) -> dict:
    return json.loads((d / "annotations" / f"{name}.json").read_text())


def _expected_objects(raw: Path, folder: str, size: int, drop: set[int]) -> int:
    """Objects a correct conversion keeps: from the combined file, minus dropped classes and boxes with no
    area left inside the image."""
    n = 0
    suffix = folder[-3:] if folder.endswith("512") else "1024"
    for line in (raw / folder / f"annotation{suffix}.txt").read_text().splitlines():
        f = line.split()
        xs, ys = [int(v) for v in f[4:8]], [int(v) for v in f[8:12]]
        w = min(max(xs), size) - max(min(xs), 0)
        h = min(max(ys), size) - max(min(ys), 0)
        if int(f[12]) not in drop and w >= 1 and h >= 1:
            n += 1
    return n


@pytest.mark.parametrize("res,folder,size", [(25, "Annotations512", 96), (12, "Annotations1024", 192)])
def test_prepare_vedai_folds_partition_and_counts(tmp_path: Path, vedai_raw: Path, res: int, folder: str, size: int):
    out = tmp_path / f"vedai{res}"
    meta = vedai.prepare(vedai_raw, out, res=res, classes="vedai8", val_fraction=0.1, seed=0)
    assert meta["folds"] == list(range(1, 11))
    assert meta["images"] == 40  # the 41st listed id has no image: counted, not fatal
    assert meta["dropped"]["image listed in a fold file but missing (skipped)"]["count"] == 1
    all_images = {im["id"] for k in range(1, 11) for s in ("train", "val", "test")
                  for im in _load(out, f"fold{k:02d}_{s}")["images"]}
    assert len(all_images) == 40
    tests = [{im["id"] for im in _load(out, f"fold{k:02d}_test")["images"]} for k in range(1, 11)]
    assert set().union(*tests) == all_images  # the test sets partition the images
    assert sum(len(t) for t in tests) == 40
    for k in range(1, 11):
        train = {im["id"] for im in _load(out, f"fold{k:02d}_train")["images"]}
        val = {im["id"] for im in _load(out, f"fold{k:02d}_val")["images"]}
        assert train.isdisjoint(val) and train.isdisjoint(tests[k - 1]) and val.isdisjoint(tests[k - 1])
        assert len(train) + len(val) + len(tests[k - 1]) == 40
        assert len(val) == round(0.1 * (40 - len(tests[k - 1])))
    expected = _expected_objects(vedai_raw, folder, size, drop={31})
    assert sum(len(_load(out, f"fold{k:02d}_test")["annotations"]) for k in range(1, 11)) == expected
    assert meta["objects"] == expected
    planes = sum(1 for r in meta["class_mapping"] if r["raw_id"] == 31 for _ in range(r["objects"]))
    assert meta["dropped"].get("class 'plane' not in preset vedai8", {"count": 0})["count"] == planes
    first = _load(out, "fold01_test")
    for a in first["annotations"]:
        im = next(i for i in first["images"] if i["id"] == a["image_id"])
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"] and w > 0 and h > 0
        assert a["area"] == pytest.approx(w * h, abs=0.05)
    assert all((out / im["file_name"]).is_file() and (out / im["ir_file"]).is_file() for im in first["images"])
    saved = yaml.safe_load((out / "dataset.yaml").read_text())
    assert saved["classes"] == meta["classes"] and saved["synthetic"] is True and saved["image_size"] == size


def test_prepare_vedai_12_is_the_25_set_doubled(vedai25: Path, tmp_path: Path, vedai_raw: Path):
    v12 = tmp_path / "v12"
    vedai.prepare(vedai_raw, v12, res=12)
    a25, a12 = _load(vedai25, "fold03_test"), _load(v12, "fold03_test")
    assert [im["vedai_id"] for im in a25["images"]] == [im["vedai_id"] for im in a12["images"]]
    assert len(a25["annotations"]) == len(a12["annotations"])
    for p, q in zip(a25["annotations"], a12["annotations"]):
        assert q["bbox"][0] == pytest.approx(2 * p["bbox"][0], abs=2.5)
        assert q["bbox"][2] == pytest.approx(2 * p["bbox"][2], abs=3.5)


def test_val_fraction_zero_and_selected_folds(tmp_path: Path, vedai_raw: Path):
    out = tmp_path / "v"
    meta = vedai.prepare(vedai_raw, out, folds=[2, 5], val_fraction=0, classes="vehicle", images="copy")
    assert meta["folds"] == [2, 5]
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        "fold02_test.json", "fold02_train.json", "fold02_val.json",
        "fold05_test.json", "fold05_train.json", "fold05_val.json"]
    assert _load(out, "fold02_val")["images"] == []
    assert meta["classes"] == ["vehicle"]
    img = out / _load(out, "fold02_test")["images"][0]["file_name"]
    assert img.is_file() and not img.is_symlink()


def test_same_seed_same_split_other_seed_other_split(tmp_path: Path, vedai_raw: Path):
    def val_ids(seed: int, name: str) -> list[int]:
        vedai.prepare(vedai_raw, tmp_path / name, folds=[1], seed=seed, val_fraction=0.3)
        return [im["id"] for im in _load(tmp_path / name, "fold01_val")["images"]]

    assert val_ids(0, "a") == val_ids(0, "b")
    assert val_ids(0, "c") != val_ids(7, "d")


def _copy_raw(vedai_raw: Path, tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(vedai_raw, raw)
    return raw


def test_unknown_class_ids_clipping_and_zero_area_are_counted(tmp_path: Path, vedai_raw: Path):
    raw = _copy_raw(vedai_raw, tmp_path)
    ann = raw / "Annotations512" / "00000001.txt"
    ann.write_text(ann.read_text()
                   + "20.0 20.0 0.0 99 1 0 15 25 25 15 18 18 22 22\n"  # unknown class id
                   + "5.0 5.0 0.0 1 0 0 -10 10 10 -10 -5 -5 10 10\n"  # corners outside: clipped
                   + "200.0 200.0 0.0 1 0 0 150 160 160 150 150 150 160 160\n")  # entirely outside: no area
    meta = vedai.prepare(raw, tmp_path / "out", folds=[1])
    d = meta["dropped"]
    assert d["unknown class id 99"]["count"] == 1 and "00000001.txt:" in d["unknown class id 99"]["example"]
    assert d["box clipped to the image"]["count"] >= 1
    assert d["zero-area box after clipping (dropped)"]["count"] == 1


def test_malformed_line_is_an_error_naming_file_and_line(tmp_path: Path, vedai_raw: Path):
    raw = _copy_raw(vedai_raw, tmp_path)
    ann = raw / "Annotations512" / "00000003.txt"
    lines = ann.read_text().splitlines()
    ann.write_text("\n".join([*lines, "1 2 3 4 5 6 7"]) + "\n")
    with pytest.raises(KdcliError, match=rf"00000003\.txt:{len(lines) + 1}: expected 14 fields .* found 7"):
        vedai.prepare(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written temp dir left


def test_undecodable_image_error_or_skip(tmp_path: Path, vedai_raw: Path):
    raw = _copy_raw(vedai_raw, tmp_path)
    bad = raw / "Vehicules512" / "00000004_co.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(KdcliError, match="00000004_co.png: cannot decode image"):
        vedai.prepare(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    meta = vedai.prepare(raw, tmp_path / "out", skip_bad_images=True)
    assert meta["images"] == 39 and meta["dropped"]["image failed to decode (skipped)"]["count"] == 1
    lines = [x for x in (raw / "Annotations512" / "00000004.txt").read_text().splitlines() if x.strip()]
    assert meta["dropped"]["boxes of skipped images (dropped)"] == {"count": len(lines), "example": f"{bad}: 1"}


def test_existing_out_refused_unless_force(tmp_path: Path, vedai_raw: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(KdcliError, match="already exists"):
        vedai.prepare(vedai_raw, out, folds=[1])
    assert (out / "keep.txt").read_text() == "user data"
    vedai.prepare(vedai_raw, out, folds=[1], force=True)
    assert not (out / "keep.txt").exists() and (out / "dataset.yaml").is_file()


def test_missing_source_and_folders(tmp_path: Path, vedai_raw: Path):
    with pytest.raises(KdcliError, match="VEDAI not found at") as e:
        vedai.prepare(tmp_path / "nope", tmp_path / "out")
    assert "kdcli prepare synthetic --kind vedai" in e.value.hint
    raw = _copy_raw(vedai_raw, tmp_path)
    shutil.rmtree(raw / "Vehicules512")
    with pytest.raises(KdcliError, match="Vehicules512: folder missing"):
        vedai.prepare(raw, tmp_path / "out")
    with pytest.raises(KdcliError, match="--res must be 25 or 12"):
        vedai.prepare(raw, tmp_path / "out", res=50)
    with pytest.raises(KdcliError, match=r"--folds: VEDAI has folds 1-10, got \[11\]"):
        vedai.prepare(tmp_path / "nope", tmp_path / "out", folds=[11])  # named before the missing source
    raw = _copy_raw(vedai_raw, tmp_path / "b")
    for f in (raw / "Annotations512").glob("fold03*"):
        f.unlink()
    with pytest.raises(KdcliError, match=r"fold\(s\) \[3\] not found"):
        vedai.prepare(raw, tmp_path / "out", folds=[3])


def test_synthetic_extra_test_images_join_every_fold_test_split(tmp_path: Path):
    from kdcli.data import synthetic

    raw = tmp_path / "raw"
    synthetic.generate("vedai", raw, images=20, size=48, test_images=7)
    folds = [(raw / "Annotations512" / f"fold{k:02d}test.txt").read_text().split() for k in range(1, 11)]
    extra = {f"{20 + 1 + j:08d}" for j in range(7)}  # after the 20 scenes and the one id listed without files
    assert all(extra <= set(f) for f in folds)
    train = (raw / "Annotations512" / "fold01.txt").read_text().split()
    assert not extra & set(train) and (raw / "Vehicules1024" / f"{20 + 1:08d}_co.png").is_file()
    out = tmp_path / "ds"
    vedai.prepare(raw, out, res=25, folds=[1, 2], val_fraction=0)
    tests = [json.loads((out / "annotations" / f"fold0{k}_test.json").read_text()) for k in (1, 2)]
    assert all(len(t["images"]) == 2 + 7 for t in tests)  # 20 scenes / 10 folds + 7 extra
    with pytest.raises(KdcliError, match="--kind vedai"):
        synthetic.generate("voc", tmp_path / "v", images=2, test_images=3)


def test_a_missing_image_counts_the_objects_it_takes_with_it(tmp_path: Path, vedai_raw: Path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(vedai_raw, raw)
    ann = sorted((raw / "Annotations512").glob("0*.txt"))[0]
    lines = [x for x in ann.read_text().splitlines() if x.strip()]
    (raw / "Vehicules512" / f"{ann.stem}_co.png").unlink()
    meta = vedai.prepare(raw, tmp_path / "out", res=25, classes="vedai8", val_fraction=0.1, seed=0)
    lost = meta["dropped"]["objects of a missing image (dropped)"]
    assert lost["count"] == len(lines) > 0 and lost["example"].startswith(ann.stem)
    assert meta["dropped"]["image listed in a fold file but missing (skipped)"]["count"] == 2
