"""`rahf-serve`: load the base and adapters, start the engine, serve the API and the UI with uvicorn.

    rahf-serve                                  # embedded SmolLM2 + every bundle in ./adapters, UI at /ui
    rahf-serve --adapter kind=./out/kind-scit   # plus one more bundle, served as model "kind"
    rahf-serve --adapter me/rahf-kind@v1 --api-key s3cret --port 9000
    rahf-serve --preset 'gentle={"adapters": [{"name": "smollm2-135m-rahf-scit", "weight": 0.7}],
                                 "steering": {"adapter": "smollm2-135m-rahf-scit", "coeff": 4}}'
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rahf_serve.engine import Engine
from rahf_serve.errors import RahfError
from rahf_serve.models import EMBEDDED_ALIAS, load_base
from rahf_serve.registry import AdapterRegistry
from rahf_serve.sources import split_adapter_arg

log = logging.getLogger("rahf_serve.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rahf-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=EMBEDDED_ALIAS, help="base model: the embedded alias, a Hub id or a directory")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]SOURCE",
                   help="serve a bundle (local folder or Hub org/name[@rev]) as NAME; repeatable")
    p.add_argument("--preset", action="append", default=[], metavar="NAME=JSON",
                   help='serve a blend and/or steering as model NAME, e.g. '
                        'NAME=\'{"adapters": [{"name": "A", "weight": 0.7}], "steering": {"adapter": "A", "coeff": 4}}\'; '
                        "repeatable (POST /v1/presets adds more at run time)")
    p.add_argument("--adapter-dir", default="adapters",
                   help="bundles here are all loaded at start; POST /v1/adapters reads local paths only from here")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route and the UI")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together in one step")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 503 queue_full")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens one request may span, prompt + max_tokens (default: the model's context, at "
                        "most 4096); the KV cache for --max-batch rows of this length is allocated at start")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens one engine step feeds: one per decoding row, the rest shared by prompts being "
                        "prefilled, so a long prompt delays running streams by one chunk a step")
    p.add_argument("--max-loras", type=int, default=8,
                   help="adapters and blends resident in LoRA slots at once; others wait in host memory and are "
                        "copied in on demand, least recently used out first")
    p.add_argument("--max-lora-rank", type=int, default=64,
                   help="largest LoRA rank a slot takes (a blend's is the sum of its adapters': the two shipped "
                        "r16 bundles blend to r32); larger adapters fail to load, larger blends get a 400")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is faster on a machine shared with other jobs")
    p.add_argument("--no-ui", action="store_true", help="serve the API only")
    p.add_argument("--votes", default="data/votes.jsonl", help="where the UI appends preference votes")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        serve(args)
    except RahfError as err:  # a bad --base or --adapter: one line that says what, not a traceback
        raise SystemExit(f"rahf-serve: error: {err}") from None


def add_preset_arg(registry: AdapterRegistry, arg: str) -> None:
    """`--preset NAME=JSON`: the JSON is a POST /v1/presets body without its name, parsed by the same schema."""
    from pydantic import ValidationError

    from rahf_serve.api.protocol import Selection

    name, sep, spec = arg.partition("=")
    if not sep:
        raise RahfError(f"--preset {arg!r}: expected NAME=JSON")
    try:
        selection = Selection.model_validate_json(spec)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the JSON"
        raise RahfError(f"--preset {name}: {first['msg']} (at {where})") from None
    registry.add_preset(name, selection.blend(), selection.steering_spec(), selection.describe())


def serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from rahf_serve.api import create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = load_base(args.base, device=args.device, dtype=args.dtype)
    engine = Engine(base, max_batch=args.max_batch, max_queue=args.max_queue, max_new_tokens=args.max_new_tokens,
                    max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
    registry = AdapterRegistry(engine, args.adapter_dir)
    for arg in args.adapter:
        registry.load(*split_adapter_arg(arg))
    registry.load_dir()  # after --adapter: a folder already loaded under its name is skipped, not doubled
    for arg in args.preset:
        add_preset_arg(registry, arg)
    api = create_app(engine, registry, api_key=args.api_key)
    if not args.no_ui:
        from app.ui import mount_ui

        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        mount_ui(api, base_url=f"http://{host}:{args.port}", api_key=args.api_key, votes_path=Path(args.votes))
    log.info("serving %s with adapters %s on http://%s:%d", base.name, engine.adapters, args.host, args.port)
    with engine:
        uvicorn.run(api, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
