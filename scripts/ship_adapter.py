"""Copy a finished run's bundle into adapters/ under its shipped name, with the one-line command
that reproduces it in the manifest and the model card (the card is rendered from the manifest, so
every number in it comes from the run's own `rahf-train eval --record`).

    python scripts/ship_adapter.py /tmp/runs/dual adapters/smollm2-135m-rahf-dual --config smollm2-dual

The run must have been trained with the shipped config (`--config`): the script checks the run's
saved config against it (every setting that changes a weight, defaults resolved).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rahf_serve.bundle import read_bundle, rewrite_manifest
from training.config import TrainConfig, load_config, target_layers
from training.phase1 import validation_summary
from training.rundir import RunDir

DATA_DIR = "../shared/data"


def trained_with(config: TrainConfig, num_layers: int) -> dict:
    """The settings that decide the trained model: defaults resolved (target layers), bookkeeping
    that does not change a weight (how often phase 3 checkpoints, phase 1 validates or saves
    snapshots) left out; a sweep point trained with the shipped settings compares equal."""
    settings = config.to_dict()
    settings["align"] = {**settings["align"], "target_layers": target_layers(config, num_layers)}
    settings["align"].pop("checkpoint_every")
    for bookkeeping in ("val_every", "snapshot_every"):  # when phase 1 is watched or saved, not what it learns
        settings["phase1"].pop(bookkeeping)
    return settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--config", required=True, help="the shipped config name the run used")
    args = ap.parse_args()
    run = json.loads((args.run / "run.json").read_text())
    bundle = read_bundle(args.run / "bundle")
    num_layers = bundle.manifest["base"]["fingerprint"]["num_hidden_layers"]
    if trained_with(load_config(args.run / "config.yaml"), num_layers) != trained_with(load_config(args.config),
                                                                                      num_layers):
        raise SystemExit(f"{args.run}/config.yaml differs from the shipped config {args.config}")
    if not (bundle.manifest or {}).get("metrics"):
        raise SystemExit(f"{args.run}/bundle has no recorded metrics: run `rahf-train eval --record` first")
    # The command must work from a clone: data under the shared folder is named as the README says.
    data = run["data"] if run["data"].startswith(DATA_DIR) else f"{DATA_DIR}/{Path(run['data']).name}"
    name = args.dest.name
    config = load_config(args.config)
    validation = bundle.manifest.get("phase1_validation") or validation_summary(RunDir(args.run),
                                                                                config.phase1.min_separation)
    # A phase 1 that did not separate was collected from with --force: the command must say so.
    force = " --force" if validation and not validation["separated"] else ""
    manifest = {**bundle.manifest, "name": name, "phase1_validation": validation,
                "data": {**bundle.manifest["data"], "name": data},
                "command": (f"rahf-train run --base {run['base']} --data {data} --rows {run['rows']} "
                            f"--method {run['method']} --config {args.config} --out runs/{name}{force}")}
    rewrite_manifest(args.run / "bundle", manifest, args.dest)
    print(args.dest)


if __name__ == "__main__":
    main()
