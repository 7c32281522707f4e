"""`rahf-serve`: load the base and adapters, start the engine, serve the API and the UI with uvicorn.

    rahf-serve                                  # embedded SmolLM2 + every bundle in ./adapters, UI at /ui
    rahf-serve --adapter kind=./out/kind-scit   # plus one more bundle, served as model "kind"
    rahf-serve --adapter me/rahf-kind@v1 --api-key s3cret --port 9000
    rahf-serve --preset 'gentle={"adapters": [{"name": "smollm2-135m-rahf-scit", "weight": 0.7}],
                                 "steering": {"adapter": "smollm2-135m-rahf-scit", "coeff": 4}}'
    rahf-serve --engine vllm --tensor-parallel-size 2   # the same API on vLLM (installed: docs/scale.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from rahf_serve.engine import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_STEP_SLOWDOWN,
    LORA_DTYPES,
    MATMUL_DTYPES,
)
from rahf_serve.engine_api import ServingEngine
from rahf_serve.errors import RahfError
from rahf_serve.models import EMBEDDED_ALIAS, load_base, load_base_skeleton
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
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together in one step")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 503 queue_full")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens one request may span, prompt + max_tokens (default: the model's context, at "
                        "most 4096); the KV cache for --max-batch rows of this length is allocated at start")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="compute of one engine step, in tokens: about one per decoding row, the rest shared by "
                        "prompts being prefilled (a query deep in a long prompt counts more: it attends to more "
                        "keys), so a long prompt delays running streams by one chunk a step (default for the built-in "
                        f"engine: {DEFAULT_MAX_NUM_BATCHED_TOKENS['cpu']} on CPU, {DEFAULT_MAX_NUM_BATCHED_TOKENS['cuda']} on "
                        "GPU; vLLM's own for --engine vllm)")
    p.add_argument("--max-step-slowdown", type=_slowdown, default=None, metavar="X|off",
                   help="built-in engine: a step that feeds prompt chunks next to decoding rows takes at most this "
                        "many times a decode-only step, by measured step times; caps the chunk below "
                        "--max-num-batched-tokens when the machine is slower than the budget assumes. Running "
                        "streams stall less, a long prompt's first token comes later (default: "
                        f"{DEFAULT_MAX_STEP_SLOWDOWN['cpu']} on CPU, off on GPU; off = the token budget alone)")
    p.add_argument("--max-loras", type=int, default=8,
                   help="adapters and blends resident in LoRA slots at once; others wait in host memory and are "
                        "copied in on demand, least recently used out first")
    p.add_argument("--max-lora-rank", type=int, default=64,
                   help="largest LoRA rank a slot takes (a blend's is the sum of its adapters': the two shipped "
                        "r16 bundles blend to r32); larger adapters fail to load, larger blends get a 400")
    p.add_argument("--lora-dtype", choices=("auto", *LORA_DTYPES), default="auto",
                   help="what LoRA factors are stored in (auto = the model's dtype, bfloat16 with --matmul-dtype "
                        "bfloat16; vLLM's lora_dtype with --engine vllm). bfloat16 under a float32 model halves the "
                        "memory of resident adapters and the bytes an adapter row reads, but rounds the factors: "
                        "results are no longer PEFT's to the last bit")
    p.add_argument("--matmul-dtype", choices=tuple(MATMUL_DTYPES), default="float32",
                   help="built-in engine, float32 model on CPU: what its matrix products multiply in. bfloat16 (CPUs "
                        "with AVX512_BF16, or with AVX2 and no AVX-512) keeps a bfloat16 copy of the weights for them "
                        "and rounds each product's inputs to bfloat16, adapter rows' too (over bfloat16 factors): "
                        "faster decoding, but results are no longer float32's to the last bit")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt in full. By default a request whose prompt starts as another's under "
                        "the same adapter and steering reuses those tokens' keys and values: the built-in engine "
                        "copies them from a request in its batch or a finished one still in its cache, vLLM from its prefix "
                        "cache")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is faster on a machine shared with other jobs")
    p.add_argument("--engine", choices=("builtin", "vllm"), default="builtin",
                   help="what generates: the built-in engine (transformers, one device) or vLLM (paged attention, "
                        "tensor parallelism; needs vLLM in this environment: scripts/setup_vllm_cpu.sh, docs/scale.md)")
    vllm = p.add_argument_group("vLLM engine (--engine vllm only)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs one model copy is split over")
    vllm.add_argument("--pipeline-parallel-size", type=int, default=None, help="pipeline stages the layers are split over")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=None,
                      help="share of each GPU's memory vLLM may take (default 0.9)")
    vllm.add_argument("--kv-cache-gib", type=float, default=None,
                      help="KV cache size in GiB (default: vLLM's; on CPU also VLLM_CPU_KVCACHE_SPACE)")
    vllm.add_argument("--max-cpu-loras", type=int, default=None,
                      help="LoRAs kept in host memory (others are read again from their folders when used)")
    vllm.add_argument("--vllm-compile", action="store_true",
                      help="let vLLM compile the model and capture CUDA graphs (faster on GPUs); steering needs an "
                           "eager model, so requests with `steering` are then refused with a 400")
    vllm.add_argument("--vllm-arg", action="append", default=[], metavar="NAME=VALUE",
                      help="any other vllm.EngineArgs field, VALUE as JSON or a plain string, e.g. "
                           "--vllm-arg swap_space=4 --vllm-arg distributed_executor_backend=ray; repeatable")
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


_VLLM_ONLY = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "kv_cache_gib",
              "max_cpu_loras", "vllm_compile", "vllm_arg")


OFF = 0.0
"""`--max-step-slowdown off`, as parsed"""


def _slowdown(text: str) -> float:
    if text.strip().lower() == "off":
        return OFF
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 1.0 or 'off', got {text!r}") from None
    if value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be above 1.0 (at 1.0 no prompt could be fed next to decoding "
                                         f"rows) or 'off', got {text}")
    return value


def _resolve_slowdown(given: float | None, device_type: str) -> float | None:
    """None (not given) = the device's default; OFF = no pacer."""
    if given is None:
        return DEFAULT_MAX_STEP_SLOWDOWN.get(device_type)
    return None if given == OFF else given


