"""What a joining request costs the streams already running, on the real default model, in one process.

    python benchmarks/join_bench.py --threads 1                       # budgets 64,128,256,512
    python benchmarks/join_bench.py --threads 1 --prompt-tokens 4000 --budgets 96,128 --runs 3
    python benchmarks/join_bench.py --threads 1 --budgets 64 --slowdowns none,2   # the step pacer off / on
    python benchmarks/join_bench.py --threads 1 --budgets 64 --slowdowns 2 --quantiles 0.95,0   # its aim below the bound / at it
    python benchmarks/join_bench.py --threads 1 --budgets 64 --slowdowns 2 --refresh-every 16,0   # re-timing the streams / not
    python benchmarks/join_bench.py --threads 1 --budgets 64 --slowdowns 1.7 --follow-latest 1,0   # aiming below the latest miss / not
    python benchmarks/join_bench.py --threads 1 --budgets 64 --slowdowns 1.7 --matmul-dtype bfloat16   # bfloat16 products

Eight mixed-adapter streams run (greedy); once each has produced `--warm` tokens, one request with a
`--prompt-tokens`-token prompt joins. For each stream, its normal inter-token time is the median gap
between its tokens before the join; its stall is its longest gap from the join until the joining
request's first token. Reported per setting (a `max_num_batched_tokens` budget, with or without a
`max_step_slowdown`), medians over runs (settings run in rounds, one run of each per round, so a busy
spell on a shared machine hits all alike): the worst, 90th-percentile and median gap / normal gap over
the eight streams (target: at most 2x), and the joining request's time to first token. A short prompt (the chat prompt of serve_bench.py) joining seven streams is
measured the same way. Each round also measures the eight streams with nothing joining, over as many tokens
as that round's longest long join lasted: the machine's own noise in the same gap statistics, a floor no
scheduler can go below. The streams are greedy, so the control produces their tokens again; each long
join's gaps are also reported over the control's gaps near the same token of the same stream, which takes
out what the streams' own growing contexts cost (their step is ~40% slower 700 tokens on, join or not).
Each gap is also timed in the engine thread's CPU time (the sinks run on that thread): a gap long in both was
spent running, not waiting for a CPU. With `--noise-floor` each round runs the control twice and reports the
second against the first: what "against nothing joining" reads when nothing joins at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.engine import MATMUL_DTYPES, Engine  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402
from rahf_serve.pacing import PacedStep, quantile  # noqa: E402
from rahf_serve.registry import AdapterRegistry  # noqa: E402
from rahf_serve.request import GenerationRequest, SteeringSpec  # noqa: E402
from rahf_serve.sampling import SamplingParams  # noqa: E402
from tests.helpers import random_lora_bundle  # noqa: E402

Setting = tuple[int, float | None, float, int, bool]
"""max_num_batched_tokens, max_step_slowdown, and the pacer's quantile, refresh_every and follow_latest"""

CHAT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]


@dataclass
class Join:
    ttft: float
    """seconds from submitting the joining request to its first token"""
    ratios: list[float] = field(default_factory=list)
    """every gap of every stream while the request joined, over that stream's median gap before"""
    gaps: list[dict[int, float]] = field(default_factory=list)
    """per stream, its gaps while the request joined in seconds, by the index of the token that opened each"""
    on_cpu: list[float] = field(default_factory=list)
    """beside `ratios`: the engine thread's CPU time over each gap, over the same stream's median before (the
    sinks run on the engine thread). A gap long in wall time but not here is time the thread was not
    running: the host's scheduler, not the engine's steps"""

    @property
    def stall_ratio(self) -> float:
        """worst over the running streams of (longest gap while the request joined) / (median gap before)"""
        return max(self.ratios)

    def quantile(self, q: float) -> float:
        return quantile(self.ratios, q)

    def __str__(self) -> str:
        worst = max(range(len(self.ratios)), key=self.ratios.__getitem__)
        return (f"{summary(self.ratios)} of the normal gap (the worst {self.on_cpu[worst]:.2f}x on the CPU; in the "
                f"engine thread's CPU time {summary(self.on_cpu)}); first token after {self.ttft:.2f} s")


