"""Load a recipe: YAML files (`yaml.safe_load`), sections given as paths to other YAML files, and `key=value`
overrides from the command line, validated into one schema object.

Errors name the file, line and field (`recipes/x.yaml:7: data.imgsz: Input should be a valid integer`) and
suggest the closest valid key for a misspelt one.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kdcli.errors import KdcliError

M = TypeVar("M", bound=BaseModel)

# the shipped recipes: kdcli/recipes links to the top-level recipes/ folder and is a copy inside a wheel
REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def find_recipe(name: str | Path) -> Path:
    """A recipe path as given, or a name under ./recipes or the installed recipes folder (`.yaml` optional)."""
    p = Path(name)
    candidates = [p, p.with_suffix(".yaml")] if p.suffix == "" else [p]
    for root in (Path("recipes"), REPO_RECIPES):
        candidates += [root / c for c in list(candidates) if not c.is_absolute()]
    for c in candidates:
        if c.is_file():
            return c
    if p.is_dir():
        raise KdcliError(f"{p}: a folder, not a file", hint="give the recipe's YAML file")
    known = sorted(str(q.relative_to(REPO_RECIPES).with_suffix("")) for q in REPO_RECIPES.rglob("*.yaml"))
    close = difflib.get_close_matches(str(p.with_suffix("")), known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "give a path to a YAML file or a name under recipes/"
    raise KdcliError(f"recipe not found: {name}", hint=hint)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last), with YAML 1.2's
    booleans: only true and false, so `amp: off` and `train.amp=off` stay the word off (YAML 1.1, PyYAML's
    default, reads off, no, yes and on as booleans)."""

    yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; a syntax error or a key given twice names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise KdcliError(f"{path}: {'a folder, not a file' if path.is_dir() else 'file not found'}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KdcliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise KdcliError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdcliError(f"{path}:1: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (`X`, `X | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            sub = submodel(arg)
            if sub is not None:
                return sub
    return None


def leaf_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a recipe may set, e.g. `data.imgsz`."""
    keys = []
    for name, field in schema.model_fields.items():
        sub = submodel(field.annotation)
        if sub is not None:
            keys += leaf_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _suggest(key: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def resolve_key(schema: type[BaseModel], key: str) -> list[str]:
    """A dotted override key as a path of field names; a bare leaf name (`fold`) is accepted when unique."""
    keys = leaf_keys(schema)
    sections = [k for k, f in schema.model_fields.items() if submodel(f.annotation)]
    if key in keys or key in sections:
        return key.split(".")
    by_leaf = [k for k in keys if k == key or k.endswith("." + key)]  # a unique tail: fold, pdf.variant
    if len(by_leaf) == 1:
        return by_leaf[0].split(".")
    if len(by_leaf) > 1:
        raise KdcliError(f"override '{key}' is ambiguous", hint=f"write one of: {', '.join(by_leaf)}")
    leaves = sorted({k.rsplit('.', 1)[-1] for k in keys})
    hint = _suggest(key, keys) or _suggest(key, leaves) or "see the recipe reference in docs/train-distill.md (Recipes)"
    raise KdcliError(f"unknown recipe key '{key}'", hint=hint)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value parsed as YAML: numbers, booleans, lists, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise KdcliError(f"bad override '{item}'", hint="write key=value, e.g. train.epochs=3")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for name in path[:-1]:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[path[-1]] = value


def _line_of(path: Path, loc: tuple[Any, ...]) -> int | None:
    """The line (1-based) of the deepest node of `loc` found in the YAML file."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


class _Sources:
    """Which file (or command-line override) each part of the merged recipe came from."""

    def __init__(self, root: Path | None):
        self.root = root
        self.sections: dict[str, Path] = {}
        self.overrides: dict[tuple[str, ...], str] = {}
        self.nested: set[str] = set()  # sections whose file wraps them in their own name

    def where(self, loc: tuple[Any, ...]) -> str:
        for n in range(len(loc), 0, -1):
            if tuple(map(str, loc[:n])) in self.overrides:
                return f"override '{self.overrides[tuple(map(str, loc[:n]))]}'"
        if loc and str(loc[0]) in self.sections:
            path = self.sections[str(loc[0])]
            rest = loc if str(loc[0]) in self.nested else loc[1:]
        elif self.root is not None:
            path, rest = self.root, loc
        else:
            return "recipe"
        line = _line_of(path, rest) if rest else 1
        return f"{path}:{line}" if line else str(path)


def _expand_sections(data: dict[str, Any], schema: type[BaseModel], base_dir: Path, src: _Sources) -> None:
    """A section given as a string is a path to a YAML file holding that section."""
    for name, field in schema.model_fields.items():
        value = data.get(name)
        if isinstance(value, str) and submodel(field.annotation) and value.endswith((".yaml", ".yml")):
            p = Path(value)
            p = p if p.is_absolute() else (base_dir / p)
            if not p.is_file():
                try:
                    p = find_recipe(value)
                except KdcliError:
                    raise KdcliError(f"{src.where((name,))}: {name}: section file '{value}' not found (looked "
                                     f"beside the recipe, in ./recipes and the installed recipes)") from None
            section = read_yaml(p)
            if set(section) == {name} and isinstance(section[name], dict):
                section = section[name]  # a recipe file holding just this section, e.g. recipes/data/*.yaml
                src.nested.add(name)
            data[name] = section
            src.sections[name] = p


def load(schema: type[M], recipe: str | Path | None = None, overrides: list[str] | None = None,
         defaults: dict[str, Any] | None = None) -> M:
    """Validate `defaults` <- recipe file <- `key=value` overrides into `schema`."""
    data: dict[str, Any] = {}
    for k, v in (defaults or {}).items():
        data[k] = dict(v) if isinstance(v, dict) else v
    path = find_recipe(recipe) if recipe is not None else None
    src = _Sources(path)
    if path is not None:
        file_data = read_yaml(path)
        _expand_sections(file_data, schema, path.parent, src)
        for k, v in file_data.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
    for item in overrides or []:
        key, value = parse_override(item)
        keypath = resolve_key(schema, key)
        if (keypath == ["data"] and isinstance(value, str) and not value.endswith((".yaml", ".yml"))
                and submodel(schema.model_fields["data"].annotation)):
            keypath = ["data", "path"]  # data=DIR: another dataset dir (e.g. one that moved)
        _set(data, keypath, value)
        src.overrides[tuple(keypath)] = item
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise KdcliError(_describe(e, schema, src)) from None


def _describe(e: ValidationError, schema: type[BaseModel], src: _Sources) -> str:
    msgs = []
    for err in e.errors()[:3]:
        loc = tuple(err["loc"])
        field = ".".join(map(str, loc)) or "recipe"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'"
            suggestion = _suggest(field, leaf_keys(schema))
            if suggestion is None and len(loc) > 1:
                parent = ".".join(map(str, loc[:-1]))
                siblings = [k.rsplit(".", 1)[-1] for k in leaf_keys(schema) if k.startswith(parent + ".")]
                suggestion = _suggest(str(loc[-1]), siblings)
            if suggestion:
                msg += f" ({suggestion})"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        msgs.append(f"{src.where(loc)}: {field}: {msg}")
    extra = len(e.errors()) - len(msgs)
    return "; ".join(msgs) + (f"; and {extra} more" if extra > 0 else "")


def dump(model: BaseModel) -> dict[str, Any]:
    """The fully resolved recipe as plain YAML-able data (written as `args.yaml` with every run)."""
    return model.model_dump(mode="json")
