"""`rahf-train`: a thin argparse layer over training.pipeline; one small function per subcommand.

    rahf-train run --base smollm2-135m-instruct --data pairs.json --rows 0:240 --method scit \\
        --config smollm2-scit --out runs/scit
    rahf-train run --out runs/scit --resume            # continue a killed run
    rahf-train phase1|collect|align --out runs/scit    # one phase of an existing (or new) run
    rahf-train eval --adapter runs/scit/bundle --data pairs.json --rows 240:300
    rahf-train export runs/scit/bundle --merged merged/ | --gguf-control-vector cv.gguf
    rahf-train push runs/scit/bundle my-org/smollm2-rahf-scit [--revision v1] [--private]
    accelerate launch --multi_gpu --num_processes 2 -m training.cli run ...   # several GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m training.cli run ...  # CPU, gloo
(`accelerate launch --cpu --num_processes 2` starts ONE process: accelerate's CPU launcher needs mpirun.)

To add a subcommand: write `add_NAME(sub)` that builds its parser and sets `func`, and list it in
SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rahf_serve.errors import RahfError

from .data import DataError


def _run_args(p: argparse.ArgumentParser, *, new_run: bool) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--base", help="base model: the alias smollm2-135m-instruct, a Hub id or a directory")
    p.add_argument("--data", help="preference data: a .json/.jsonl file or a Hub data set name")
    p.add_argument("--rows", help="row range START:STOP of the data, e.g. 0:240 (default: all)")
    p.add_argument("--split", help="data set split for Hub data sets (default: train)")
    p.add_argument("--method", choices=["scit", "dual", "lorra"],
                   help="RAHF variant, or lorra: the ablation without phase 1 (default: the config's, scit)")
    p.add_argument("--config", help="YAML config file, or a shipped config name (tiny, smollm2-scit, ...)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    if new_run:
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out: finished phases are skipped, phase 3 resumes "
                            "from its last checkpoint")


def _open(args: argparse.Namespace, resume: bool = False):
    from .pipeline import open_run

    return open_run(args.out, base=args.base, data=args.data, rows=args.rows, split=args.split,
                    method=args.method, config=args.config, seed=args.seed, resume=resume,
                    command=shlex.join(["rahf-train", *args.argv]))


def cmd_run(args: argparse.Namespace) -> None:
    from .align import PHASE as BUNDLE
    from .pipeline import run_all

    ctx = _open(args, args.resume)
    run_all(ctx, args.resume)
    if args.push_to_hub and ctx.acc.is_main_process:
        _push_run(ctx.out / BUNDLE, args.push_to_hub)
    ctx.acc.end_training()  # tear the process group down: gloo aborts at exit otherwise


def _push_run(bundle: Path, spec: str) -> None:
    """Push a finished run's bundle; a failed push says how to retry without training again."""
    from rahf_serve.hub import parse_spec, push_bundle

    repo_id, revision = parse_spec(spec)
    try:
        print(push_bundle(bundle, repo_id, revision=revision), flush=True)
    except RahfError as err:
        retry = f"rahf-train push {bundle} {repo_id}" + (f" --revision {revision}" if revision else "")
        raise type(err)(f"{err} (the bundle is saved: retry with `{retry}`)") from err


def cmd_push(args: argparse.Namespace) -> None:
    from rahf_serve.hub import push_bundle

    print(push_bundle(args.bundle, args.repo_id, revision=args.revision, private=args.private,
                      commit_message=args.commit_message), flush=True)


def cmd_phase(args: argparse.Namespace) -> None:
    from .pipeline import require, run_phase

    ctx = _open(args)
    require(ctx, args.phase)
    run_phase(ctx, args.phase)
    ctx.acc.end_training()


