"""The C kernel for one-token LoRA rows on CPU (csrc/lora_rows.c), built on first use with the system's compiler.

On a CPU decode step each row's LoRA is two small matrix-vector products; torch's batched matmul spends
more on each of them than reading its factors takes, so eight rows on eight different adapters cost a
SmolLM2-135M step about 19% against a 5% floor of reading the bytes. The kernel does a module's rows in
one call, each row one pass over its factors where they lie (benchmarks/lora_layout_bench.py compares).

It is a Python extension module compiled once per source, flags and Python ABI into `<cache>/kernels`
(`RAHF_SERVE_CACHE`, default ~/.cache/rahf-serve) with `$CC` or `cc` against this Python's headers, and
imported from there; the structs it reads are ctypes Structures the slots own. Where there is no compiler
or no Python headers (Debian's python3-dev), the build fails, or `RAHF_LORA_KERNEL=0`, `row_kernel()` says
why once in the log and the slots keep torch's products, which give the same results up to float rounding.

Where torch's threads are GNU OpenMP's (its Linux wheels), the kernel is built with -fopenmp, binds to that
same runtime, and shares a site's rows between torch's threads; elsewhere, or if that build fails, a site
runs on the calling thread alone.
"""

from __future__ import annotations

import ctypes
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
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import RahfError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_rows.c"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class KernelUnavailable(RahfError):
    """The row kernel cannot be built or loaded here (the reason says why)."""


class Rows(ctypes.Structure):
    """A step's one-token rows (C `struct rahf_rows`): count, positions (NULL: 0 .. n-1), slots, rank."""

    _fields_ = [("n", _I64), ("tokens", _PTR), ("slots", _PTR), ("r", _I64)]


class Factors(ctypes.Structure):
    """A module's slot tensors (C `struct rahf_factors`): A [slots, rank, in], B transposed [slots, rank, out],
    and their element type (a `FACTOR_DTYPES` index)."""

    _fields_ = [("in_features", _I64), ("out_features", _I64), ("A", _PTR), ("a_stride", _I64), ("B", _PTR),
                ("b_stride", _I64), ("dtype", _I64)]


FACTOR_DTYPES = (torch.float32, torch.bfloat16)
"""The factor types the kernel reads (C `RAHF_F32`, `RAHF_BF16`); its inputs and outputs are float32."""


class Plan(ctypes.Structure):
    """A module group's plan for the step as the site call reads it (C `struct rahf_plan`): `state` NONE (no row
    uses its modules' slots), ROWS (every LoRA row is one token, at `rows`) or OTHER (more than the kernel
    does), the step's token count, and how many threads a site may share its rows between (torch's count)."""

    NONE, ROWS, OTHER = 0, 1, 2
    _fields_ = [("state", _I64), ("total", _I64), ("rows", _PTR), ("threads", _I64)]


class SiteModule(ctypes.Structure):
    """One module of a site (C `struct rahf_site_module`): the address of the cell holding its group's `Plan`'s
    address, of its `Factors`, and the column its output starts at."""

    _fields_ = [("plan", _PTR), ("factors", _PTR), ("column", _I64)]


class Site(ctypes.Structure):
    """Modules reading one input [total, ldx] and adding into one output [total, ldy] (C `struct rahf_site`):
    their count and the address of their `SiteModule` array."""

    _fields_ = [("n", _I64), ("ldx", _I64), ("ldy", _I64), ("modules", _PTR)]


def rows_for(tokens: torch.Tensor | None, slots: torch.Tensor, rank: int) -> Rows:
    """The struct for int64 `slots` (and positions `tokens`); the tensors must outlive its use."""
    return Rows(slots.numel(), None if tokens is None else tokens.data_ptr(), slots.data_ptr(), rank)


def factors_for(slot_a: torch.Tensor, slot_b: torch.Tensor) -> Factors:
    """The struct for slot tensors [slots, rank, in] and [slots, rank, out], contiguous, of one of
    `FACTOR_DTYPES`."""
    if not (slot_a.is_contiguous() and slot_b.is_contiguous()):
        raise ValueError("the row kernel reads contiguous slot tensors")
    if slot_a.dtype != slot_b.dtype or slot_a.dtype not in FACTOR_DTYPES:
        raise ValueError(f"the row kernel reads float32 or bfloat16 factors, not {slot_a.dtype} and {slot_b.dtype}")
    return Factors(slot_a.shape[2], slot_b.shape[2], slot_a.data_ptr(), slot_a.stride(0), slot_b.data_ptr(),
                   slot_b.stride(0), FACTOR_DTYPES.index(slot_a.dtype))


