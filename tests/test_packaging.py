"""A real install: build the wheel, install it into a fresh venv, and run `d2v` from outside the repository.

What this guards: everything a command needs at run time (presets, sub-packages) ships in the
wheel, and the version comes from `d2vcli.__version__`. Offline: the wheel is built with this
interpreter's setuptools (no build isolation), and the venv sees this interpreter's packages
(torch, numpy, ...) through a .pth file, so nothing is downloaded.

Run: python -m pytest -q tests/test_packaging.py   (about 20 s)
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import d2vcli
from d2vcli.config import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def _clean_env() -> dict:
    """This environment without what would make the venv import the source tree instead of the wheel."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _run(cmd: list, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (setuptools' build/ dir in the repository may
    hold files that no longer exist, and would put them in the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "d2vcli", src / "d2vcli", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         cwd=tmp)
    [whl] = (tmp / "dist").glob("d2vcli-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed, which also sees this interpreter's packages."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    # Installed before the .pth below exists, so pip sees no other d2vcli (say, an editable one) to replace.
    _run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], cwd=venv.parent)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv.parent)
    outer = [*site.getsitepackages(), site.getusersitepackages()]
    # Plain paths, appended after the venv's own site-packages: the wheel's d2vcli comes first,
    # and .pth files in those directories (an editable d2vcli's among them) are not executed.
    Path(purelib.stdout.strip(), "outer-site-packages.pth").write_text("\n".join(outer) + "\n")
    return venv


def test_wheel_ships_the_presets_and_the_version(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"d2vcli/presets/{fname}" for _, fname in PRESETS.values()} <= names
    assert "d2vcli/cli.py" in names and not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert wheel.name.startswith(f"d2vcli-{d2vcli.__version__}-")
    [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    assert f"Version: {d2vcli.__version__}\n" in metadata
    assert "Requires-Dist: soxr" in metadata and "Provides-Extra: report" in metadata


def test_installed_d2v_runs_from_outside_the_repository(venv, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    probe = _run([venv / "bin" / "python", "-c",
                  "import d2vcli, d2vcli.config as c; print(d2vcli.__file__); print(c.PRESETS_DIR)"], cwd=scratch)
    module, presets = (Path(line).resolve() for line in probe.stdout.split())
    assert module.is_relative_to(venv.resolve()), f"imported {module}, not the wheel's d2vcli"
    assert presets.is_relative_to(venv.resolve())

    d2v = venv / "bin" / "d2v"
    shown = _run([d2v, "config", "show", "--preset", "speech-large"], cwd=scratch)
    assert "model.embed_dim" in shown.stdout and "1024" in shown.stdout
    listed = _run([d2v, "config", "presets"], cwd=scratch)
    assert all(name in listed.stdout for name in PRESETS)
    work = tmp_path / "work"
    _run([d2v, "prepare", "synthetic", "--size", "tiny", "--workers", "1", "--workdir", work], cwd=scratch)
    assert (work / "data" / "train.jsonl").is_file() and (work / "data" / "dict.ltr.txt").is_file()
