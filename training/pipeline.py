"""The phases of a run in order, each skipped when its output is already there.

The run directory's layout and atomic commits are `training.rundir.RunDir`'s; what differs
between SCIT, DualLLMs and LoRRA is `training.methods`'s. This module only sequences them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel

from . import align, collect, evaluate, phase1, plots
from .config import TrainConfig, apply_overrides, load_config, save_config
from .context import Context
from .data import load_preferences
from .methods import get_method
from .rundir import PHASES, RunDir


def open_run(out: Path, *, base: str | None, data: str | None, rows: str | None, split: str | None,
             method: str | None, config: str | None, seed: int | None, resume: bool,
             command: str | None = None, overrides: list[str] | None = None, force: bool = False) -> Context:
    """Create or reopen a run directory. Settings given now must agree with a resumed run's;
    `overrides` (`--align.alpha 10` tokens) apply on top of the config and are saved with it."""
    acc = Accelerator()
    run = RunDir(out)
    saved = json.loads(run.run_file.read_text()) if run.run_file.is_file() else None
    given = {"base": base, "data": data, "rows": rows, "split": split, "method": method}
    if saved is not None:
        clash = {k: (saved[k], v) for k, v in given.items() if v is not None and saved.get(k) != v}
        if clash and resume:
            raise ValueError(f"--resume with settings that differ from the run in {out}: {clash}")
        settings = {**saved, **{k: v for k, v in given.items() if v is not None}}
        cfg = load_config(run.config_file) if config is None else load_config(config)
    else:
        if resume:
            raise ValueError(f"--resume: {out} holds no run to resume")
        if base is None or data is None:
            raise ValueError("a new run needs --base and --data")
        settings = dict(given)
        cfg = load_config(config) if config else TrainConfig()
    cfg = apply_overrides(cfg, overrides or [])
    if settings.get("method"):
        cfg.method = settings["method"]
    settings["method"] = cfg.method
    if seed is not None:
        cfg.seed = seed
    # Read before anything is written: bad --data, --rows or phase1.mix_data must leave no run behind
    # (or a saved one unchanged).
    data_ = load_preferences(settings["data"], settings.get("rows"), settings.get("split"))
    ctx = Context(acc, cfg, settings["base"], data_, out, command, force=force)
    mix = ctx.phase1_mix
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        run.run_file.write_text(json.dumps(settings, indent=2))
        save_config(cfg, run.config_file)
        print(data_.summary(), flush=True)
        if mix:
            print(f"phase 1 also trains on {mix.summary()}", flush=True)
    acc.wait_for_everyone()
    return ctx


RUNNERS = {"phase1": lambda ctx: get_method(ctx.config.method).train_phase1(ctx),
           "collect": collect.run_collect, "align": align.run_align}


def run_phase(ctx: Context, phase: str, resume: bool = False) -> None:
    """Run one phase; without `resume`, checkpoints of an earlier attempt are discarded first."""
    if not resume and ctx.acc.is_main_process:
        shutil.rmtree(ctx.run.checkpoints(phase), ignore_errors=True)
    ctx.acc.wait_for_everyone()
    t0 = time.perf_counter()
    RUNNERS[phase](ctx)
    ctx.log({"phase": phase, "event": "done", "seconds": round(time.perf_counter() - t0, 2)})
    make_plots(ctx)


def phase_done(ctx: Context, phase: str) -> bool:
    return ctx.run.done(phase)


def require(ctx: Context, phase: str) -> None:
    """Raise unless every phase before `phase` has finished in this run directory."""
    for earlier in PHASES[:PHASES.index(phase)]:
        if not phase_done(ctx, earlier):
            raise ValueError(f"{ctx.out}: phase {earlier!r} has not finished; run it first (or `rahf-train run`)")


def run_all(ctx: Context, resume: bool) -> None:
    for phase in PHASES:
        if resume and phase_done(ctx, phase):
            if ctx.acc.is_main_process:
                print(f"{phase}: already done, skipped", flush=True)
            continue
        run_phase(ctx, phase, resume)
    if ctx.config.eval.rows is not None and not (resume and ctx.run.done("eval")):
        run_eval(ctx)


def run_eval(ctx: Context) -> dict | None:
    """Evaluate the run's bundle on the configured held-out rows and record the scores in it."""
    result = None
    if ctx.acc.is_main_process:
        held_out = load_preferences(ctx.data.source, ctx.config.eval.rows)
        result = evaluate.evaluate(ctx.load_base(), str(ctx.run.bundle), held_out, ctx.config)
        ctx.commit("eval", lambda tmp: evaluate.write_eval(tmp, result), barrier=False)
        evaluate.record_metrics(ctx.run.bundle, result)
        scores = result["preference"]["scores"]
        ctx.log({"phase": "eval", "base": scores["base"], "aligned": scores["aligned"]})
        make_plots(ctx, result)
        print(evaluate.report(result), flush=True)
    ctx.acc.wait_for_everyone()
    return result


