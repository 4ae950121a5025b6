"""Raw data sources as plug-ins: raw files in, a dataset dir out (see `kdcli.data.coco`).

A source is one module of this package that registers a `Source`: its options (which `kdcli prepare <name>`
turns into command-line options), its default raw folder under `<datasets>/raw/`, the function that converts, and
optionally a synthetic generator (`kdcli prepare synthetic --kind <name>`). Nothing else needs editing to add one.
Modules import their heavy dependencies inside functions, so discovering every source stays cheap at start-up.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdcli import paths

INFRASTRUCTURE = {"common"}  # modules of the package that are not sources


@dataclass(frozen=True)
class Option:
    """One command-line option of a source: `--name-with-dashes` unless `flags` says otherwise."""

    name: str
    type: Any  # int, float, str, bool, Path, or `X | None`
    default: Any
    help: str
    flags: tuple[str, ...] = ()  # e.g. ("--link/--copy",)
    required: bool = False


@dataclass(frozen=True)
class Synthetic:
    """A generator writing this source's raw format: `module.generate(out, images, size, seed, **extra)`."""

    module: str
    images: int  # default count
    size: int  # default image side (meaning per source: see the module)
    extra: tuple[str, ...] = ()  # generator options beyond images/size/seed (e.g. test_images)


@dataclass(frozen=True)
class Source:
    name: str  # `kdcli prepare <name>`
    title: str  # the command's help, first paragraph
    example: str
    options: tuple[Option, ...]
    run: Callable[[Path, Path, dict[str, Any]], dict[str, Any]]  # (src, out, options) -> dataset.yaml content
    out_name: Callable[[Path, dict[str, Any]], str]  # default dataset dir name under <datasets>
    raw_dir: str | None = None  # default --src under <datasets>/raw; None: --src is required
    src_help: str = "Raw folder"
    out_help: str = "<name>"  # what the default dataset dir is called, for --help
    synthetic: Synthetic | None = None

    def raw_path(self) -> Path:
        return paths.datasets_root() / "raw" / (self.raw_dir or self.name)


# options most sources share
SEED = Option("seed", int, 0, "Seed of the val split (and of synthetic data).")
LINK = Option("link", bool, True, "Symlink images into the dataset dir, or copy them.", ("--link/--copy",))
FORCE = Option("force", bool, False, "Replace an existing --out (built aside, swapped at the end).")
SKIP_BAD = Option("skip_bad_images", bool, False, "Leave out images that fail to decode (counted) instead of "
                                                   "stopping.")


def calling(prepare: Callable[..., dict[str, Any]], **convert: Callable[[Any], Any]) -> Callable[..., dict[str, Any]]:
    """A `Source.run` for a converter whose parameters carry the options' names: `prepare(src, out=out, ...)`,
    `--link/--copy` given as its `images` mode, and `convert[name]` applied to an option's given value (text the
    command line cannot type, e.g. `--folds 1-5`)."""

    def run(src: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: convert[k](v) if k in convert and v is not None else v for k, v in options.items() if k != "link"}
        return prepare(src, out=out, images="link" if options.get("link", True) else "copy", **kwargs)

    return run


REGISTRY: dict[str, Source] = {}


def register(source: Source) -> Source:
    REGISTRY[source.name] = source
    return source


def discover() -> dict[str, Source]:
    """Import every source module of the package once; returns the registry."""
    package = importlib.import_module(__name__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in INFRASTRUCTURE:
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY
