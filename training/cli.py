"""`rahf-train`: a thin argparse layer over training.pipeline; one small function per subcommand.

    rahf-train run --base smollm2-135m-instruct --data pairs.json --rows 0:240 --method scit \\
        --config smollm2-scit --out runs/scit
    rahf-train run --out runs/scit --resume            # continue a killed run
    rahf-train run --data pairs.json --rows 0:240 --config smollm2-scit --out runs/a10 \\
        --align.alpha 10 --align.target_layers 9,11,13 --phase1.val_rows 200:240   # any config field
    rahf-train phase1|collect|align --out runs/scit    # one phase of an existing (or new) run
    rahf-train pick-phase1 runs/dual --out runs/dual-g30 --step good=30   # a shorter phase 1 from
    rahf-train run --out runs/dual-g30 --resume        # snapshots (--phase1.snapshot_every), then 2 and 3
    rahf-train eval --adapter runs/scit/bundle --data pairs.json --rows 240:300
    rahf-train export runs/scit/bundle --merged merged/ | --gguf-control-vector cv.gguf
    rahf-train push runs/scit/bundle my-org/smollm2-rahf-scit [--revision v1] [--private]
    accelerate launch --multi_gpu --num_processes 2 -m training.cli run ...   # several GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m training.cli run ...  # CPU, gloo
(`accelerate launch --cpu --num_processes 2` starts ONE process: accelerate's CPU launcher needs mpirun.)

`run`, `phase1`, `collect` and `align` take any config field as `--SECTION.FIELD VALUE` (or
`--SECTION.FIELD=VALUE`; top-level fields as `--FIELD`), parsed by the field's type: lists
comma-separated, `none` for an optional field, booleans true/false. They override --config and
are saved in the run's config.yaml. `--base` of a new `run` defaults to smollm2-135m-instruct.

To add a subcommand: write `add_NAME(sub)` that builds its parser and sets `func`, and list it in
SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

from rahf_serve.errors import RahfError

from .config import TrainConfig, apply_overrides, setting_keys, split_overrides
from .data import DataError

DEFAULT_BASE = "smollm2-135m-instruct"
FORCE_HELP = ("collect difference vectors even if phase 1 did not separate preferred from dispreferred "
              "on its validation rows")
SETTINGS_HELP = ("Any config field can also be set as --SECTION.FIELD VALUE, e.g. --align.alpha 10 "
                 "--align.target_layers 9,11,13 --phase1.val_rows none (lists comma-separated, none for "
                 "an optional field); these override --config and are saved in the run's config.yaml.")
_SETTING = re.compile(r"--[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(=.*)?", re.DOTALL)  # --section.field[=value]


def _run_args(p: argparse.ArgumentParser, *, new_run: bool) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--base", help="base model: the alias smollm2-135m-instruct, a Hub id or a directory"
                   f" (default for a new run: {DEFAULT_BASE})")
    p.add_argument("--data", help="preference data: a .json/.jsonl file or a Hub data set name")
    p.add_argument("--rows", help="row range START:STOP of the data, e.g. 0:240 (default: all)")
    p.add_argument("--split", help="data set split for Hub data sets (default: train)")
    p.add_argument("--method", choices=["scit", "dual", "lorra"],
                   help="RAHF variant, or lorra: the ablation without phase 1 (default: the config's, scit)")
    p.add_argument("--config", help="YAML config file, or a shipped config name (tiny, smollm2-scit, ...)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    if new_run:
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out: finished phases are skipped, phases 1 and 3 resume "
                            "from their last checkpoints")
    else:
        p.add_argument("--resume", action="store_true",
                       help="continue this phase from its last checkpoint in --out (phases 1 and 3 keep "
                            "them); without it an earlier attempt's checkpoints are discarded")
    p.epilog = SETTINGS_HELP
    p.set_defaults(overrides=[])  # marks a subcommand that takes --SECTION.FIELD settings


def _open(args: argparse.Namespace, resume: bool = False):
    from .pipeline import open_run
    from .rundir import RunDir

    base = args.base
    if base is None and not RunDir(args.out).run_file.is_file():
        base = DEFAULT_BASE  # a new run; an existing one keeps its saved base
    return open_run(args.out, base=base, data=args.data, rows=args.rows, split=args.split,
                    method=args.method, config=args.config, seed=args.seed, resume=resume,
                    command=shlex.join(["rahf-train", *args.argv]), overrides=args.overrides,
                    force=getattr(args, "force", False))


def cmd_run(args: argparse.Namespace) -> None:
    from .pipeline import run_all

    ctx = _open(args, args.resume)
    run_all(ctx, args.resume)
    if args.push_to_hub and ctx.acc.is_main_process:
        _push_run(ctx.run.bundle, args.push_to_hub)
    ctx.acc.end_training()  # tear the process group down: gloo aborts at exit otherwise


def _push_run(bundle: Path, spec: str) -> None:
    """Push a finished run's bundle; a failed push says how to retry without training again."""
    from rahf_serve.hub import push_bundle
    from rahf_serve.sources import parse_spec

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

    ctx = _open(args, args.resume)
    require(ctx, args.phase)
    run_phase(ctx, args.phase, args.resume)
    ctx.acc.end_training()