def adopt_snapshots(ctx: Context, source: RunDir, steps: dict[str, int]) -> dict:
    """Make `ctx`'s phase 1 the snapshots of `source`'s at `steps` (adapter -> step; an adapter not
    named keeps its last), with its validation separation measured again on `phase1.val_rows`,
    so phases 2 and 3 build on a shorter phase 1 without training it again; the run's config gets
    the matching `phase1.stop_at`. Returns the new record."""
    method = get_method(ctx.config.method)
    unknown = sorted(set(steps) - set(method.adapters))
    if unknown or not method.adapters:
        raise ValueError(f"{ctx.config.method} has phase-1 adapters {list(method.adapters)}; got {unknown or list(steps)}")
    if not source.done("phase1"):
        raise ValueError(f"{source.root}: phase 1 has not finished; snapshots are taken from a finished phase 1")
    chosen = {}
    for name in method.adapters:
        have = phase1.snapshot_steps(source, name)
        step = steps.get(name, have[-1] if have else -1)
        if step not in have:
            raise ValueError(f"{source.root} has no snapshot of {name!r} at step {step} (it has {have or 'none'}; "
                             "train phase 1 with --phase1.snapshot_every N)")
        chosen[name] = step
    base = ctx.load_base()
    first, *rest = method.adapters
    model = PeftModel.from_pretrained(base.model, str(source.snapshot(first, chosen[first])), adapter_name=first)
    for name in rest:
        model.load_adapter(str(source.snapshot(name, chosen[name])), adapter_name=name)
    model.eval()
    record: dict = {"snapshots": chosen}
    if ctx.config.phase1.val_rows:
        with torch.no_grad():
            record.update(method.separation(ctx, model, base.tokenizer))
    saved_losses = json.loads((source.phase1 / "losses.json").read_text())
    saved_history = json.loads(source.validation.read_text())["history"] if source.validation.is_file() else []

    def write(tmp: Path) -> None:
        for name, step in chosen.items():
            shutil.copytree(source.snapshot(name, step), tmp / name)
        (tmp / "losses.json").write_text(json.dumps({n: saved_losses[n][:s] for n, s in chosen.items()}))
        if ctx.config.phase1.val_rows:
            (tmp / source.validation.name).write_text(json.dumps(
                {"rows": ctx.config.phase1.val_rows, "source": str(source.root), "history": saved_history[:1] + [record]},
                indent=2))

    ctx.commit("phase1", write)
    # The run's config says how its phase 1 was made, so a fresh `rahf-train run` with it trains the same.
    total = method.phase1_steps(ctx.config, len(ctx.phase1_pairs()))
    ctx.config.phase1.stop_at = [f"{name}={step}" for name, step in chosen.items() if step < total]
    if ctx.acc.is_main_process:
        save_config(ctx.config, ctx.run.config_file)
    ctx.log({"phase": "phase1", "event": "adopted", "source": str(source.root), **record})
    return record


def make_plots(ctx: Context, result: dict | None = None) -> None:
    if not ctx.acc.is_main_process:
        return
    out = ctx.run.plots
    out.mkdir(exist_ok=True)
    plots.plot_losses(ctx.out, out / "loss.png")
    plots.plot_validation(ctx.out, out / "validation.png")
    if ctx.run.summary.is_file():
        s = json.loads(ctx.run.summary.read_text())
        plots.plot_norms(s["norms"], s["layers"], out / "norms.png")
    if result is not None:
        plots.plot_accuracy(result, out / "accuracy.png")