def against_control(join: Join, control: Join, window: int = 8) -> list[float]:
    """Each gap of `join` over the control's median gap within `window` tokens of it, in the same stream.

    The streams' own contexts grow a token a step, so their steps slow down while a long prompt is fed even
    if nothing joins; the control ran the same greedy streams (the same tokens) with nothing joining, so
    this ratio is what the join added at that point of each stream."""
    out = []
    for mine, theirs in zip(join.gaps, control.gaps, strict=True):
        for k, gap in mine.items():
            near = [theirs[j] for j in range(k - window, k + window + 1) if j in theirs]
            if near:
                out.append(gap / statistics.median(near))
    return out


def run_join(engine: Engine, background: list[GenerationRequest], joining: GenerationRequest | None, warm: int,
             span: int = 0) -> Join:
    """`joining` None: the control, the same streams measured over their next `span` tokens with nothing
    joining (the machine's own step-time noise, which no scheduler can remove)."""
    stamps: list[list[float]] = [[] for _ in background]
    cpu: list[list[float]] = [[] for _ in background]
    done = [threading.Event() for _ in background]
    submitted: list[float] = []
    first: list[float] = []
    joined = threading.Event()
    finished = threading.Event()

    def on_join(event) -> None:
        if event.token_ids and not first:
            first.append(time.perf_counter())
        if event.finish_reason:
            finished.set()

    handles = []

    def sink_for(i: int):
        def sink(event) -> None:
            if event.token_ids:
                stamps[i].append(time.perf_counter())
                cpu[i].append(time.thread_time())
            if not submitted and all(len(s) >= warm for s in stamps):
                submitted.append(time.perf_counter())
                if joining is not None:
                    engine.submit(joining, on_join)  # on the engine thread: joins at the next step
                joined.set()
            if joining is None and submitted and not first and len(stamps[i]) >= warm + span:
                first.append(stamps[i][-1])
                finished.set()
            if first and stamps[i][-1] > first[0]:
                handles[i].cancel()  # measured: one gap past the join is enough
            if event.finish_reason:
                done[i].set()
        return sink

    handles += engine.submit_many(background, [sink_for(i) for i in range(len(background))])
    for event in done:
        assert event.wait(600), "a background stream did not finish"
    assert finished.wait(600) and joined.is_set() and first, "the joining request did not start in time: raise "\
        "the background streams' max_tokens"
    ratios, gaps, on_cpu = [], [], []
    for s, c in zip(stamps, cpu, strict=True):
        opened = [k for k, (a, b) in enumerate(zip(s, s[1:], strict=False)) if b > submitted[0] and a <= first[0]]
        assert opened, "a background stream ended before the joining request started: raise its max_tokens"
        before = range(2, opened[0])  # skip the prefill
        for t, out in ((s, ratios), (c, on_cpu)):
            normal = statistics.median(t[k + 1] - t[k] for k in before)
            out += [(t[k + 1] - t[k]) / normal for k in opened]
        gaps.append({k: s[k + 1] - s[k] for k in opened})
    return Join(first[0] - submitted[0], ratios, gaps, on_cpu)


def summary(ratios: list[float]) -> str:
    return (f"worst {max(ratios):.2f}x, p90 {quantile(ratios, 0.9):.2f}x, median {quantile(ratios, 0.5):.2f}x, "
            f"{over_two(ratios)} over 2x")


def over_two(ratios: list[float]) -> str:
    return f"{sum(r > 2 for r in ratios)} of {len(ratios)}"


def over_bound(steps: list[PacedStep], slowdown: float) -> str:
    """How many chunked steps took longer than `slowdown` decode-only steps, and whether the pacer saw
    them coming (its prediction) or the machine stalled (predicted under the bound)."""
    over = [s for s in steps if s.took > slowdown]
    if not over:
        return f"{len(steps)} chunked, none over {slowdown:g}x"
    predicted = [s.predicted for s in over if s.predicted is not None]
    under = sum(p <= slowdown for p in predicted)
    worst = max(over, key=lambda s: s.took)
    return (f"{len(steps)} chunked, {len(over)} over {slowdown:g}x (took median {statistics.median(s.took for s in over):.2f}x; "
            f"{under} of {len(predicted)} predicted under the bound, median prediction "
            f"{statistics.median(predicted) if predicted else float('nan'):.2f}x); worst {worst.took:.2f}x "
            f"predicted {worst.predicted if worst.predicted is not None else float('nan'):.2f}x, "
            f"{worst.tokens} tokens, {worst.keys} keys")


