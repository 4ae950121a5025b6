"""Recipe loading: unknown keys with suggestions, wrong types with file:line, nested overrides, section files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.config import load
from kdcli.config.schema import Recipe
from kdcli.errors import KdcliError


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_data_recipes_validate():
    for name in ("vedai25", "vedai12", "xview", "voc", "synthetic"):
        r = load.load(Recipe, f"data/{name}")
        assert r.data.path and r.data.imgsz >= 320 and r.data.anchor_size > 0


def test_unknown_key_named_with_line_and_suggestion(tmp_path: Path):
    p = _write(tmp_path, "r.yaml", "seed: 1\ndata:\n  path: x\n  imgsz: 256\n  anchr_size: 3\n")
    with pytest.raises(KdcliError) as e:
        load.load(Recipe, p)
    want = ":5: data.anchr_size: unknown key 'anchr_size' (did you mean 'data.anchor_size'?)"
    assert str(p) + want in e.value.message


def test_wrong_type_names_file_line_and_field(tmp_path: Path):
    p = _write(tmp_path, "r.yaml", "data:\n  path: x\n\n  imgsz: big\n")
    with pytest.raises(KdcliError, match=rf"{p}:4: data\.imgsz: Input should be a valid integer.*got 'big'"):
        load.load(Recipe, p)


def test_missing_required_key(tmp_path: Path):
    p = _write(tmp_path, "r.yaml", "data:\n  imgsz: 256\n")
    with pytest.raises(KdcliError, match=r"data\.path: required key is missing"):
        load.load(Recipe, p)


def test_overrides_nested_alias_and_typed(tmp_path: Path):
    p = _write(tmp_path, "r.yaml", "data:\n  path: x\n")
    r = load.load(Recipe, p, ["data.imgsz=640", "fold=3", "augment.zoom_range=[0.8, 1.2]", "letterbox=false"])
    assert r.data.imgsz == 640 and r.data.fold == 3 and r.augment.zoom_range == (0.8, 1.2)
    assert r.data.letterbox is False


def test_override_errors(tmp_path: Path):
    p = _write(tmp_path, "r.yaml", "data:\n  path: x\n")
    with pytest.raises(KdcliError, match="unknown recipe key 'fodl'") as e:
        load.load(Recipe, p, ["fodl=3"])
    assert e.value.hint == "did you mean 'fold'?"
    with pytest.raises(KdcliError, match=r"override 'data\.imgsz=abc': data\.imgsz"):
        load.load(Recipe, p, ["data.imgsz=abc"])
    with pytest.raises(KdcliError, match="bad override 'imgsz'"):
        load.load(Recipe, p, ["imgsz"])
    with pytest.raises(KdcliError, match="zoom_range must satisfy"):
        load.load(Recipe, p, ["augment.zoom_range=[2, 1]"])


def test_section_from_another_file_reports_that_file(tmp_path: Path):
    data = _write(tmp_path, "data.yaml", "data:\n  path: x\n  imgsz: -5\n")
    p = _write(tmp_path, "train.yaml", "seed: 3\ndata: data.yaml\n")
    with pytest.raises(KdcliError, match=rf"{data}:3: data\.imgsz: Input should be greater than or equal to 32"):
        load.load(Recipe, p)
    _write(tmp_path, "data.yaml", "path: y\nimgsz: 256\n")  # a bare section file works too
    r = load.load(Recipe, p)
    assert r.seed == 3 and r.data.path == "y" and r.data.imgsz == 256


def test_yaml_syntax_error_and_non_mapping(tmp_path: Path):
    p = _write(tmp_path, "r.yaml", "data: [\n")
    with pytest.raises(KdcliError, match=rf"{p}:2: invalid YAML"):
        load.load(Recipe, p)
    p = _write(tmp_path, "s.yaml", "- 1\n- 2\n")
    with pytest.raises(KdcliError, match="must be a mapping"):
        load.load(Recipe, p)


def test_recipe_not_found_suggests():
    with pytest.raises(KdcliError, match="recipe not found") as e:
        load.find_recipe("data/vedia25")
    assert e.value.hint == "did you mean 'data/vedai25'?"


def test_dump_round_trips(tmp_path: Path):
    r = load.load(Recipe, "data/vedai25", ["seed=4"])
    p = _write(tmp_path, "resolved.yaml", __import__("yaml").safe_dump(load.dump(r)))
    assert load.load(Recipe, p) == r


def test_shipped_train_model_and_distill_recipes_validate():
    for name in ("vedai25", "vedai12", "xview", "voc"):
        for role, backbone in (("teacher", "resnet50"), ("student", "resnet18")):
            r = load.load(Recipe, f"train/{name}_{role}")
            assert r.model.backbone == backbone and r.model.pretrained is True  # real data asks for ImageNet
        d = load.load(Recipe, f"distill/{name}", defaults={"data": {"path": "x"}})
        assert d.model.backbone == "resnet18" and d.distill.adapter_kernel == 3 and d.train.lr == 0.01
    for name in ("train/synthetic_teacher", "train/synthetic_student"):
        assert load.load(Recipe, name).model.pretrained is False  # synthetic recipes train from scratch
    assert load.load(Recipe, "distill/synthetic", defaults={"data": {"path": "x"}}).model.pretrained is False


def test_suffix_keys_resolve():
    r = load.load(Recipe, "data/vedai25", ["pdf.variant=plus", "defeat.variant=level", "train.device=0"])
    assert r.distill.pdf.variant == "plus" and r.distill.defeat.variant == "level" and r.train.device == "0"
    with pytest.raises(KdcliError, match="ambiguous"):
        load.load(Recipe, "data/vedai25", ["variant=plus"])


def test_data_override_with_a_dataset_dir_sets_its_path(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  path: old/place\n  imgsz: 256\n")
    r = load.load(Recipe, recipe, ["data=/new/place"])
    assert r.data.path == "/new/place" and r.data.imgsz == 256  # the rest of the section is kept


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  path: x\ntrain:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    with pytest.raises(KdcliError, match=r"r\.yaml:6: invalid YAML: key 'epochs' is given twice \(first on line 4\)"):
        load.load(Recipe, recipe)


def test_off_and_no_stay_words_yaml_1_2_booleans(tmp_path):
    """YAML 1.1 (PyYAML's default) reads off/no/yes/on as booleans: `train.amp=off` was refused as `False`."""
    from kdcli.config import load
    from kdcli.config.schema import Recipe

    (tmp_path / "r.yaml").write_text("data: {path: x}\ntrain: {amp: off, ema: true}\n")
    r = load.load(Recipe, tmp_path / "r.yaml")
    assert r.train.amp == "off" and r.train.ema is True
    assert load.load(Recipe, tmp_path / "r.yaml", ["train.amp=off", "train.ema=false"]).train.ema is False
    assert load.parse_override("name=no") == ("name", "no")