def cmd_eval(args: argparse.Namespace) -> None:
    from rahf_serve.models import load_base
    from rahf_serve.sources import split_adapter_arg

    from .config import TrainConfig, load_config
    from .data import load_preferences
    from .evaluate import PromptSet, evaluate, merge, record_metrics, rename, report, write_eval
    from .plots import plot_accuracy

    if not args.adapter and not args.extend:
        raise ValueError("give at least one --adapter (or --extend earlier evaluations to merge them)")
    adapters = dict(split_adapter_arg(a) for a in args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("two --adapter flags share a name; name them NAME=SOURCE")
    if args.record:
        not_local = [s for s in adapters.values() if not Path(s).is_dir()]
        if not_local:
            raise ValueError(f"--record rewrites local bundle folders; {not_local[0]} is not one")
    config = load_config(args.config) if args.config else TrainConfig()
    data = load_preferences(args.data, args.rows, args.split)
    print(data.summary(), flush=True)
    transfer = load_preferences(args.transfer_data, args.transfer_rows) if args.transfer_data else None
    prompts = [PromptSet("harmful", data, args.behaviour)] if args.behaviour else []
    if args.benign_data:
        prompts.append(PromptSet("benign", load_preferences(args.benign_data, args.benign_rows), args.benign))
    earlier = merge([json.loads(p.read_text()) for p in args.extend]) if args.extend else None
    if args.rename:
        if earlier is None:
            raise ValueError("--rename renames models of the --extend evaluations; give --extend")
        earlier = rename(earlier, dict(_name_pair(r) for r in args.rename))
    result = evaluate(load_base(args.base), adapters, data, config, transfer=transfer, prompts=prompts,
                      earlier=earlier)
    text = report(result)
    if args.out:
        write_eval(args.out, result)
        plot_accuracy(result, args.out / "accuracy.png")
    if args.record:
        for name, source in adapters.items():
            record_metrics(Path(source), result, name)
            print(f"scores recorded in {Path(source) / 'rahf.json'}", flush=True)
    print(text, flush=True)


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="all three phases (and eval when the config names held-out rows)")
    _run_args(p, new_run=True)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
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
        if phase == "collect":
            p.add_argument("--force", action="store_true", help=FORCE_HELP)
        p.set_defaults(func=cmd_phase, phase=phase)


