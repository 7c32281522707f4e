"""Phase-3 sweep on validation rows: alpha, target layers, learning rate, steps.

    python benchmarks/sweep_rahf.py runs/dual --out runs/sweep-dual --val-rows 1207:1307 \\
        --alpha 5,10,20 --lr 3e-3 --steps 40 --layers 9,11,13,15,17,19 --layers 9,11,13 --kl 0,10

RUN_DIR is a `rahf-train run` whose phase 1 and collect are done (collect.layers holding every
layer swept). Each grid point is the run's config with `--align.alpha/lr/steps/target_layers/kl_to_phase1` set
(`training.config.apply_overrides`); phase 3 trains with the run's own code
(`training.align.run_align`: on top of the phase-1 model, on the run's rows and collected
differences) in SWEEP_DIR/<point>/, whose phase1/ and collect/ link to RUN_DIR's. Its bundle is
then scored on `--val-rows` of the run's data file, rows outside the run's training rows and
its eval.rows: preference accuracy and mean margin with 95% intervals, and the paired difference
against the base (`training.evaluate.scores`, `training.stats`), and generation health
(`training.health`: distinct-2, answer length, base log-likelihood of the greedy answers to the
first `--health-prompts` validation prompts). The base is scored once per call.

One JSON line per point goes to SWEEP_DIR/sweep.jsonl as it finishes (a killed sweep keeps what
it did; re-running skips finished points); sweep.md (table) and sweep.png (plot) cover every
point in SWEEP_DIR.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from accelerate import Accelerator

from rahf_serve.bundle import DEFAULT_MAX_RANK
from rahf_serve.models import load_base
from training import stats
from training.align import run_align
from training.config import TrainConfig, apply_overrides, load_config, save_config, target_layers
from training.context import Context
from training.data import PreferenceData, load_preferences, parse_rows
from training.encode import prompt_ids
from training.evaluate import Models, margins, scores
from training.health import measure
from training.methods import get_method
from training.rundir import RunDir


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def read_points(log: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}


def append_point(log: Path, record: dict[str, Any]) -> None:
    """One line, under an exclusive lock: two sweeps of one run (say one per alpha, one thread each) may
    share SWEEP_DIR."""
    with open(log, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def point_name(p: dict[str, Any]) -> str:
    kl = f"_kl{p['kl']:g}" if p.get("kl") else ""
    return f"a{p['alpha']:g}_l{'-'.join(map(str, p['layers']))}_lr{p['lr']:g}_s{p['steps']}{kl}"


def point_config(run_config: TrainConfig, p: dict[str, Any]) -> TrainConfig:
    """The run's config with the point's phase-3 settings; no mid-run checkpoints (a point is cheap to redo)."""
    return apply_overrides(run_config, [
        f"--align.alpha={p['alpha']}", f"--align.lr={p['lr']}", f"--align.steps={p['steps']}",
        f"--align.checkpoint_every={p['steps']}", f"--align.target_layers={','.join(map(str, p['layers']))}",
        f"--align.kl_to_phase1={p.get('kl', 0.0)}"])


class Scorer:
    """Scores a model (the base, or the base with one bundle) on the validation rows."""

    def __init__(self, base_spec: str, device: str, config: TrainConfig, val: PreferenceData, n_health: int,
                 max_rank: int = DEFAULT_MAX_RANK):
        self.base_spec, self.device, self.config, self.val = base_spec, device, config, val
        self.n_health, self.max_rank = n_health, max_rank

    def __call__(self, bundle: Path | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """(per-pair margins, generation health) of the base, or of the base with `bundle` attached."""
        base = load_base(self.base_spec, device=self.device, dtype="auto")  # fresh: PEFT wraps in place
        models = Models(base, {} if bundle is None else {"point": str(bundle)}, max_rank=self.max_rank)
        name = models.names[-1]
        e = self.config.eval
        prompts = [prompt_ids(models.tokenizer, p.chat(), e.max_prompt_tokens) for p in self.val.pairs[:self.n_health]]
        with models.use(name):
            m = margins(models.model, models.tokenizer, self.val.pairs, self.config, desc=f"score {name}")
            health = measure(models.model, models.tokenizer, prompts, e.max_new_tokens, e.batch_size)
        return m, health


def train_point(run: RunDir, run_info: dict[str, Any], cfg: TrainConfig, data: PreferenceData, acc: Accelerator,
                out: Path) -> dict[str, Any]:
    """Phase 3 of one grid point in `out` (phase 1 and collect linked from the run); its losses and time."""
    point = RunDir(out)
    out.mkdir(parents=True, exist_ok=True)
    for link, target in ((point.phase1, run.phase1), (point.collect, run.collect)):
        if target.exists() and not link.exists():
            link.symlink_to(target.resolve())
    save_config(cfg, point.config_file)
    ctx = Context(acc=acc, config=cfg, base_spec=run_info["base"], data=data, out=out,
                  command=shlex.join(["python", "benchmarks/sweep_rahf.py", *sys.argv[1:]]))
    t0 = time.perf_counter()
    losses = run_align(ctx)
    return {"align_seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def health_record(h: dict[str, Any]) -> dict[str, Any]:
    return {k: h[k] for k in ("distinct2", "mean_length", "base_loglik", "answers")}


def _ci(pair: list[float]) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def table(base: dict[str, Any], base_health: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    def health(h: dict[str, Any]) -> str:
        return f"{h['distinct2']:.3f} | {h['mean_length']:.1f} | {h['base_loglik']:+.2f}"

    lines = ["| point | accuracy [95% CI] | vs base [95% CI] | McNemar p (flips base/point) | margin [95% CI] "
             "| distinct-2 | length | base log-lik | phase-3 loss first -> last | phase-3 time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| base | {base['accuracy']:.3f} {_ci(base['accuracy_ci'])} | - | - | {base['margin']:+.4f} "
             f"{_ci(base['margin_ci'])} | {health(base_health)} | - | - |"]
    for r in rows:
        s, vs = r["aligned"], r["aligned"]["vs_base"]
        lines.append(f"| {r['name']} | {s['accuracy']:.3f} {_ci(s['accuracy_ci'])} | {vs['accuracy_diff']:+.3f} "
                     f"{_ci(vs['accuracy_diff_ci'])} | {vs['mcnemar']['p_value']:.2g} ({vs['mcnemar']['b']}/"
                     f"{vs['mcnemar']['c']}) | {s['margin']:+.4f} {_ci(s['margin_ci'])} | {health(r['health'])} | "
                     f"{r['loss_first']} -> {r['loss_last']} | {r['align_seconds'] / 60:.1f} min |")
    return lines


def plot(base: dict[str, Any], base_health: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy with its 95% interval (left) and base log-lik of the greedy answers (right), per point."""
    names = [r["name"] for r in rows]
    fig, (acc_ax, ll_ax) = plt.subplots(1, 2, figsize=(11, 0.35 * len(rows) + 1.8), sharey=True)
    acc = [r["aligned"]["accuracy"] for r in rows]
    err = [[a - r["aligned"]["accuracy_ci"][0] for a, r in zip(acc, rows, strict=True)],
           [r["aligned"]["accuracy_ci"][1] - a for a, r in zip(acc, rows, strict=True)]]
    acc_ax.errorbar(acc, names, xerr=err, fmt="o", capsize=3)
    acc_ax.axvspan(*base["accuracy_ci"], color="0.85", label="base 95% CI")
    acc_ax.axvline(base["accuracy"], color="k", ls="--", label=f"base {base['accuracy']:.3f}")
    acc_ax.set(xlabel="preference accuracy (validation rows)", title="accuracy, 95% CI")
    acc_ax.legend(loc="lower right", fontsize=8)
    ll_ax.plot([r["health"]["base_loglik"] for r in rows], names, "o")
    ll_ax.axvline(base_health["base_loglik"], color="k", ls="--", label=f"base {base_health['base_loglik']:.2f}")
    ll_ax.set(xlabel="base log-lik per token of greedy answers", title="generation health")
    ll_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory with phase 1 and collect done")
    ap.add_argument("--out", type=Path, required=True, help="sweep folder (one sub-folder per point)")
    ap.add_argument("--val-rows", required=True,
                    help="rows of the run's data file scored, outside its --rows and eval.rows, e.g. 1207:1307")
    ap.add_argument("--alpha", type=floats, help="align.alpha values (default: the run's)")
    ap.add_argument("--layers", type=ints, action="append",
                    help="one align.target_layers set, comma-separated (repeatable; default: the run's)")
    ap.add_argument("--lr", type=floats, help="align.lr values (default: the run's)")
    ap.add_argument("--kl", type=floats, help="align.kl_to_phase1 values (default: the run's)")
    ap.add_argument("--steps", type=ints, help="align.steps values (default: the run's)")
    ap.add_argument("--health-prompts", type=int, default=8,
                    help="validation prompts answered greedily for generation health (default 8)")
    args = ap.parse_args()

    run = RunDir(args.run)
    missing = [phase for phase in ("phase1", "collect") if not run.done(phase)]
    if missing:
        raise SystemExit(f"{args.run}: {', '.join(missing)} not done; run `rahf-train run` (or the phase) first")
    info = json.loads(run.run_file.read_text())
    run_config = load_config(run.config_file)
    summary = json.loads(run.summary.read_text())
    data = load_preferences(info["data"], info.get("rows"), info.get("split"))
    val = load_preferences(info["data"], args.val_rows, info.get("split"))
    used = {"the run's rows": info.get("rows"), "eval.rows": run_config.eval.rows}
    for what, rows in used.items():
        if rows is not None and set(parse_rows(rows, data.source_rows)) & set(parse_rows(args.val_rows, data.source_rows)):
            raise SystemExit(f"--val-rows {args.val_rows} overlap {what} {rows}")

    al = run_config.align
    layer_sets = args.layers or [target_layers(run_config, summary["num_layers"])]
    not_collected = sorted({layer for s in layer_sets for layer in s} - set(summary["layers"]))
    if not_collected:
        raise SystemExit(f"layers {not_collected} were not collected in {args.run} (it kept {summary['layers']})")
    points = [{"alpha": a, "layers": s, "lr": lr, "steps": n, "kl": kl} for s, a, lr, n, kl in itertools.product(
        layer_sets, args.alpha or [al.alpha], args.lr or [al.lr], args.steps or [al.steps],
        args.kl or [al.kl_to_phase1])]

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "sweep.jsonl"
    done = read_points(log)
    same = {"run": str(args.run.resolve()), "val_rows": args.val_rows, "health_prompts": args.health_prompts}
    stale = [n for n, r in done.items() if any(r.get(k) != v for k, v in same.items())]
    if stale:
        raise SystemExit(f"{log} holds points from another run, --val-rows or --health-prompts ({stale[0]}, ...); "
                         "use another --out")

    acc = Accelerator(cpu=not torch.cuda.is_available())
    method = get_method(run_config.method)
    print(f"{args.run}: {method.name} ({data.summary()}); scoring {val.summary()}", flush=True)
    score = Scorer(info["base"], str(acc.device), run_config, val, args.health_prompts)
    base_m, base_health = score()
    base = scores(base_m)
    print(f"base: accuracy {base['accuracy']:.3f} {_ci(base['accuracy_ci'])}, margin {base['margin']:+.4f}; "
          f"health {json.dumps({k: v for k, v in base_health.items() if k != 'answers'})}", flush=True)
    for p in points:
        name = point_name(p)
        if name not in done:
            trained = train_point(run, info, point_config(run_config, p), data, acc, args.out / name)
            m, health = score(RunDir(args.out / name).bundle)
            done[name] = {"name": name, **p, **same, "pairs": len(val.pairs), "base": base,
                          "aligned": stats.compare(base_m, m), "health": health_record(health),
                          "base_health": health_record(base_health), **trained}
            append_point(log, done[name])
        r = done[name]
        print(f"{name:40s} accuracy {r['aligned']['accuracy']:.3f} {_ci(r['aligned']['accuracy_ci'])} "
              f"(vs base {r['aligned']['vs_base']['accuracy_diff']:+.3f}) margin {r['aligned']['margin']:+.4f} "
              f"base log-lik {r['health']['base_loglik']:+.2f}", flush=True)

    rows = list(read_points(log).values())  # every point in SWEEP_DIR, also another process's
    lines = [f"Phase-3 sweep of `{args.run}` ({method.name}), scored on rows {args.val_rows} of `{info['data']}` "
             f"({len(val.pairs)} pairs; generation health on the first {args.health_prompts} prompts).", "",
             *table(base, base_health, rows)]
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot(base, base_health, rows, args.out / "sweep.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
