"""C++ kernels for CPU, compiled on first use with the machine's C++ compiler and loaded with
ctypes. The sources (kernels/csrc/) need neither torch's nor Python's headers, so a build takes
about a second; the shared library is cached under a key made of the source and the shared
headers beside it, the flags, the compiler and the CPU, so later starts load it at once.

Everything here is optional: without a compiler (or on a failed build) `load` returns None
once, with a warning, and the callers keep their torch path.

Environment: PAGEDSERVE_KERNEL_CACHE (cache directory; default ~/.cache/pagedserve/kernels),
CXX (the compiler; default c++). Whether they run at all is the caller's choice (the server's
`--attention-backend torch` never loads them).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    configured = os.environ.get("PAGEDSERVE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    home = Path.home()
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".cache" / "pagedserve" / "kernels"
    return Path(tempfile.gettempdir()) / f"pagedserve-kernels-{os.getuid()}"


def cpu_signature() -> str:
    """-march=native builds for this CPU: a library built on another one must not be reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _compiler_version(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else ""


def library_path(name: str, compiler: str) -> Path:
    source = (SOURCE_DIR / f"{name}.cpp").read_bytes()
    headers = [h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h"))]  # what it may include
    key = hashlib.sha256(b"\0".join([source, *headers, " ".join(FLAGS).encode(),
                                     _compiler_version(compiler).encode(),
                                     cpu_signature().encode()])).hexdigest()[:16]
    return cache_dir() / f"{name}-{key}.so"


def build(name: str, compiler: str) -> Path:
    """Compile kernels/csrc/NAME.cpp unless the cache has it; returns the library's path."""
    path = library_path(name, compiler)
    if path.exists() and path.stat().st_uid == os.getuid():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.parent.stat().st_uid != os.getuid():  # e.g. a shared /tmp: never load others' code
        raise RuntimeError(f"{path.parent} belongs to another user")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # rename: readers never see half
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-o", tmp, str(SOURCE_DIR / f"{name}.cpp")]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build_key(name: str) -> str:
    """What identifies kernels/csrc/NAME.cpp's build on this machine (source, headers, flags,
    compiler, CPU): its library's file name, without building it."""
    compiler = _compiler()
    return library_path(name, compiler).stem if compiler else f"{name}-no-compiler"


# Argument types of the exported functions: pointers (data_ptr()), int64, int, float.
PTR, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# The suffix of a kernel's C entry point per dtype, for the kernels built for fp32 and bf16.
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
Signatures = Mapping[str, tuple[list, type | None]]  # function -> (argtypes, restype)


def load(name: str, signatures: Signatures | None = None) -> ctypes.CDLL | None:
    """The compiled kernels/csrc/NAME.cpp, or None where it cannot be built (warned once).
    `signatures` are set on its functions when it is first loaded."""
    if name in _loaded:  # every kernel call asks: no lock once it is settled
        return _loaded[name]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
            lib = ctypes.CDLL(str(build(name, compiler)))
            for function, (argtypes, restype) in (signatures or {}).items():
                getattr(lib, function).argtypes = argtypes
                getattr(lib, function).restype = restype
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            logger.warning("native CPU kernel %s unavailable, using the torch path: %s",
                           name, e)
        _loaded[name] = lib
        return lib