def cmd_eval(args: argparse.Namespace) -> None:
    from rahf_serve.models import load_base

    from .config import TrainConfig, load_config
    from .data import load_preferences
    from .evaluate import evaluate, record_metrics, report, write_eval
    from .plots import plot_accuracy

    if args.record and not Path(args.adapter).is_dir():
        raise ValueError(f"--record rewrites a local bundle folder; {args.adapter} is not one")
    config = load_config(args.config) if args.config else TrainConfig()
    data = load_preferences(args.data, args.rows, args.split)
    print(data.summary(), flush=True)
    result = evaluate(load_base(args.base), args.adapter, data, config)
    text = report(result)
    if args.out:
        write_eval(args.out, result)
        plot_accuracy(result, args.out / "accuracy.png")
    if args.record:
        record_metrics(Path(args.adapter), result)
        print(f"scores recorded in {Path(args.adapter) / 'rahf.json'}", flush=True)
    print(text, flush=True)


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="all three phases (and eval when the config names held-out rows)")
    _run_args(p, new_run=True)
    p.add_argument("--push-to-hub", metavar="ORG/NAME[@BRANCH]",
                   help="after training (and eval), upload the bundle to this Hub repo in one commit")
    p.set_defaults(func=cmd_run)


def add_phases(sub: argparse._SubParsersAction) -> None:
    helps = {"phase1": "phase 1: SCIT or DualLLMs preference training",
             "collect": "phase 2: hidden-state differences through the phase-1 model(s)",
             "align": "phase 3: train the final LoRA and write the bundle"}
    for phase, text in helps.items():
        p = sub.add_parser(phase, help=text)
        _run_args(p, new_run=False)
        p.set_defaults(func=cmd_phase, phase=phase)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="preference accuracy and margin of base vs aligned, markdown report")
    p.add_argument("--adapter", required=True, help="bundle: a local folder or a Hub repo org/name[@rev]")
    p.add_argument("--data", required=True, help="preference data: a .json/.jsonl file or a Hub data set name")
    p.add_argument("--rows", help="row range START:STOP, e.g. 240:300 (default: all)")
    p.add_argument("--split", help="data set split for Hub data sets (default: train)")
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model the adapter was trained on")
    p.add_argument("--config", help="config whose data/eval settings to use (sequence lengths, generations)")
    p.add_argument("--out", type=Path, help="folder for eval.json and report.md")
    p.add_argument("--record", action="store_true",
                   help="also write the scores into the bundle's rahf.json metrics (local bundle folder only)")
    p.set_defaults(func=cmd_eval)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_control_vector, export_merged

    if args.merged:
        out = export_merged(args.bundle, args.merged, base=args.base)
        print(f"merged model: {out}", flush=True)
    else:
        result = export_control_vector(args.bundle, args.gguf_control_vector, coeff=args.coeff)
        pairs = ", ".join(f"{layer}->direction.{n}" for layer, n in result.directions.items())
        print(f"control vector: {result.path} ({pairs})", flush=True)
        if result.skipped:
            print(f"left out layers {result.skipped}: llama.cpp has no control vector after block 0", flush=True)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a merged full model, or the vectors as a llama.cpp control vector")
    p.add_argument("bundle", help="bundle: a local folder or a Hub repo org/name[@rev]")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", type=Path, metavar="OUT", help="folder for the LoRA merged into the base")
    what.add_argument("--gguf-control-vector", type=Path, metavar="OUT",
                      help="GGUF file for llama.cpp --control-vector")
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model to merge into (--merged)")
    p.add_argument("--coeff", type=float, default=1.0,
                   help="scale stored in the control vector (--gguf-control-vector)")
    p.set_defaults(func=cmd_export)


def add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a bundle to the Hugging Face Hub in one commit, print the commit URL",
                       description="Token from HF_TOKEN or the `hf auth login` cache; HF_ENDPOINT picks the Hub.")
    p.add_argument("bundle", type=Path, help="bundle folder, e.g. runs/scit/bundle (validated before upload)")
    p.add_argument("repo_id", help="Hub repo org/name; created when missing")
    p.add_argument("--revision", help="branch to commit to; created from main when missing (default: main)")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--commit-message", help="default: 'Upload RAHF adapter bundle NAME'")
    p.set_defaults(func=cmd_push)


SUBCOMMANDS = [add_run, add_phases, add_eval, add_export, add_push]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rahf-train", description="Train RAHF adapter bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the bundle manifest as the command that made it
    try:
        args.func(args)
    except (RahfError, DataError, ValueError) as err:
        print(f"rahf-train {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
