"""Where datasets and runs live by default: `KDCLI_DATASETS` (./datasets) and `KDCLI_RUNS` (./runs)."""

from __future__ import annotations

import os
from pathlib import Path

def datasets_root() -> Path:
    return Path(os.environ.get("KDCLI_DATASETS", "datasets"))


def runs_root() -> Path:
    return Path(os.environ.get("KDCLI_RUNS", "runs"))


def resolve_dataset(path: str | Path) -> Path:
    """A dataset dir named in a recipe: as given if it exists or is absolute, else under `KDCLI_DATASETS`."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return datasets_root() / p
