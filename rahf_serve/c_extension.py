"""Building and loading the engine's C extension modules (csrc/), once per source, flags and Python ABI.

Each is compiled on first use with `$CC` or `cc` against this Python's headers into `<cache>/kernels`
(`RAHF_SERVE_CACHE`, default ~/.cache/rahf-serve) and imported from there; a cached build needs no
compiler. Where there is no compiler or no Python headers (Debian's python3-dev) or the build fails, the
caller gets `KernelUnavailable` saying why, and keeps torch's operators.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Generic, TypeVar

import torch

from .errors import RahfError

log = logging.getLogger(__name__)

T = TypeVar("T")

CSRC = Path(__file__).with_name("csrc")
"""the extensions' sources and the headers they share (on the include path of every build, so a source
copied elsewhere, such as another commit's kernel for a benchmark, still finds them)"""


class KernelUnavailable(RahfError):
    """A C extension cannot be built or loaded here (the reason says why)."""


def include() -> str:
    """This Python's header directory."""
    return sysconfig.get_paths()["include"]


def flags() -> list[str]:
    """The compiler flags every extension is built with (OpenMP is the caller's choice)."""
    out = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp-simd", f"-I{include()}", f"-I{CSRC}"]
    if platform.system() == "Darwin":  # the interpreter provides Python's symbols when the module is imported
        out += ["-undefined", "dynamic_lookup"]
    if platform.machine().lower() in ("x86_64", "amd64"):  # what torch found this CPU has
        found = torch.backends.cpu.get_cpu_capability()
        if found in ("AVX2", "AVX512"):
            out += ["-mavx2", "-mfma"]
        if found == "AVX512":  # torch's AVX-512 needs these four; loops the compiler vectorises stay 256 bits
            out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=256"]
    return out


def torch_on_libgomp() -> bool:
    """Whether torch's threads are GNU OpenMP's, loaded in this process: an extension built with -fopenmp then
    binds to that runtime (by its soname) and shares work between torch's threads rather than threads of its
    own that would compete with them."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "/libgomp" in Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return False


def _compile(cc: str, flags: list[str], source: Path, directory: Path, path: Path) -> None:
    if shutil.which(cc) is None:
        raise KernelUnavailable(f"no C compiler ({cc!r} is not on PATH; set CC)")
    headers = include()
    if not (Path(headers) / "Python.h").is_file():
        raise KernelUnavailable(f"no Python headers at {headers} (on Debian and Ubuntu: apt install python3-dev)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed: a process that loads it never sees half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
    except OSError as err:
        raise KernelUnavailable(f"cannot write to {directory}: {err}") from err
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise KernelUnavailable(f"{cc} failed ({done.returncode}): {done.stderr.strip()[:500]}")
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as err:  # a compiler that vanished or hung
        raise KernelUnavailable(f"{cc} could not build {source.name}: {err}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)


def build(source: Path, name: str, directory: Path, cc: str, extra: Sequence[str] = ()) -> tuple[Path, ModuleType]:
    """Compile `source` (unless this source, these flags and this Python's ABI are cached in `directory`) and
    import the module `name` it defines (`PyInit_<name>`). Returns the built file and the module;
    KernelUnavailable if it cannot be built or loaded."""
    all_flags = [*flags(), *extra]
    abi = str(sysconfig.get_config_var("EXT_SUFFIX"))
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # what it may include
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(all_flags).encode() + platform.machine().encode()
                         + abi.encode()).hexdigest()[:16]
    path = directory / f"{source.stem}-{key}.so"
    if not path.is_file():
        _compile(cc, all_flags, source, directory, path)
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, str(path))
        module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, loader, origin=str(path)))
        loader.exec_module(module)
    except (ImportError, OSError, AttributeError) as err:
        raise KernelUnavailable(f"cannot load {path}: {err}") from err
    return path, module


def build_for_torch_threads(source: Path, name: str, directory: Path | None = None,
                            cc: str | None = None) -> tuple[Path, ModuleType]:
    """`build` (into `kernel_directory()` with `compiler()` unless given), with -fopenmp where torch's threads
    are GNU OpenMP's (the extension then shares work between them), else, or if that build fails (logged),
    without: the extension's work stays on the calling thread."""
    directory = directory or kernel_directory()
    cc = cc or compiler()
    if torch_on_libgomp():
        try:
            return build(source, name, directory, cc, ["-fopenmp"])
        except KernelUnavailable as err:
            log.info("%s: the build with OpenMP failed (%s); building it without OpenMP, on one thread", name, err)
    return build(source, name, directory, cc)


def compiler() -> str:
    """The C compiler to build with: `$CC`, else `cc`."""
    return os.environ.get("CC") or "cc"


def kernel_directory() -> Path:
    """Where built extensions are cached."""
    from .models import cache_root

    return cache_root() / "kernels"


class BuiltOnce(Generic[T]):
    """An extension built at most once per process and shared: `get()` is it, or None where it cannot be, with
    the reason logged once; `env`=0 turns it off."""

    def __init__(self, what: str, env: str, fallback: str, make: Callable[[], T], logger: logging.Logger) -> None:
        self.what, self.env, self.fallback, self.make, self.log = what, env, fallback, make, logger
        self._lock = threading.Lock()
        self._built: list[T | None] = []

    def get(self) -> T | None:
        with self._lock:
            if not self._built:
                value = None
                if os.environ.get(self.env, "1") == "0":
                    self.log.info("%s off (%s=0): %s", self.what, self.env, self.fallback)
                else:
                    try:
                        value = self.make()
                    except KernelUnavailable as err:
                        self.log.warning("%s unavailable, %s: %s", self.what, self.fallback, err)
                self._built.append(value)
            return self._built[0]
