"""Multi-LoRA slots: adapters and exact blends in preallocated tensors, each batch row naming its slot.

Every targeted Linear of a plain causal LM is replaced by a `SlotLinear` that holds, for each slot, A
[max_rank, in] and B transposed, [max_rank, out] (a slot's first r rows are then one contiguous block), the
LoRA scaling folded into B, zero-padded above the adapter's rank and all zero in modules the adapter does
not touch. The engine sets each row's slot once per step (`set_rows`); a wrapped layer adds B_row (A_row x),
reading the factors where they lie: on CPU in float32, every LoRA token (a prompt chunk's too) goes through
a small C kernel (`rahf_serve.lora_kernel`) as a one-token row, one call for all of them in all the modules
sharing an input (`SlotSite`); elsewhere, or without a C compiler, two batched matmuls do it (one slot in
use; one-token rows on nearby slots, as a band; a prompt chunk), gathering copies of the factors only for
rows on widely spread slots. Nothing is registered per forward (PEFT's mixed-batch path hooks every LoRA
layer on every call), and the cost follows the batch, never the number of resident adapters. Factors are
stored in the model's dtype, or in another (`--lora-dtype`): bfloat16 under a float32 model halves the bytes
an adapter row reads, which the kernel widens as it reads them and torch's products take widened, or, under
bfloat16 products (`matmul_dtype`), the kernel multiplies in bfloat16 dot products.

A row whose adapter has no weights in a module costs that module nothing: modules are grouped by the set
of slots that have weights in them, and each group gets its own row plan per step, in which such rows are
base rows. Adapters with different targets (PEFT's default q/v beside one on every Linear) then read
only the factors that are there: on a memory-bound decode step, bytes are time.

PEFT still trains, writes and validates bundles; this module only reads their state dict and config.
Slots beyond `max_loras` are taken back least recently used first, never from a pinned (running) name.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .bundle.layout import LORA_KEY, PEFT_PREFIX, WEIGHTS_FILE, Bundle
from .errors import BundleError, CorruptBundleError, FingerprintMismatch, LimitExceeded, RahfError
from .lora_kernel import (
    FACTOR_DTYPES,
    Plan,
    RowKernel,
    Site,
    SiteModule,
    build_row_kernel,
    factors_for,
    row_kernel,
    rows_for,
)

log = logging.getLogger(__name__)

# Fields that only shape training or initialisation, or describe the bundle: the stored weights say it all.
_IGNORED_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying", "bias",
}


class SlotsExhausted(RahfError):
    """Every LoRA slot holds an adapter that a running request uses."""

    status = 503
    code = "lora_slots_full"


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA ready for a slot: module path -> (A [r, in], B [out, r]), the scaling folded into B."""

    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)