def build_engine(args: argparse.Namespace) -> ServingEngine:
    """The engine `--engine` names; vLLM is imported only when chosen."""
    lora_dtype = None if args.lora_dtype == "auto" else LORA_DTYPES[args.lora_dtype]
    if args.engine == "builtin":
        given = [f"--{k.replace('_', '-')}" for k in _VLLM_ONLY if getattr(args, k)]
        if given:
            raise RahfError(f"{', '.join(given)} only apply to --engine vllm")
        from rahf_serve.engine import Engine

        base = load_base(args.base, device=args.device, dtype=args.dtype)
        budget = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
        return Engine(base, max_batch=args.max_batch, max_queue=args.max_queue, max_new_tokens=args.max_new_tokens,
                      max_model_len=args.max_model_len, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      lora_dtype=lora_dtype, prefix_sharing=not args.no_prefix_caching,
                      matmul_dtype=MATMUL_DTYPES[args.matmul_dtype],
                      max_step_slowdown=_resolve_slowdown(args.max_step_slowdown, base.device.type), **budget)
    if args.matmul_dtype != "float32":
        raise RahfError("--matmul-dtype only applies to the built-in engine (vLLM's products follow --dtype)")
    if args.max_step_slowdown not in (None, OFF):
        raise RahfError("--max-step-slowdown only applies to the built-in engine (vLLM paces with "
                        "--max-num-batched-tokens)")
    from rahf_serve.vllm_engine import VllmEngine, VllmOptions

    options = VllmOptions(
        max_num_seqs=args.max_batch, max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
        lora_dtype=lora_dtype,
        tensor_parallel_size=args.tensor_parallel_size or 1, pipeline_parallel_size=args.pipeline_parallel_size or 1,
        gpu_memory_utilization=args.gpu_memory_utilization or 0.9, kv_cache_gib=args.kv_cache_gib,
        enable_prefix_caching=not args.no_prefix_caching, steering=not args.vllm_compile,
        engine_args=dict(_engine_arg(a) for a in args.vllm_arg))
    base = load_base_skeleton(args.base, device=args.device, dtype=args.dtype)
    return VllmEngine(base, options, max_queue=args.max_queue, max_new_tokens=args.max_new_tokens)


def _engine_arg(arg: str) -> tuple[str, Any]:
    name, sep, value = arg.partition("=")
    if not sep or not name:
        raise RahfError(f"--vllm-arg {arg!r}: expected NAME=VALUE")
    try:
        return name.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return name.replace("-", "_"), value


def stop_with_app(api: Any, engine: ServingEngine) -> None:
    """Stop the engine in the app's shutdown: after it, uvicorn re-raises the SIGTERM it caught, which ends
    the process before `with engine:` can exit, and vLLM's engine processes would outlive it."""
    previous = api.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with previous(app):
            yield
        await asyncio.to_thread(engine.stop)

    api.router.lifespan_context = lifespan


def serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from rahf_serve.api import create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    base = engine.base
    # Started before the adapters load, so that an engine which checks a bundle itself (vLLM) refuses
    # a bad one here, where it is logged and skipped, not when it starts.
    with engine:
        registry = AdapterRegistry(engine, args.adapter_dir)
        for arg in args.adapter:
            registry.load(*split_adapter_arg(arg))
        registry.load_dir()  # after --adapter: a folder already loaded under its name is skipped, not doubled
        for arg in args.preset:
            add_preset_arg(registry, arg)
        api = create_app(engine, registry, api_key=args.api_key)
        stop_with_app(api, engine)
        if not args.no_ui:
            from app.ui import mount_ui

            host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            mount_ui(api, base_url=f"http://{host}:{args.port}", api_key=args.api_key, votes_path=Path(args.votes))
        log.info("serving %s with adapters %s on http://%s:%d (%s engine)", base.name, engine.adapters, args.host,
                 args.port, args.engine)
        uvicorn.run(api, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
