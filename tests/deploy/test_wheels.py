"""The wheels step for a GPU machine without a package index: the download command pins this environment's
versions for CPython 3.12 on manylinux; the install puts wheels into a target folder that Python then imports
from (a wheel built here, offline)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from kdcli.deploy import wheels


def test_download_pins_this_environment_for_cpython_3_12(capsys):
    assert wheels.main(["download", "somewhere", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert "manylinux2014_x86_64" in cmd and cmd[cmd.index("-d") + 1] == "somewhere"
    for name in wheels.MISSING:
        assert f"{name}=={metadata.version(name)}" in cmd


def test_install_into_a_target_then_import(tmp_path: Path):
    pkg = tmp_path / "src"
    (pkg / "kdcli_probe").mkdir(parents=True)
    (pkg / "kdcli_probe" / "__init__.py").write_text("VALUE = 42\n")
    (pkg / "pyproject.toml").write_text('[project]\nname = "kdcli-probe"\nversion = "1.0"\n'
                                        '[build-system]\nrequires = ["setuptools"]\n'
                                        'build-backend = "setuptools.build_meta"\n')
    whl = tmp_path / "whl"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(whl),
                    str(pkg)], check=True, capture_output=True)
    site = tmp_path / "site"
    assert wheels.main(["install", str(whl), "--target", str(site)]) == 0
    out = subprocess.run([sys.executable, "-c", "import kdcli_probe; print(kdcli_probe.VALUE)"], text=True,
                         capture_output=True, env={"PYTHONPATH": str(site)})
    assert out.stdout.strip() == "42", out.stderr


def test_install_without_wheels_says_how_to_make_them(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "kdcli.deploy.wheels", "install", str(tmp_path)], text=True,
                         capture_output=True)
    assert res.returncode == 1 and "no .whl files" in res.stderr and "wheels download" in res.stderr
