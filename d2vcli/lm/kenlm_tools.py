"""The KenLM programs `lmplz` (estimate an ARPA from text) and `build_binary` (ARPA -> binary).

They are taken from PATH, else from the cache ($D2V_CACHE/kenlm or ~/.cache/d2vcli/kenlm),
else built there once from the `kenlm` source distribution on the package index (cmake +
make of just those two targets, about a minute or two). The Python `kenlm` wheel does not
include them. A lock file in the cache makes concurrent callers build them only once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Literal, Optional

from d2vcli.lm.formats import LMError
from d2vcli.ui import console, progress

# Debian packages needed to build lmplz / build_binary (kenlm BUILDING + its CMakeLists).
APT_PACKAGES = (
    "build-essential", "cmake", "libboost-program-options-dev", "libboost-system-dev",
    "libboost-thread-dev", "libboost-test-dev", "zlib1g-dev", "libbz2-dev", "liblzma-dev",
)
APT_FIX = "sudo apt-get install " + " ".join(APT_PACKAGES)
KENLM_TOOLS = ("lmplz", "build_binary")
ENV_CACHE = "D2V_CACHE"
ENV_KENLM_SOURCE = "D2V_KENLM_SOURCE"  # a kenlm sdist (.tar.gz) or source dir, for offline machines


@dataclass(frozen=True)
class KenLMTools:
    lmplz: Path
    build_binary: Path
    source: Literal["path", "cache", "built"]


def kenlm_cache_dir() -> Path:
    """$D2V_CACHE/kenlm, else ~/.cache/d2vcli/kenlm."""
    base = os.environ.get(ENV_CACHE)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "d2vcli") / "kenlm"


def _tools_in(bindir: Path) -> Optional[tuple[Path, Path]]:
    paths = [bindir / t for t in KENLM_TOOLS]
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return paths[0], paths[1]
    return None


def locate_kenlm_tools() -> Optional[KenLMTools]:
    """lmplz and build_binary from PATH or the cache, without building anything."""
    found = [shutil.which(t) for t in KENLM_TOOLS]
    if all(found):
        return KenLMTools(Path(found[0]), Path(found[1]), "path")
    cached = _tools_in(kenlm_cache_dir() / "bin")
    if cached:
        return KenLMTools(cached[0], cached[1], "cache")
    return None


def kenlm_build_problems() -> list[str]:
    """What is missing to build the KenLM tools here (empty: buildable). Used by `d2v doctor`."""
    problems = []
    if not shutil.which("cmake"):
        problems.append("cmake is not installed")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        problems.append("no C++ compiler (c++, g++ or clang++)")
    if not shutil.which("make"):
        problems.append("make is not installed")
    include_dirs = [Path(p) for p in ("/usr/include", "/usr/local/include", "/opt/homebrew/include")]
    include_dirs += [Path(p) for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    if os.environ.get("BOOST_ROOT"):
        include_dirs.append(Path(os.environ["BOOST_ROOT"]) / "include")
    for header, what in (("boost/program_options.hpp", "Boost program_options headers"),
                         ("boost/thread.hpp", "Boost thread headers"), ("zlib.h", "zlib headers")):
        if not any((d / header).exists() for d in include_dirs):
            problems.append(f"{what} ({header}) not found")
    return problems


def find_kenlm_tools(build: bool = True) -> KenLMTools:
    """lmplz and build_binary: on PATH, cached, or (with `build`) built into the cache now.

    Concurrent callers (parallel test workers, two shells) wait on a lock file, so the tools
    are built at most once per cache directory.
    """
    tools = locate_kenlm_tools()
    if tools or not build:
        if tools:
            return tools
        raise LMError(
            "the KenLM tools lmplz and build_binary were not found on PATH or in "
            f"{kenlm_cache_dir() / 'bin'}. `d2v prepare lm` builds them automatically; "
            "`d2v doctor` says whether this machine can."
        )
    cache = kenlm_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".build.lock"):
        cached = _tools_in(cache / "bin")  # another process may have built them while we waited
        if cached:
            return KenLMTools(cached[0], cached[1], "cache")
        return build_kenlm_tools(cache)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)



def build_kenlm_tools(cache: Path) -> KenLMTools:
    """Download the kenlm sdist, then cmake + make `lmplz` and `build_binary` into `cache`/bin.

    Progress is shown as a bar (download, configure, compile percent from make). On failure the
    error names what is missing and the Debian packages to install; the build log is kept.
    """
    problems = [p for p in kenlm_build_problems() if "not found" not in p]  # headers: cmake decides
    if problems:
        raise LMError(
            "cannot build the KenLM tools (lmplz, build_binary): " + "; ".join(problems) + ".\n"
            f"Install the build dependencies: {APT_FIX}\n"
            "or install lmplz and build_binary yourself (https://github.com/kpu/kenlm) and put them on PATH."
        )
    console.print(f"[bold]Building the KenLM tools[/] (lmplz, build_binary) into {cache} (once per machine)")
    work = Path(tempfile.mkdtemp(prefix="kenlm-build-", dir=cache))
    log_path = cache / "build.log"
    ok = False
    try:
        with progress() as bar, open(log_path, "w") as log:
            task = bar.add_task("kenlm: fetch source", total=100)
            src = _kenlm_source(work, log)
            bar.update(task, completed=5, description="kenlm: configure")
            build = work / "build"
            _run_logged(
                ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DCOMPILE_TESTS=OFF", "-DENABLE_PYTHON=OFF"],
                log, log_path, "configuring kenlm (cmake) failed",
            )
            bar.update(task, completed=10, description="kenlm: compile")
            jobs = str(max(1, os.cpu_count() or 1))
            cmd = ["cmake", "--build", str(build), "--target", "lmplz", "build_binary", "--parallel", jobs]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                m = re.match(r"\[\s*(\d+)%\]", line)
                if m:
                    bar.update(task, completed=10 + 0.9 * int(m.group(1)))
            if proc.wait() != 0:
                raise LMError(_build_failure("compiling kenlm (make) failed", log_path))
            bar.update(task, completed=100)
        bindir = cache / "bin"
        bindir.mkdir(exist_ok=True)
        for tool in KENLM_TOOLS:
            tmp = bindir / f".{tool}.tmp"
            shutil.copy2(build / "bin" / tool, tmp)
            os.replace(tmp, bindir / tool)
        ok = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if ok:
            log_path.unlink(missing_ok=True)
    return KenLMTools(bindir / "lmplz", bindir / "build_binary", "built")


def _kenlm_source(work: Path, log: IO[str]) -> Path:
    """The kenlm source tree: $D2V_KENLM_SOURCE (sdist or dir), else the sdist from the package index."""
    given = os.environ.get(ENV_KENLM_SOURCE)
    if given and Path(given).is_dir():
        return Path(given)
    if given:
        archive = Path(given)
    else:
        # --no-build-isolation: pip only reads the sdist's metadata; with isolation it would
        # build its build requirement `cmake` from source, which takes many minutes.
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--no-build-isolation", "--disable-pip-version-check", "kenlm", "-d", str(work)]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(res.stdout)
        archives = sorted(work.glob("kenlm-*.tar.gz")) + sorted(work.glob("kenlm-*.zip"))
        if res.returncode != 0 or not archives:
            tail = "\n".join(res.stdout.strip().splitlines()[-5:])
            raise LMError(
                "could not download the kenlm source distribution to build lmplz and build_binary "
                f"(`pip download --no-binary :all: --no-deps kenlm` failed):\n{tail}\n"
                f"Without network access, download a kenlm sdist elsewhere and set {ENV_KENLM_SOURCE}=/path/to/"
                "kenlm-X.tar.gz, or install lmplz and build_binary yourself and put them on PATH."
            )
        archive = archives[-1]
    dest = work / "src"
    dest.mkdir()
    if archive.suffix == ".zip":
        zipfile.ZipFile(archive).extractall(dest)
    else:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python < 3.11.4
                tar.extractall(dest)
    roots = [p for p in dest.iterdir() if (p / "CMakeLists.txt").exists()]
    if not roots:
        raise LMError(f"{archive} does not look like the kenlm source (no CMakeLists.txt)")
    return roots[0]


def _run_logged(cmd: list[str], log: IO[str], log_path: Path, what: str) -> None:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(res.stdout)
    log.flush()
    if res.returncode != 0:
        raise LMError(_build_failure(what, log_path, res.stdout))


def _build_failure(what: str, log_path: Path, output: str = "") -> str:
    if not output and log_path.exists():
        output = log_path.read_text(errors="replace")
    tail = "\n".join(output.strip().splitlines()[-8:])
    return (
        f"{what}; the KenLM tools lmplz and build_binary could not be built.\n{tail}\n"
        f"Full log: {log_path}\n"
        f"Install the build dependencies and run again: {APT_FIX}\n"
        "(or install lmplz and build_binary yourself and put them on PATH)"
    )
