"""Phase-3 sweep on training rows (issue 7): alpha, target layers, learning rate, steps.

    python benchmarks/sweep_rahf.py RUN_DIR --out SWEEP_DIR --fit-rows 0:200 --val-rows 200:240 \\
        --alpha 2,5,10 --layers 9,11,13,15,17,19 --layers 9,11,13 --lr 1e-3 --steps 30 [--steer 5,20] [--proxy-only]

RUN_DIR is a `rahf-train` run whose phase 1 and collect are done (collect.layers holding every
layer swept). Each grid point trains phase 3 with the run's own code (`training.align.run_align`)
on the first `--fit-rows` of the run's rows, then scores chosen vs rejected on `--val-rows` with
`training.evaluate` and measures generation health (`training.health`, every 5th validation prompt)
(the held-out rows of the final table are never read). `--steer C,...` adds
a free proxy first: the base steered by C x the run's mean difference vectors at each layer set,
no training. One JSON line per point goes to SWEEP_DIR/sweep.jsonl as it finishes (a killed sweep
keeps what it did; re-running skips finished points); the table and a plot are written at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate import Accelerator

from rahf_serve.bundle import attach, read_bundle
from rahf_serve.models import load_base
from rahf_serve.steering import steering
from training.align import PHASE as BUNDLE
from training.align import run_align
from training.collect import PHASE as COLLECT
from training.collect import SUMMARY, load_vectors
from training.config import load_config, save_config
from training.context import Context
from training.data import load_preferences, parse_rows
from training.encode import prompt_ids
from training.evaluate import evaluate, margins, scores
from training.health import measure


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def point_name(p: dict) -> str:
    layers = "-".join(map(str, p["layers"]))
    return f"{p['kind']}_a{p['alpha']:g}_l{layers}" + (f"_lr{p['lr']:g}_s{p['steps']}" if p["kind"] == "align" else "")


def steer_point(run: dict, cfg, vectors: dict[int, torch.Tensor], p: dict, val) -> dict:
    base = load_base(run["base"])
    deltas = {layer: p["alpha"] * vectors[layer][None] for layer in p["layers"]}
    with steering(base.model, deltas):
        s = scores(margins(base.model, base.tokenizer, val.pairs, cfg, cfg.eval.batch_size, "score steered"))
    return {"aligned": s.as_dict()}


def health(run: dict, cfg, val, bundle_dir: Path | None = None) -> dict:
    """Generation health (training.health) on every 5th validation prompt, 48 new tokens."""
    base = load_base(run["base"])
    model = base.model if bundle_dir is None else attach(base.model, read_bundle(bundle_dir), "sweep",
                                                         base.fingerprint, base.name)
    prompts = [prompt_ids(base.tokenizer, p.chat(), cfg.data.max_prompt_tokens) for p in val.pairs[::5]]
    m = measure(model.eval(), base.tokenizer, prompts, max_new_tokens=48)
    return {k: m[k] for k in ("distinct2", "mean_length", "base_loglik")}


def align_point(run_dir: Path, run: dict, cfg, p: dict, fit, val, out: Path) -> dict:
    cfg.align.alpha, cfg.align.target_layers, cfg.align.lr, cfg.align.steps = p["alpha"], p["layers"], p["lr"], p["steps"]
    cfg.align.checkpoint_every = p["steps"]  # a sweep point is cheap to redo: no mid-run checkpoints
    out.mkdir(parents=True, exist_ok=True)
    if not (out / COLLECT).exists():
        (out / COLLECT).symlink_to((run_dir / COLLECT).resolve())
    save_config(cfg, out / "config.yaml")
    ctx = Context(acc=Accelerator(cpu=not torch.cuda.is_available()), config=cfg, base_spec=run["base"], data=fit,
                  out=out, command="benchmarks/sweep_rahf.py")
    t0 = time.time()
    losses = run_align(ctx)
    seconds = time.time() - t0
    cfg.eval.generations = 0
    result = evaluate(load_base(run["base"]), str(out / BUNDLE), val, cfg)
    return {"aligned": result["aligned"], "base": result["base"], "health": health(run, cfg, val, out / BUNDLE),
            "align_seconds": round(seconds, 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def plot(rows: list[dict], path: Path, base_acc: float) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    names = [r["name"] for r in rows]
    ax.barh(names, [r["aligned"]["accuracy"] for r in rows],
            color=["tab:orange" if r["kind"] == "steer" else "tab:blue" for r in rows])
    ax.axvline(base_acc, color="k", ls="--", label=f"base {base_acc:.3f}")
    ax.axvline(base_acc + 0.10, color="tab:green", ls=":", label="base + 10 pts")
    ax.set_xlabel("preference accuracy on the validation rows")
    ax.set_title("phase-3 sweep (blue) and steering proxy (orange)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fit-rows", default="0:200", help="phase-3 rows: a prefix of the run's rows")
    ap.add_argument("--val-rows", default="200:240", help="rows scored; must lie outside --fit-rows")
    ap.add_argument("--alpha", type=floats, default=[5.0])
    ap.add_argument("--layers", type=ints, action="append", help="one target layer set (repeatable)")
    ap.add_argument("--lr", type=floats, default=[1e-3])
    ap.add_argument("--steps", type=ints, default=[30])
    ap.add_argument("--steer", type=floats, default=[], help="steering-proxy coefficients (no training)")
    ap.add_argument("--proxy-only", action="store_true", help="only the steering proxy: no phase-3 training")
    args = ap.parse_args()

    run = json.loads((args.run / "run.json").read_text())
    summary = json.loads((args.run / COLLECT / SUMMARY).read_text())
    n_data = load_preferences(run["data"]).total_rows
    fit_idx, val_idx, run_idx = (parse_rows(r, n_data) for r in (args.fit_rows, args.val_rows, run["rows"]))
    if fit_idx != run_idx[:len(fit_idx)]:
        raise SystemExit(f"--fit-rows {args.fit_rows} must be a prefix of the run's rows {run['rows']}")
    if set(fit_idx) & set(val_idx):
        raise SystemExit("--val-rows overlap --fit-rows")
    fit, val = load_preferences(run["data"], args.fit_rows), load_preferences(run["data"], args.val_rows)
    layer_sets = args.layers or [summary["layers"]]
    missing = sorted({layer for s in layer_sets for layer in s} - set(summary["layers"]))
    if missing:
        raise SystemExit(f"layers {missing} were not collected in {args.run} (it kept {summary['layers']})")

    points = [{"kind": "steer", "alpha": c, "layers": s} for s in layer_sets for c in args.steer]
    points += [] if args.proxy_only else [{"kind": "align", "alpha": a, "layers": s, "lr": lr, "steps": n}
               for s, a, lr, n in itertools.product(layer_sets, args.alpha, args.lr, args.steps)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "sweep.jsonl"
    done = {r["name"]: r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    vectors = load_vectors(args.run)
    base_cfg = load_config(args.run / "config.yaml")
    base = load_base(run["base"])
    base_scores = scores(margins(base.model, base.tokenizer, val.pairs, base_cfg, base_cfg.eval.batch_size)).as_dict()
    del base
    base_health = health(run, base_cfg, val)
    print(f"base on rows {args.val_rows}: {base_scores} {base_health}", flush=True)
    for p in points:
        name = point_name(p)
        if name not in done:
            cfg = load_config(args.run / "config.yaml")
            res = (steer_point(run, cfg, vectors, p, val) if p["kind"] == "steer"
                   else align_point(args.run, run, cfg, p, fit, val, args.out / name))
            done[name] = {"name": name, **p, "val_rows": args.val_rows, "fit_rows": args.fit_rows,
                          "base": base_scores, **res}
            with open(log, "a") as fh:
                fh.write(json.dumps(done[name]) + "\n")
        r = done[name]
        print(f"{name:48s} accuracy {r['aligned']['accuracy']:.3f} margin {r['aligned']['margin']:+.4f}", flush=True)
    rows = list(done.values())  # the table covers every point in SWEEP_DIR, not only this call's
    for r in rows:
        if r["kind"] == "align" and "health" not in r:  # a point from before health was measured
            r["health"] = health(run, base_cfg, val, args.out / r["name"] / BUNDLE)

    def cells(h: dict | None) -> str:
        return f"{h['distinct2']:.3f} | {h['mean_length']:.1f} | {h['base_loglik']:+.2f}" if h else "- | - | -"

    table = ["| point | accuracy | margin | distinct-2 | length | base log-lik | phase-3 loss first -> last | phase-3 time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| base | {base_scores['accuracy']:.3f} | {base_scores['margin']:+.4f} | {cells(base_health)} | - | - |"]
    table += [f"| {r['name']} | {r['aligned']['accuracy']:.3f} | {r['aligned']['margin']:+.4f} | {cells(r.get('health'))} | "
              + (f"{r['loss_first']} -> {r['loss_last']} | {r['align_seconds'] / 60:.1f} min |" if r["kind"] == "align"
                 else "- | - |") for r in rows]
    log.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    (args.out / "sweep.md").write_text("\n".join(table) + "\n")
    plot(rows, args.out / "sweep.png", base_scores["accuracy"])
    print("\n".join(table))


if __name__ == "__main__":
    main()
