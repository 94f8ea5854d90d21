"""CPU kernels compiled from C++ on first use and called through the XLA FFI.

One so far: int8_matmul (int8_matmul.py wraps int8_matmul.cc).

The source is compiled with the system C++ compiler (`$CXX`, else g++) the first time a process needs
it, into `$JAXINFER_CACHE_DIR/cpu_kernels` (default ~/.cache/jaxinfer/cpu_kernels), under a name that
hashes the source, jaxlib's version, the compiler and its flags; the library is written under a
temporary name and renamed, so processes building at once never load a partial file. Where there is
no compiler or the build fails, `available()` is False, one warning says why, and callers keep the XLA
path. `JAXINFER_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_matmul.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
TARGETS = {False: "jaxinfer_int8_matmul_kn", True: "jaxinfer_int8_matmul_nk"}  # by `transposed`


def cache_dir() -> Path:
    root = os.environ.get("JAXINFER_CACHE_DIR") or Path.home() / ".cache" / "jaxinfer"
    return Path(root) / "cpu_kernels"


def _cpu_id() -> str:
    """What -march=native compiles for: the machine and its CPU's feature flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}"


def _build() -> Path:
    """The compiled library, built now unless the cache holds it; raises OSError or CalledProcessError."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), cxx.encode(), " ".join(FLAGS).encode()):
        key.update(part + b"\0")
    key.update(_cpu_id().encode())
    out = cache_dir() / f"int8_matmul-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _registered() -> Path:
    """The library, built if need be, its handlers registered with XLA. Once per process: XLA refuses a
    second registration of a name at other addresses (a library rebuilt from an edited source)."""
    lib = ctypes.CDLL(str(_build()))
    for name in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return Path(lib._name)


@functools.cache
def load() -> str | None:
    """None when the kernels are built and registered with XLA; otherwise why not (logged once)."""
    if os.environ.get("JAXINFER_CPU_KERNELS", "1") == "0":
        return "JAXINFER_CPU_KERNELS=0"
    try:
        _registered()
    except subprocess.CalledProcessError as e:
        why = f"compiling {SOURCE.name} failed ({e.stderr.strip()[-500:]})"
    except Exception as e:  # noqa: BLE001 - any failure keeps the XLA path, with its reason
        why = f"{type(e).__name__}: {e}"
    else:
        return None
    log.warning("CPU int8 matmul kernel unavailable, using the XLA path: %s", why)
    return why


def available() -> bool:
    """Whether `int8_matmul` can run: the kernel built and loaded (builds it on the first call)."""
    return load() is None
