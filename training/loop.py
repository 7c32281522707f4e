"""One optimisation loop for every phase: accelerate processes, accumulation, checkpoints, resume.

Each step takes `batch_size` items (over all processes), each process its share, in micro-batches.
Losses are sums divided by counts summed over the whole step on every process, and LoRA gradients
are summed across processes with one all-reduce: the update is the same whatever the process count
(up to float summation order). Gradient sync is explicit rather than through a DDP wrapper because
phases switch adapters on one PeftModel (`set_adapter`, `disable_adapter`), which a wrapper built
around a fixed set of trainable parameters does not follow; LoRA gradients are small.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

Counts = Callable[[list[int]], dict[str, float]]
Sums = Callable[[list[int]], dict[str, torch.Tensor]]


@dataclass
class Schedule:
    steps: int
    batch_size: int
    micro_batch_size: int
    lr: float
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup, then linear decay to zero at the last step."""
        warm = max(1, math.ceil(self.warmup_ratio * self.steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - warm))


def step_items(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Item indices of one step: epochs of seeded permutations, a pure function of the step."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.append(perms[epoch][pos % n])
    return out


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fit(acc: Accelerator, model: torch.nn.Module, *, name: str, n_items: int, counts: Counts, sums: Sums,
        schedule: Schedule, ckpt_dir: Path | None = None, checkpoint_every: int = 0,
        log: Callable[[dict], None] | None = None, validate: Callable[[], dict] | None = None,
        validate_every: int = 0, history: list[dict] | None = None,
        snapshot: Callable[[int], None] | None = None, snapshot_every: int = 0,
        stop_at: int | None = None) -> list[float]:
    """Train the parameters of `model` that require grad; returns the loss of every step.

    `counts(items)` gives this process's normaliser per loss term (known before any forward),
    `sums(items)` the matching sums with their graphs. With `ckpt_dir`, the state (trainable
    weights, optimizer, RNG, step, losses) is saved every `checkpoint_every` steps and picked up
    again when the directory holds a checkpoint, so a killed phase continues where it stopped.
    `validate()` (main process only, no gradients, dropout off) runs before the first step, every
    `validate_every` steps and after the last; its figures are logged with `"val_step"` and appended to
    `history`, which the checkpoint holds whole (a list shared by several `fit` calls is restored as the
    latest of them saved it), so a resumed phase reports every validation since its start.
    `snapshot(step)` (main process only) runs every `snapshot_every` steps and after the last.
    `stop_at`: end after this many steps; the learning rate still follows the whole schedule, so the
    weights are those a full run has at that step.
    """
    world, rank = acc.num_processes, acc.process_index
    last = schedule.steps if stop_at is None else min(stop_at, schedule.steps)
    if schedule.batch_size % world:
        raise ValueError(f"{name}: batch_size {schedule.batch_size} is not divisible by {world} processes")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    torch.manual_seed(schedule.seed)
    start, losses = 0, []
    ckpt = ckpt_dir / f"rank{rank}.pt" if ckpt_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        with torch.no_grad():
            for n, p in named:
                p.copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
        start, losses = int(state["step"]), state["losses"].tolist()
        if history is not None:
            history[:] = json.loads(state.get("history", "[]"))

    def run_validation(step: int) -> None:
        if validate is None or not acc.is_main_process:
            return
        model.eval()
        with torch.no_grad():
            figures = validate()
        model.train()
        if history is not None:
            history.append(figures)
        if log is not None:
            log({"phase": name, "val_step": step, **figures})

    if start == 0:
        run_validation(0)
    model.train()
    bar = tqdm(range(start, last), initial=start, total=last, desc=name,
               disable=not acc.is_main_process, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        mine = step_items(step, schedule.batch_size, n_items, schedule.seed)[rank::world]
        local = counts(mine)
        keys = sorted(local)
        total = torch.tensor([float(local[k]) for k in keys], device=acc.device)
        if world > 1:
            total = acc.reduce(total, reduction="sum")
        norm = {k: max(float(v), 1.0) for k, v in zip(keys, total.tolist(), strict=True)}
        terms = torch.zeros(len(keys), device=acc.device)  # each loss term's share of this step's loss
        for micro in _chunks(mine, schedule.micro_batch_size):
            parts = sums(micro)
            scaled = [parts[k] / norm[k] for k in keys]
            sum(scaled).backward()
            terms += torch.stack([t.detach() for t in scaled])
        if world > 1:
            _allreduce_grads(acc, params)
            terms = acc.reduce(terms, reduction="sum")
        step_loss = terms.sum()
        torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
        lr = schedule.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(step_loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log is not None and acc.is_main_process:
            log({"phase": name, "step": step + 1, "loss": losses[-1], "lr": lr,
                 **({k: float(v) for k, v in zip(keys, terms, strict=True)} if len(keys) > 1 else {}),
                 "seconds": round(time.perf_counter() - t0, 3)})
        done = step + 1
        if done == last or (validate_every and done % validate_every == 0):
            run_validation(done)
        if snapshot is not None and acc.is_main_process and snapshot_every and (
                done % snapshot_every == 0 or done == last):
            snapshot(done)
        if ckpt is not None and checkpoint_every and (done % checkpoint_every == 0 or done == last):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic({"step": done, "trainable": {n: p.detach().cpu() for n, p in named},
                          "optim": optimizer.state_dict(), "rng": torch.get_rng_state(),
                          "losses": torch.tensor(losses, dtype=torch.float64),
                          "history": json.dumps(history or [])}, ckpt)
    bar.close()
    model.eval()
    return losses


def _allreduce_grads(acc: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Sum every trainable gradient across processes with one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