def cmd_pick_phase1(args: argparse.Namespace) -> None:
    from .pipeline import adopt_snapshots, open_run
    from .rundir import RunDir

    source, out = RunDir(args.source), RunDir(args.out)
    if not source.run_file.is_file():
        raise ValueError(f"{args.source} holds no run")
    if out.run_file.is_file():
        raise ValueError(f"{args.out} already holds a run; pick into a new directory")
    steps = dict(_name_pair(text, "--step", "ADAPTER=STEP") for text in args.step)
    bad = {k: v for k, v in steps.items() if not v.isdigit()}
    if bad:
        raise ValueError(f"--step takes ADAPTER=STEP with a whole number of steps, got {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in (source.run_file, source.config_file):
        shutil.copyfile(path, args.out / path.name)
    ctx = open_run(args.out, base=None, data=None, rows=None, split=None, method=None, config=None, seed=None,
                   resume=True, command=shlex.join(["rahf-train", *args.argv]))
    record = adopt_snapshots(ctx, source, {k: int(v) for k, v in steps.items()})
    picked = ", ".join(f"{name} at step {step}" for name, step in record["snapshots"].items())
    separation = (f"; validation separation {record['separation']:+.4f} nats/token" if "separation" in record
                  else "")
    print(f"{args.out}: phase 1 is {args.source}'s {picked}{separation}. "
          f"Continue with `rahf-train run --out {args.out} --resume`.", flush=True)


def add_pick_phase1(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pick-phase1", help="a new run whose phase 1 is another run's phase-1 snapshots",
                       description="Copies RUN's settings into --out and makes its phase 1 the snapshots "
                                   "RUN saved (--phase1.snapshot_every) at the given steps, with the "
                                   "validation separation measured again; phases 2 and 3 then run with "
                                   "`rahf-train run --out OUT --resume`.")
    p.add_argument("source", type=Path, metavar="RUN", help="a run whose phase 1 finished with snapshots")
    p.add_argument("--out", type=Path, required=True, help="the new run directory")
    p.add_argument("--step", action="append", default=[], metavar="ADAPTER=STEP",
                   help="the snapshot step of one phase-1 adapter, e.g. good=30 (repeatable; "
                        "an adapter not named keeps its last step)")
    p.set_defaults(func=cmd_pick_phase1)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="base vs adapters: preference accuracy with paired tests, behaviour, report",
                       description="Scores the base once and every --adapter on the same rows: preference "
                                   "accuracy and margin with 95%% intervals, paired bootstrap and exact McNemar "
                                   "tests against the base; with --behaviour/--benign-data, greedy answers and "
                                   "the share that declines by a fixed phrase rule.")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]SOURCE",
                   help="bundle: a local folder or a Hub repo org/name[@rev]; repeat to compare several")
    p.add_argument("--data", required=True, help="preference data: a .json/.jsonl file or a Hub data set name")
    p.add_argument("--rows", help="row range START:STOP, e.g. 240:300 (default: all)")
    p.add_argument("--split", help="data set split for Hub data sets (default: train)")
    p.add_argument("--transfer-data", help="a second preference set scored the same way (e.g. another domain)")
    p.add_argument("--transfer-rows", help="row range of --transfer-data")
    p.add_argument("--behaviour", type=int, default=0, metavar="N",
                   help="greedy answers to the first N prompts of --data; report how many decline")
    p.add_argument("--benign-data", help="preference data whose prompts are benign (over-refusal check)")
    p.add_argument("--benign-rows", help="row range of --benign-data")
    p.add_argument("--benign", type=int, default=50, metavar="N", help="benign prompts answered (default 50)")
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model the adapters were trained on")
    p.add_argument("--config", help="config whose eval settings to use (token cuts, generation length)")
    p.add_argument("--out", type=Path, help="folder for eval.json, report.md and accuracy.png")
    p.add_argument("--extend", type=Path, action="append", default=[], metavar="EVAL_JSON",
                   help="an earlier eval.json on the same rows and settings: the models it scored (the base "
                        "included) are reused, not run again, and the new report holds them all; repeat to "
                        "merge several (with no --adapter: only merge)")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="rename a model of the --extend evaluations in the result (all renames at once, so "
                        "two can swap), e.g. when a newly shipped adapter takes over an old one's name")
    p.add_argument("--record", action="store_true",
                   help="also write each adapter's scores into its bundle's rahf.json (local folders only)")
    p.set_defaults(func=cmd_eval)


def _name_pair(text: str, flag: str = "--rename", form: str = "OLD=NEW") -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not (sep and old and new):
        raise ValueError(f"{flag} takes {form}, got {text!r}")
    return old, new


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


SUBCOMMANDS = [add_run, add_phases, add_pick_phase1, add_eval, add_export, add_push]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rahf-train", description="Train RAHF adapter bundles.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line, without running it; run subcommands get `overrides`, the
    --SECTION.FIELD settings checked against the config's field types (argparse errors otherwise)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        args.overrides = _settings(parser, args, extra)
    args.argv = argv  # recorded in the bundle manifest as the command that made it
    return args


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The leftover tokens as `--key=value` settings; anything else is argparse's usual error."""
    if "overrides" not in vars(args):  # not a run subcommand
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    top = {f"--{key}" for key in setting_keys() if "." not in key}  # warmup_ratio, weight_decay, ...
    stray, i = [], 0
    while i < len(extra):
        token = extra[i]
        if not (_SETTING.fullmatch(token) or token.partition("=")[0] in top):
            stray.append(token)
            i += 1
            continue
        valued = "=" not in token and i + 1 < len(extra) and not extra[i + 1].startswith("--")
        i += 2 if valued else 1
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    try:
        apply_overrides(TrainConfig(), extra)  # bad values and unknown keys fail before anything loads
    except ValueError as err:
        parser.error(str(err))
    return [f"--{key}={value}" for key, value in split_overrides(extra)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except (RahfError, DataError, ValueError) as err:
        print(f"rahf-train {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