def check_config(config: Mapping[str, Any], name: str = "adapter") -> None:
    """Raise BundleError for any config field that would change the forward pass beyond plain LoRA."""
    if config.get("use_dora"):
        raise BundleError(f"{name}: DoRA adapters (use_dora) are not supported by the serving engine; "
                          "merge or retrain as plain LoRA")
    if str(config.get("bias", "none")) != "none":
        raise BundleError(f"{name}: bias={config['bias']!r} is not supported (only 'none')")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise BundleError(f"{name}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = sorted(k for k, v in config.items() if k not in _IGNORED_FIELDS and v)
    if unsupported:
        raise BundleError(f"{name}: adapter_config fields {unsupported} are not supported by the serving "
                          "engine (plain LoRA only)")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching a suffix of the path.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def parse_lora(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], name: str = "adapter") -> LoraWeights:
    """A PEFT state dict (`base_model.model.<module>.lora_A.weight` ...) and its config as LoraWeights."""
    check_config(config, name)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = LORA_KEY.match(key)
        if not match or not key.startswith(PEFT_PREFIX):
            raise CorruptBundleError(f"{name}: unexpected tensor {key!r} (only LoRA A/B weights are allowed)")
        pairs.setdefault(match["module"][len(PEFT_PREFIX):], {})[match["ab"]] = tensor
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            raise CorruptBundleError(f"{name}: LoRA pair for {module} is incomplete or its shapes disagree")
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 0)))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r)))
        if ab["A"].shape[0] != r:
            raise CorruptBundleError(f"{name}: {module} has rank {ab['A'].shape[0]} but its config says {r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = (ab["A"].float(), ab["B"].float() * scale)
    if not modules:
        raise CorruptBundleError(f"{name}: no LoRA weights")
    return LoraWeights(modules)


def read_lora(bundle: Bundle, name: str | None = None) -> LoraWeights:
    """The LoRA of a bundle already checked by `read_bundle`, read from its safetensors file."""
    from safetensors.torch import load_file

    return parse_lora(load_file(bundle.path / WEIGHTS_FILE), bundle.adapter_config, name or bundle.path.name)


def blend_lora(components: Sequence[tuple[LoraWeights, float]]) -> LoraWeights:
    """sum_i w_i B_i A_i as one LoRA of rank sum(r_i): A rows stacked, w_i B_i columns stacked (exact)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for weights, w in components:
        if w == 0.0:  # contributes exactly nothing; leaving it out keeps the rank down
            continue
        for module, (a, b) in weights.modules.items():
            parts.setdefault(module, []).append((a, b * w))
    return LoraWeights({m: (torch.cat([a for a, _ in p]), torch.cat([b for _, b in p], dim=1))
                        for m, p in parts.items()})


def blend_rank(components: Sequence[tuple[LoraWeights, float]]) -> int:
    """The rank `blend_lora` would give, without building it: per module, the summed ranks it takes."""
    ranks: Counter[str] = Counter()
    for weights, w in components:
        if w == 0.0:
            continue
        for module, (a, _) in weights.modules.items():
            ranks[module] += a.shape[0]
    return max(ranks.values(), default=0)


@dataclass(frozen=True)
class _Band:
    """One-token rows whose slots lie in a short range, so their factors are read where they lie.

    A batched matmul over the slots lo .. lo+count-1, batch entry j of slot lo + j holding up to `depth`
    rows (zeros elsewhere). A gather copies each row's factors (read, write, read again); a band reads the
    range once, slots in it that no row uses included, so it is used while count <= 2 x rows."""

    lo: int
    count: int
    depth: int
    """the most rows on one slot"""
    tokens: torch.Tensor | int
    """the rows' token positions, or k when they are the first k"""
    place: torch.Tensor | None
    """each row's index in the [count * depth] batch; None when the rows are that batch as they are
    (depth 1, one row per slot of the range, in slot order)"""


def _band(positions: torch.Tensor | int, slots: list[int], device: torch.device) -> _Band | None:
    """The band of one-token rows at `positions` (a count k: the first k) on `slots`, or None when their
    slots are too spread out."""
    lo = min(slots)
    count = max(slots) - lo + 1
    if count > 2 * len(slots):
        return None
    seen: Counter[int] = Counter()
    order = []
    for slot in slots:
        order.append((slot - lo, seen[slot]))
        seen[slot] += 1
    depth = max(seen.values())
    if depth == 1 and count == len(slots) and slots == sorted(slots):
        return _Band(lo, count, 1, positions, None)
    place = torch.tensor([j * depth + k for j, k in order], device=device)
    return _Band(lo, count, depth, positions, place)


class _KernelRows:
    """One-token rows for the C kernel, whatever their slots: `address` is that of their `lora_kernel.Rows`;
    it and the int64 tensors behind it live as long as this plan."""

    def __init__(self, positions: torch.Tensor | int, slots: list[int], rank: int) -> None:
        self._tokens = None if isinstance(positions, int) else positions  # int64, on the CPU the kernel runs on
        self._slots = torch.tensor(slots, dtype=torch.int64)
        self._struct = rows_for(self._tokens, self._slots, rank)
        self.address = ctypes.addressof(self._struct)


class _Rows:
    """The step's row -> slot map, shared by every SlotLinear whose module the same slots have weights in."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        """[rows] slot per row (base rows point at the all-zero slot); None when no row has a LoRA"""
        self.rank = 0
        """the largest rank among the rows' slots: columns past it are zero in every one of them"""
        self.single: int | None = None
        """the slot, when every LoRA row of the step uses the same one: its factors are read in place"""
        self.mask: torch.Tensor | None = None
        """[rows, 1, 1] 1 for LoRA rows, 0 for base rows, with `single` when both kinds are in the batch"""
        self.packed = False
        """the input is one packed sequence [1, total]: `index` and `mask` are then per token"""
        self.gather: tuple[torch.Tensor | int, torch.Tensor] | None = None
        """packed, several LoRAs: (token positions, their slots) of the rows that feed one token; the
        positions as a count k when they are the first k"""
        self.band: _Band | None = None
        """packed, several LoRAs, instead of `gather` when the one-token rows' slots lie close together"""
        self.kernel: _KernelRows | None = None
        """packed, with the C kernel: every LoRA token as a one-token row (instead of the fields above)"""
        self.total = 0
        """packed: the step's token count"""
        self.segments: list[tuple[int, int, int]] = []
        """packed, several LoRAs: (start, end, slot) of each LoRA row that feeds several tokens and is not
        among `kernel`'s rows (the planning gives the kernel all of them where it runs)"""
        self.view = Plan()
        """this plan as the C site call reads it (`publish`); it belongs to this object, not to a plan
        copied into it, since its modules' cells point at it"""

    def publish(self) -> None:
        """Write the plan into `view`; done whenever the plan changes, before any forward reads it."""
        view = self.view
        view.total = self.total
        if self.index is None:
            view.state, view.rows = Plan.NONE, None
        elif self.kernel is not None and not self.segments:  # every LoRA token in the kernel
            view.state, view.rows = Plan.ROWS, self.kernel.address
            # torch's count, not the OpenMP setting of the thread that will run the forward: in a thread
            # torch has not yet run a parallel loop on, that is still the number of cores.
            view.threads = torch.get_num_threads()
        else:
            view.state, view.rows = Plan.OTHER, None


class SlotLinear(nn.Module):
    """A Linear plus, per batch row, the LoRA of that row's slot."""

    def __init__(self, base_layer: nn.Linear, rows: _Rows, slots: int, max_rank: int,
                 kernel: RowKernel | None = None, dtype: torch.dtype | None = None, bf16_dots: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._plan_cell = ctypes.c_void_p()
        """the address of `rows.view`, for the C site call (a site keeps the cell's address)"""
        self.rows = rows
        self._views: dict[tuple[int | None, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        """factor views by (slot, rank, count), see `_factors`"""
        w = base_layer.weight
        dtype = dtype or w.dtype
        # One extra, never written slot: base rows of a mixed batch gather zeros from it.
        with torch.inference_mode(False):
            self.register_buffer("slot_A", torch.zeros(slots + 1, max_rank, base_layer.in_features,
                                                       dtype=dtype, device=w.device), persistent=False)
            self.register_buffer("slot_B", torch.zeros(slots + 1, max_rank, base_layer.out_features,
                                                       dtype=dtype, device=w.device), persistent=False)
        self._widen = None if dtype == w.dtype else w.dtype
        """the model's dtype, when the factors are stored in another (`--lora-dtype`): torch's products
        take them widened (exactly, for bfloat16 factors of a float32 model), the kernel as they are"""
        self._kernel = kernel
        # The slot tensors are never reallocated, so the kernel's view of them is made once.
        self._factors_struct = factors_for(self.slot_A, self.slot_B, bf16_dots) if kernel is not None else None
        self._factors_address = 0 if self._factors_struct is None else ctypes.addressof(self._factors_struct)

    @property
    def rows(self) -> _Rows:
        """The plan of this module's group (LoraSlots regroups modules when an adapter comes or goes)."""
        return self._rows

    @rows.setter
    def rows(self, rows: _Rows) -> None:
        self._rows = rows
        self._plan_cell.value = ctypes.addressof(rows.view)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora(x, self.base_layer(x))

    def add_lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add each row's LoRA of input `x` to `out`, in place, and return `out`. `out` may be a column
        slice of a wider output (a fused q/k/v matmul's), as long as its leading dims merge into one view."""
        plan = self.rows
        if plan.index is None:
            return out
        if plan.packed:
            self.add_packed(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]))
            return out
        n = plan.index.shape[0]
        if x.shape[0] != n:
            raise RuntimeError(f"LoRA slots were set for {n} rows but the input is {list(x.shape[:-1])}")
        r = plan.rank
        if plan.single is not None:
            self._add_single(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), n, plan)
            return out
        a, b = self._factors(None, r)
        a, b = self._widened(a.index_select(0, plan.index), b.index_select(0, plan.index))
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2))
        out.view(n, -1, out.shape[-1]).baddbmm_(h, b)
        return out

    def add_packed(self, x: torch.Tensor, out: torch.Tensor, part: slice | None = None) -> None:
        """`add_lora` for a packed step's 2-D input [tokens, in] and output [tokens, out], or [tokens, wider]
        of which this module's output is the columns `part` (a fused product's). The engine's forward calls
        this once per module where its site's C call does not run (no kernel), so it does no more than the
        plan asks."""
        plan = self.rows
        if plan.index is None:
            return
        n = plan.total
        if x.shape[0] != n or out.shape[0] != n:  # the kernel indexes rows unchecked
            raise RuntimeError(f"LoRA slots were set for {n} tokens but the input is {list(x.shape[:-1])} "
                               f"and the output {list(out.shape[:-1])}")
        if plan.kernel is not None:
            self._kernel_rows(x, out, 0 if part is None else part.start, plan.kernel.address)
            if not plan.segments:
                return
        if part is not None:
            out = out[:, part]
        if plan.single is not None:
            self._add_single(x, out, n, plan)
            return
        r = plan.rank
        if plan.band is not None:
            self._band_rows(x, out, r, plan.band)
        if plan.gather is not None:
            tokens, slots = plan.gather
            a, b = self._factors(None, r)  # copied row by row as stored, then transposed as a view
            a, b = self._widened(a.index_select(0, slots), b.index_select(0, slots))
            a_t = a.transpose(1, 2)
            if isinstance(tokens, int):  # the first `tokens` positions: read and written in place
                out[:tokens].add_(torch.bmm(torch.bmm(x[:tokens, None], a_t), b)[:, 0])
            else:
                h = torch.bmm(x.index_select(0, tokens)[:, None], a_t)
                out.index_add_(0, tokens, torch.bmm(h, b)[:, 0])
        for start, end, slot in plan.segments:
            a_t, b = self._widened(*self._factors(slot, r))
            out[start:end].addmm_(torch.mm(x[start:end], a_t), b)

    def _factors(self, slot: int | None, r: int, count: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(A transposed, B) of the first r ranks: of `slot`, [in, r] and [r, out]; of the `count` slots
        from `slot` when `count` is given, [count, in, r] and [count, r, out]; (A, B) of every slot, for
        gathering, when `slot` is None: [slots, r, in] and [slots, r, out]. Views, each made once: the
        slot tensors are never reallocated, so a view stays valid, and a dict lookup replaces the four
        indexing calls that would otherwise dominate a one-row step's LoRA cost on a small model."""
        key = (slot, r, count)
        views = self._views.get(key)
        if views is None:
            if slot is None:
                views = (self.slot_A[:, :r], self.slot_B[:, :r])
            elif count:
                views = (self.slot_A[slot:slot + count, :r].transpose(1, 2), self.slot_B[slot:slot + count, :r])
            else:
                views = (self.slot_A[slot, :r].t(), self.slot_B[slot, :r])
            self._views[key] = views
        return views

    def _widened(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (views of the slots or gathered copies) in the dtype torch's products take."""
        if self._widen is None:
            return a, b
        return a.to(self._widen), b.to(self._widen)

    def _add_single(self, x: torch.Tensor, out: torch.Tensor, n: int, plan: _Rows) -> None:
        # Gathering copies each row's factors; with one LoRA in the batch they are used where they lie.
        a_t, b = self._widened(*self._factors(plan.single, plan.rank))
        h = torch.mm(x, a_t)
        if plan.mask is not None:
            h.view(n, -1, plan.rank).mul_(plan.mask)
        out.addmm_(h, b)

    def _kernel_rows(self, x: torch.Tensor, out: torch.Tensor, column: int, rows: int) -> None:
        """The kernel over the rows at address `rows`, adding to `out` from its column `column` on."""
        if x.dtype != torch.float32 or out.dtype != torch.float32:
            raise RuntimeError(f"the LoRA row kernel adds float32 rows, not {x.dtype} to {out.dtype}")
        if x.stride(1) != 1:
            x = x.contiguous()
        kernel = self._kernel.rows  # type: ignore[union-attr]
        if out.stride(1) == 1:
            kernel(rows, self._factors_address, x.data_ptr(), x.stride(0), out.data_ptr() + column * 4, out.stride(0))
            return
        y = out.new_zeros(out.shape[0], self.out_features)
        kernel(rows, self._factors_address, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0))
        out[:, column:column + self.out_features].add_(y)

    def _band_rows(self, x: torch.Tensor, out: torch.Tensor, r: int, band: _Band) -> None:
        a_t, b = self._widened(*self._factors(band.lo, r, band.count))
        first = isinstance(band.tokens, int)
        rows = x[:band.tokens] if first else x.index_select(0, band.tokens)  # type: ignore[misc]
        if band.place is None:
            y = torch.bmm(torch.bmm(rows[:, None], a_t), b)[:, 0]
        else:
            batch = rows.new_zeros(band.count * band.depth, rows.shape[1]).index_copy_(0, band.place, rows)
            y = torch.bmm(torch.bmm(batch.view(band.count, band.depth, -1), a_t), b)
            y = y.view(band.count * band.depth, -1).index_select(0, band.place)
        if first:  # a bmm and an add: baddbmm_ into a strided output loops over the rows
            out[:band.tokens].add_(y)  # type: ignore[misc]
        else:
            out.index_add_(0, band.tokens, y)  # type: ignore[arg-type]


class SlotSite:
    """The LoRA modules that read one input and add into one output, each at its columns: q/k/v or gate/up
    of a fused product [tokens, `width`], or one module alone (`width`: its out_features). `add` does a
    step's rows of all of them in one C call where the kernel runs, else module by module through
    `add_packed`; the packed forward's C products make that C call themselves (`call`)."""

    def __init__(self, modules: Sequence[SlotLinear | None], parts: Sequence[slice | None] = (None,),
                 width: int | None = None) -> None:
        self.modules = tuple((m, p) for m, p in zip(modules, parts, strict=True) if m is not None)
        first = self.modules[0][0]
        if width is None:
            if len(self.modules) > 1 or self.modules[0][1] is not None:
                raise ValueError("a site of columns of a wider output needs that output's width")
            width = first.out_features
        self._kernel = next((m._kernel for m, _ in self.modules if m._kernel is not None), None)
        entries = [SiteModule(ctypes.addressof(m._plan_cell), m._factors_address, 0 if p is None else p.start)
                   for m, p in self.modules]
        self._entries = (SiteModule * len(entries))(*entries)  # kept: the C call reads them
        self._struct = Site(len(entries), first.in_features, width, ctypes.addressof(self._entries))
        self._address = ctypes.addressof(self._struct)

    @property
    def call(self) -> tuple[int, int] | None:
        """The kernel's site call as a C function and this site's address (for `ForwardKernel.product_then`,
        which adds the rows in its own call), or None without the kernel."""
        kernel = self._kernel
        return None if kernel is None or not kernel.site_function else (kernel.site_function, self._address)

    def add(self, x: torch.Tensor, out: torch.Tensor, total: int) -> None:
        """Add each row's LoRA of `x` [total, in] to the modules' columns of `out` [total, width], in place.
        When the kernel runs, x and out must be contiguous float32, which the packed forward makes them
        and nothing checks (strides cost as much to read as the call); the kernel checks `total` against
        the plans and does nothing when they differ."""
        kernel = self._kernel
        if kernel is not None and kernel.site(self._address, total, x.data_ptr(), out.data_ptr()):
            return
        for module, part in self.modules:
            if module.rows.index is not None:
                module.add_packed(x, out, part)


def _plan_packed(plan: _Rows, slots: Sequence[int | None], tokens: Sequence[int], device: torch.device,
                 kernel: bool, rank: int) -> None:
    """With the kernel, every LoRA token is one of its rows, a prompt chunk's too: the step's LoRA is then
    done in C inside the products (torch's products for a chunk cost a call from Python per module, which a
    chunk's LoRA arithmetic does not make up for), and a token's LoRA does not depend on how its prompt was
    chunked (with bfloat16 dot products, torch's float32 products would round otherwise)."""
    single_tokens, single_slots, at = [], [], 0
    for slot, n in zip(slots, tokens, strict=True):
        if slot is not None and (n == 1 or kernel):
            single_tokens.extend(range(at, at + n))
            single_slots.extend([slot] * n)
        elif slot is not None and n > 1:
            plan.segments.append((at, at + n, slot))
        at += n
    plan.total = at
    if not single_tokens:
        return
    if kernel:  # rows on one slot side by side: the kernel reads that slot's factors once for all of them
        order = sorted(range(len(single_slots)), key=single_slots.__getitem__)
        single_tokens, single_slots = [single_tokens[i] for i in order], [single_slots[i] for i in order]
    # The engine keeps decoding rows first, so their tokens are usually the first positions: a count then.
    first = single_tokens == list(range(len(single_tokens)))
    positions: torch.Tensor | int = len(single_tokens) if first else torch.tensor(single_tokens, device=device)
    if kernel:
        plan.kernel = _KernelRows(positions, single_slots, rank)
        return
    plan.band = _band(positions, single_slots, device)
    if plan.band is None:
        plan.gather = (positions, torch.tensor(single_slots, device=device))


def _kernel_for(model: nn.Module, wanted: bool | None, dtype: torch.dtype) -> RowKernel | None:
    if wanted is False:
        return None
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        if wanted:
            raise RahfError(f"the LoRA row kernel runs on float32 CPU models, not {weight.dtype} on {weight.device}")
        return None
    if dtype not in FACTOR_DTYPES:
        if wanted:
            raise RahfError(f"the LoRA row kernel reads float32 or bfloat16 factors, not {dtype}")
        log.warning("LoRA factors in %s: adapter rows go through torch's products, not the row kernel (which "
                    "reads float32 or bfloat16 ones)", dtype)
        return None
    return build_row_kernel() if wanted else row_kernel()


def _copy_plan(source: _Rows, target: _Rows) -> None:
    """Give `target` (another group's plan object, which its modules hold) the plan of `source`: every
    field, so a field added to `_Rows` is copied too (a finished plan is never mutated, only replaced),
    except its C view, which is then written."""
    view = target.view
    vars(target).update(vars(source))
    target.view = view
    target.publish()


class LoraSlots:
    """Up to `max_loras` adapters resident in a plain causal LM, applied per row without PEFT.

    `targets`: Linear names (leaf, e.g. "q_proj", or full paths) to wrap now; a module an adapter needs
    later is wrapped on its first load. Each wrapped module's slot tensors are allocated once.
    `loader(name)` gives the LoraWeights of a name that `ensure` finds not resident.
    `kernel`: whether packed steps' one-token rows use the C row kernel; None (the default) uses it when the
    model is float32 on CPU and the kernel builds here, True insists (KernelUnavailable if it cannot).
    `dtype`: what the factors are stored in (`--lora-dtype`); None, the model's dtype.
    `matmul_dtype`: what the kernel multiplies bfloat16 factors in: float32 (widened exactly), or bfloat16
    dot products (where the kernel has them: `RowKernel.bf16_dots`), each row's input and rank sums rounded
    to bfloat16 as `--matmul-dtype bfloat16` rounds the forward's products' inputs, for twice the
    multiply-adds per instruction.
    """

    def __init__(self, model: nn.Module, *, max_loras: int = 8, max_rank: int = 16, targets: Iterable[str] = (),
                 loader: Callable[[str], LoraWeights] | None = None, kernel: bool | None = None,
                 dtype: torch.dtype | None = None, matmul_dtype: torch.dtype = torch.float32) -> None:
        if max_loras < 1 or max_rank < 1:
            raise RahfError("--max-loras and --max-lora-rank must be at least 1")
        if matmul_dtype not in (torch.float32, torch.bfloat16):
            raise RahfError(f"LoRA rows multiply in float32 or bfloat16, not {matmul_dtype}")
        if any(isinstance(m, SlotLinear) or hasattr(m, "base_layer") for m in model.modules()):
            raise RahfError("LoraSlots needs a plain model: this one already has LoRA layers (PEFT or slots)")
        self.model = model
        self.dtype = dtype or next(model.parameters()).dtype
        """what the factors are stored in: the model's dtype by default; bfloat16 under a float32 model
        halves what adapter rows read (and round the factors: no longer PEFT's results to the last bit)"""
        self.kernel = _kernel_for(model, kernel, self.dtype)
        """the C row kernel, or None: torch's batched matmuls"""
        self.bf16_dots = (matmul_dtype == torch.bfloat16 and self.dtype == torch.bfloat16
                          and self.kernel is not None and self.kernel.bf16_dots)
        """whether the kernel's rows multiply in bfloat16 dot products"""
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.loader = loader
        self._groups: dict[frozenset[int], _Rows] = {frozenset(): _Rows()}
        """slots with weights in a module -> the row plan shared by the modules they have weights in"""
        self._touched: dict[str, set[int]] = {}
        """wrapped module path -> the slots that have weights in it"""
        self._set: tuple[list[int | None], list[int] | None] | None = None
        """the last `set_rows` arguments, planned again when a load or an unload regroups the modules"""
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        heads = getattr(model, "get_output_embeddings", lambda: None)()
        self._head = next((n for n, m in self._linears.items() if m is heads), None)
        """the output head's path: its LoRA would need the slots of the rows that keep logits, not of every
        token the step feeds, which the row plans do not hold"""
        self._wrapped: dict[str, SlotLinear] = {}
        self._lru: OrderedDict[str, int] = OrderedDict()
        """resident name -> slot, least recently used first"""
        self._ranks = [0] * max_loras
        self._pins: Counter[str] = Counter()
        self._free = list(range(max_loras))
        wanted = set(targets)
        for path in self._linears:
            if path in wanted or path.rsplit(".", 1)[-1] in wanted:
                self._wrap(path)

    @property
    def resident(self) -> list[str]:
        """Names in their slots, least recently used first."""
        return list(self._lru)

    def __contains__(self, name: str) -> bool:
        return name in self._lru

    def slot_of(self, name: str) -> int:
        if name not in self._lru:
            raise KeyError(f"LoRA {name!r} is not resident")
        return self._lru[name]

    def load(self, name: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> int:
        """Put a PEFT LoRA (state dict + adapter_config) in a slot; returns the slot."""
        return self.load_weights(name, parse_lora(state, config, name))

    def load_blend(self, name: str, components: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, Any], float]]) -> int:
        """Put the exact blend sum_i w_i * LoRA_i (ranks concatenated) in a slot; returns the slot."""
        parsed = [(parse_lora(state, config, name), w) for state, config, w in components]
        return self.load_weights(name, blend_lora(parsed))

    def load_weights(self, name: str, weights: LoraWeights) -> int:
        """Check, then write `weights` to a free slot (taking back the least recently used unpinned one)."""
        if name in self._lru:
            raise RahfError(f"LoRA {name!r} is already resident; unload it first")
        self._check(name, weights)
        if not self._free:
            self._evict()
        slot = min(self._free)
        for path in weights.modules:
            if path not in self._wrapped:
                self._wrap(path)
        for path, module in self._wrapped.items():
            module.slot_A[slot].zero_()
            module.slot_B[slot].zero_()
            if path in weights.modules:
                a, b = weights.modules[path]
                module.slot_A[slot, :a.shape[0]].copy_(a)
                module.slot_B[slot, :a.shape[0]].copy_(b.t())
                self._touched[path].add(slot)
        self._free.remove(slot)
        self._lru[name] = slot
        self._ranks[slot] = weights.rank
        self._regroup()
        return slot

    def ensure(self, name: str, *, pin: bool = False) -> int:
        """The slot of `name`, loaded through `loader` if it is not resident; marks it most recently used."""
        if name not in self._lru:
            if self.loader is None:
                raise RahfError(f"LoRA {name!r} is not resident and these slots have no loader")
            self.load_weights(name, self.loader(name))
        self._lru.move_to_end(name)
        if pin:
            self.pin(name)
        return self._lru[name]

    def pin(self, name: str) -> None:
        """Keep `name` resident until as many `unpin`s (a running row uses it)."""
        self.slot_of(name)
        self._pins[name] += 1

    def unpin(self, name: str) -> None:
        if self._pins[name] <= 0:
            raise RahfError(f"LoRA {name!r} is not pinned")
        self._pins[name] -= 1

    def unload(self, name: str) -> None:
        """Free the slot of `name` (its tensors are zeroed, never reallocated)."""
        slot = self.slot_of(name)
        if self._pins[name] > 0:
            raise RahfError(f"LoRA {name!r} is used by {self._pins[name]} running row(s); end them first")
        for path, module in self._wrapped.items():
            module.slot_A[slot].zero_()
            module.slot_B[slot].zero_()
            self._touched[path].discard(slot)
        del self._lru[name], self._pins[name]
        self._ranks[slot] = 0
        self._free.append(slot)
        self._regroup()

    def set_rows(self, slots: Sequence[int | None], tokens: Sequence[int] | None = None) -> None:
        """The slot of each row of the next forward passes (None: the base model alone).

        `tokens`: the input is one packed sequence [1, sum(tokens)] in which row i owns the next
        tokens[i] positions (a SlotCache step); without it, row i is the input's batch row i."""
        occupied = set(self._lru.values())
        stray = [s for s in slots if s is not None and s not in occupied]
        if stray:
            raise RahfError(f"LoRA slots {stray} hold no adapter")
        if tokens is not None and len(tokens) != len(slots):
            raise RahfError(f"{len(slots)} slots for {len(tokens)} rows")
        self.clear_rows()
        self._set = (list(slots), None if tokens is None else list(tokens))
        planned: dict[tuple[int | None, ...], _Rows] = {}
        for touched, rows in self._groups.items():
            # A row whose slot has no weights in this group's modules is a base row there.
            mine = tuple(s if s in touched else None for s in slots)
            if mine in planned:
                _copy_plan(planned[mine], rows)
            else:
                self._plan(rows, mine, tokens)
                rows.publish()
                planned[mine] = rows

    def _plan(self, plan: _Rows, slots: Sequence[int | None], tokens: Sequence[int] | None) -> None:
        rank = max((self._ranks[s] for s in slots if s is not None), default=0)
        if rank == 0:
            return
        like = next(iter(self._wrapped.values())).weight
        device = like.device
        used = {s for s in slots if s is not None}
        if tokens is not None:  # from here on, a "row" is one token of the packed sequence
            plan.packed = True
            _plan_packed(plan, slots, tokens, device, self.kernel is not None, rank)
            slots = [s for s, n in zip(slots, tokens, strict=True) for _ in range(n)]
        plan.index = torch.tensor([self.max_loras if s is None else s for s in slots], device=device)
        plan.rank = rank
        if len(used) == 1 and plan.kernel is None:
            plan.single = used.pop()
            if None in slots:
                plan.mask = torch.tensor([float(s is not None) for s in slots], dtype=like.dtype,
                                         device=device).view(-1, 1, 1)

    @property
    def active(self) -> bool:
        """Whether a row set by `set_rows` uses an adapter (False: every wrapped layer is its plain Linear)."""
        return any(rows.rank > 0 for rows in self._groups.values())

    def clear_rows(self) -> None:
        """Back to the base model for every row."""
        self._set = None
        for rows in self._groups.values():
            _copy_plan(_Rows(), rows)

    def unwrap(self) -> nn.Module:
        """Put the original Linear modules back (the base weights were never touched); returns the model."""
        for path, module in self._wrapped.items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, module.base_layer)
        self.clear_rows()
        self._wrapped.clear()
        self._touched.clear()
        self._lru.clear()
        self._free = list(range(self.max_loras))
        self._regroup()
        return self.model

    def _check(self, name: str, weights: LoraWeights) -> None:
        for path, (a, b) in weights.modules.items():
            if path == self._head:
                raise BundleError(f"LoRA {name!r} has weights for the output head ({path}), which the engine "
                                  "does not apply per row; train the adapter without it in target_modules")
            if path not in self._linears:
                raise FingerprintMismatch(f"LoRA {name!r} has weights for module {path!r}, which the base model "
                                          "lacks or which is not a Linear layer")
            linear = self._linears[path]
            if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
                raise FingerprintMismatch(f"LoRA {name!r}: {path} shapes A{list(a.shape)} B{list(b.shape)} do not "
                                          f"fit Linear({linear.in_features}, {linear.out_features})")
            if a.shape[0] > self.max_rank:
                raise LimitExceeded(f"LoRA {name!r} has rank {a.shape[0]} at {path} (a blend's is the sum of its "
                                    f"adapters' ranks), above --max-lora-rank {self.max_rank}; restart with a "
                                    "larger --max-lora-rank")

    def _evict(self) -> None:
        for name in self._lru:
            if self._pins[name] == 0:
                self.unload(name)
                return
        raise SlotsExhausted(f"all {self.max_loras} LoRA slots hold adapters that running requests use; "
                             "retry later or restart with a larger --max-loras")

    def _wrap(self, path: str) -> None:
        parent, _, leaf = path.rpartition(".")
        module = SlotLinear(self._linears[path], self._groups[frozenset()], self.max_loras, self.max_rank,
                            self.kernel, self.dtype, self.bf16_dots)
        setattr(self.model.get_submodule(parent), leaf, module)
        self._wrapped[path] = module
        self._touched[path] = set()

    def _regroup(self) -> None:
        """Point each wrapped module at the plan of the slots that have weights in it (after a load or an
        unload), and plan the rows already set again for the new groups."""
        groups: dict[frozenset[int], _Rows] = {frozenset(): self._groups[frozenset()]}
        for path, module in self._wrapped.items():
            touched = frozenset(self._touched[path])
            module.rows = groups.setdefault(touched, self._groups.get(touched) or _Rows())
        self._groups = groups
        if self._set is not None:
            slots, tokens = self._set
            occupied = set(self._lru.values())
            # A row on a slot unloaded since reads its zeroed factors, i.e. it is a base row.
            self.set_rows([s if s in occupied else None for s in slots], tokens)