class RowKernel:
    """The kernel's functions (see csrc/lora_rows.c), taking addresses and sizes as ints and adding each row's
    LoRA to y in place: `rows(&Rows, &Factors, x, ldx, y, ldy)` for one module, `site(&Site, total, x, y)`
    for modules sharing x and y (True when done, False when it did nothing). Nothing is checked below these
    calls: `SlotLinear` and `SlotSite` own the shapes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        loader = importlib.machinery.ExtensionFileLoader("lora_rows", str(path))
        module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("lora_rows", loader, origin=str(path)))
        loader.exec_module(module)
        self.rows: Callable[[int, int, int, int, int, int], None] = module.rows
        self.site: Callable[[int, int, int, int], bool] = module.site
        self.openmp = bool(getattr(module, "openmp", False))
        """whether a site's rows are shared between torch's OpenMP threads (built with -fopenmp)"""


def _include() -> str:
    return sysconfig.get_paths()["include"]


def _flags() -> list[str]:
    flags = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp-simd", f"-I{_include()}"]
    if platform.system() == "Darwin":  # the interpreter provides Python's symbols when the module is imported
        flags += ["-undefined", "dynamic_lookup"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        flags += ["-mavx2", "-mfma"]  # what torch found this CPU has (AVX2 or AVX-512, which includes both)
    return flags


def torch_on_libgomp() -> bool:
    """Whether torch's threads are GNU OpenMP's, loaded in this process: a kernel built with -fopenmp then
    binds to that runtime (by its soname) and shares a site's rows between torch's threads rather than
    threads of its own that would compete with them."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "/libgomp" in Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return False


def _compile(cc: str, flags: list[str], source: Path, directory: Path, path: Path) -> None:
    if shutil.which(cc) is None:
        raise KernelUnavailable(f"no C compiler ({cc!r} is not on PATH; set CC)")
    include = _include()
    if not (Path(include) / "Python.h").is_file():
        raise KernelUnavailable(f"no Python headers at {include} (on Debian and Ubuntu: apt install python3-dev)")
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


def build_row_kernel(cache: Path | None = None, compiler: str | None = None, source: Path = SOURCE) -> RowKernel:
    """Compile (unless this source, these flags and this Python's ABI are cached) and load the kernel;
    KernelUnavailable if not. `source`: another C file defining the module `lora_rows` (benchmarks put a
    no-op in the kernel's place)."""
    from .models import cache_root

    cc = compiler or os.environ.get("CC") or "cc"
    directory = cache or cache_root() / "kernels"
    flags = _flags()
    if torch_on_libgomp():
        try:
            return _build(cc, [*flags, "-fopenmp"], source, directory)
        except KernelUnavailable as err:
            log.info("LoRA row kernel: the build with OpenMP failed (%s); building it without OpenMP, each site "
                     "on one thread", err)
    return _build(cc, flags, source, directory)


def _build(cc: str, flags: list[str], source: Path, directory: Path) -> RowKernel:
    abi = str(sysconfig.get_config_var("EXT_SUFFIX"))
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + platform.machine().encode()
                         + abi.encode()).hexdigest()[:16]
    path = directory / f"{source.stem}-{key}.so"
    if not path.is_file():  # a cached build needs no compiler
        _compile(cc, flags, source, directory, path)
    try:
        return RowKernel(path)
    except (ImportError, OSError, AttributeError) as err:
        raise KernelUnavailable(f"cannot load {path}: {err}") from err


_lock = threading.Lock()
_built: list[RowKernel | None] = []


def row_kernel() -> RowKernel | None:
    """The kernel, built at most once per process; None (with the reason logged once) where it cannot be."""
    with _lock:
        if not _built:
            kernel = None
            if os.environ.get("RAHF_LORA_KERNEL", "1") == "0":
                log.info("LoRA row kernel off (RAHF_LORA_KERNEL=0): one-token rows use torch's batched matmul")
            else:
                try:
                    kernel = build_row_kernel()
                except KernelUnavailable as err:
                    log.warning("LoRA row kernel unavailable, one-token rows use torch's batched matmul: %s", err)
            _built.append(kernel)
        return _built[0]