def write_trace(path: Path, run: int, setting: tuple, steps: list[PacedStep], decode_seconds: float | None) -> None:
    with path.open("a") as f:
        for s in steps:
            f.write(json.dumps({"run": run, "setting": list(setting), **s._asdict(),
                                "decode_seconds": decode_seconds}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=4000, help="length of the joining prompt")
    ap.add_argument("--budgets", default="64,128,256,512", help="max_num_batched_tokens values to compare")
    ap.add_argument("--slowdowns", default="none",
                    help="max_step_slowdown values to combine with each budget (none: the budget alone)")
    ap.add_argument("--quantiles", default="0.95",
                    help="pacer quantiles to combine with each slowdown (the share of recent prediction misses "
                         "the aim leaves room for; 0: aim at the bound)")
    ap.add_argument("--refresh-every", default="16",
                    help="pacer refresh_every values to combine with each slowdown (chunked steps between two "
                         "decode-only steps that re-time the streams; 0: never)")
    ap.add_argument("--follow-latest", default="1",
                    help="pacer follow_latest values (1/0) to combine with each slowdown (whether a chunked step's "
                         "miss lowers the next step's aim)")
    ap.add_argument("--noise-floor", action="store_true",
                    help="run the control twice a round and report the second against the first: what the "
                         "'against nothing joining' statistics read when nothing joins at all")
    ap.add_argument("--streams", type=int, default=8, help="running streams the long prompt joins")
    ap.add_argument("--warm", type=int, default=12, help="tokens each stream produces before the join")
    ap.add_argument("--runs", type=int, default=3, help="runs per budget (medians reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--matmul-dtype", choices=list(MATMUL_DTYPES), default="float32",
                    help="what the forward's C products multiply in (rahf-serve --matmul-dtype)")
    ap.add_argument("--trace", type=Path, default=None,
                    help="write every paced step of the long joins here (JSON lines: run, setting, took, "
                         "predicted, tokens, keys, decode_seconds)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quantiles = [float(q) for q in args.quantiles.split(",")]
    refreshes = [int(n) for n in args.refresh_every.split(",")]
    follows = [bool(int(f)) for f in args.follow_latest.split(",")]
    settings: list[Setting] = [(int(b), None if s == "none" else float(s), m, n, f)
                for b in args.budgets.split(",") for s in args.slowdowns.split(",")
                for m in (quantiles if s != "none" else [0.0]) for n in (refreshes if s != "none" else [0])
                for f in (follows if s != "none" else [False])]

    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    tok = base.tokenizer
    chat = tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(100, 40_000, (args.prompt_tokens,), generator=g).tolist()
    # Every run joins the same long prompt, which prefix sharing would take from the run before: off, so
    # that each run computes it.
    engine = Engine(base, max_batch=args.streams + 1, max_model_len=max(args.prompt_tokens, 32) + 2048,
                    max_new_tokens=2048, prefix_sharing=False, matmul_dtype=MATMUL_DTYPES[args.matmul_dtype])
    workdir = Path(tempfile.mkdtemp(prefix="join-bench-"))
    for i, name in enumerate(("kind", "terse")):
        random_lora_bundle(base, workdir / name, seed=i, r=8)
    greedy = SamplingParams(max_tokens=2048, temperature=0.0)

    def streams(n: int) -> list[GenerationRequest]:
        """Mixed rows (base, two adapters, steered) on random 32-token prompts, which rarely end early;
        each is cancelled once it has run past the join."""
        picks = [(None, None), ("kind", None), ("terse", None), (None, ("kind", 2.0))]
        out = []
        for i in range(n):
            adapter, steer = picks[i % len(picks)]
            ids = torch.randint(100, 40_000, (32,), generator=g).tolist()
            out.append(GenerationRequest(ids, greedy, adapter, steering=SteeringSpec(*steer) if steer else None))
        return out

    cases = {
        "short": (streams(args.streams - 1), GenerationRequest(chat, SamplingParams(max_tokens=1, temperature=0.0))),
        "long": (streams(args.streams), GenerationRequest(long_prompt, SamplingParams(max_tokens=1, temperature=0.0),
                                                          "kind")),
    }
    results: dict[tuple[str, Setting], list[Join]] = {(c, s): [] for c in cases for s in settings}
    controls: list[Join] = []
    floors: list[list[float]] = []
    versus: dict[Setting, list[list[float]]] = {s: [] for s in settings}
    with engine:
        AdapterRegistry(engine, workdir).load_dir()
        engine.max_num_batched_tokens = settings[0][0]
        run_join(engine, *cases["short"], args.warm)  # warm-up
        for r in range(args.runs):
            for setting in settings:
                # a fresh pacer per run: each learns its step times from the streams it runs beside
                engine.max_num_batched_tokens, engine.max_step_slowdown, aim, refresh, follow = setting
                if engine.pacer is not None:
                    engine.pacer.quantile, engine.pacer.refresh_every, engine.pacer.follow_latest = aim, refresh, follow
                for case, (background, joining) in cases.items():
                    seen = len(engine.pacer.steps) if engine.pacer is not None else 0
                    results[(case, setting)].append(run_join(engine, background, joining, args.warm))
                    print(f"run {r + 1}, {setting}, {case}: {results[(case, setting)][-1]}", file=sys.stderr,
                          flush=True)
                    if engine.pacer is not None:
                        steps = list(engine.pacer.steps)[seen:]
                        print(f"  paced steps: {over_bound(steps, engine.pacer.slowdown)}", file=sys.stderr, flush=True)
                        if args.trace is not None and case == "long":
                            write_trace(args.trace, r + 1, setting, steps, engine.pacer.decode_seconds)
            # as many gaps as the longest join of the round had, within what the streams may generate
            span = min(max(len(results[("long", s)][-1].ratios) // args.streams for s in settings),
                       greedy.max_tokens - args.warm - 8)
            controls.append(run_join(engine, cases["long"][0], None, args.warm, span))
            print(f"run {r + 1}, nothing joins for {span} tokens: {controls[-1]}", file=sys.stderr, flush=True)
            if args.noise_floor:
                floors.append(against_control(run_join(engine, cases["long"][0], None, args.warm, span), controls[-1]))
                print(f"run {r + 1}, nothing joins again, against the first: {summary(floors[-1])}", file=sys.stderr,
                      flush=True)
            for setting in settings:
                relative = against_control(results[("long", setting)][-1], controls[-1])
                versus[setting].append(relative)
                print(f"run {r + 1}, {setting}, long, against nothing joining at the same token: "
                      f"{summary(relative)}", file=sys.stderr, flush=True)

    print(f"\njoin benchmark: {base.name}, fp32 CPU (products in {args.matmul_dtype}), "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}), median of {args.runs}; load average at end "
          f"{os.getloadavg()[0]:.1f}\n")
    print("Gaps between a running stream's tokens while a request joins, over that stream's median gap "
          "before it joined (worst / 90th percentile / median over all streams' gaps), and the joining "
          "request's time to first token. *On the CPU*: the worst gap in the engine thread's CPU time, over its "
          "median before (a gap longer in wall time than here is time the thread did not run). *Against nothing "
          "joining*: each gap over the same stream's gaps "
          "near the same token in the control round (the streams slow as their contexts grow, join or not); with "
          "--noise-floor, the control's second run against its first in the 'nothing joins' row.\n")
    print(f"| max_num_batched_tokens / max_step_slowdown (pacer quantile, refresh_every, follow_latest) | {args.prompt_tokens}-token prompt joins "
          f"{args.streams} streams | on the CPU | against nothing joining | its first token | chat prompt joins "
          f"{args.streams - 1} streams | its first token |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def gaps(joins: list[Join]) -> str:
        return " / ".join(f"{statistics.median(f(j) for j in joins):.2f}x" for f in (
            lambda j: j.stall_ratio, lambda j: j.quantile(0.9), lambda j: j.quantile(0.5)))

    def relative(runs: list[list[float]]) -> str:
        return " / ".join(f"{statistics.median(f(r) for r in runs):.2f}x" for f in (
            max, lambda r: quantile(r, 0.9), lambda r: quantile(r, 0.5))) + f" ({', '.join(map(over_two, runs))} over 2x)"

    def on_cpu(joins: list[Join]) -> str:
        return f"{statistics.median(max(j.on_cpu) for j in joins):.2f}x"

    print(f"| nothing joins (the machine's noise over as long) | {gaps(controls)} | {on_cpu(controls)} | "
          f"{relative(floors) if floors else ''} | | | |")
    for setting in settings:
        long, short = results[("long", setting)], results[("short", setting)]
        label = (f"{setting[0]} / {setting[1]} ({setting[2]:g}, {setting[3]}, {int(setting[4])})" if setting[1]
                 else f"{setting[0]} / -")
        print(f"| {label} | {gaps(long)} | {on_cpu(long)} | {relative(versus[setting])} | "
              f"{statistics.median(j.ttft for j in long):.1f} s | {gaps(short)} | "
              f"{statistics.median(j.ttft for j in short) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
