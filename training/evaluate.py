"""Evaluation: preference accuracy and margin of base vs aligned, and a markdown report.

Accuracy is the share of pairs whose chosen response has a higher per-token log-likelihood than
the rejected one (both rendered with the base's chat template, no instruction); the margin is the
mean of that difference. The aligned model is the bundle attached to the base through
rahf_serve.bundle (validated like any served adapter); the base is the same weights with the
adapter disabled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rahf_serve.bundle import attach, read_bundle, rewrite_manifest
from rahf_serve.models import BaseModel
from rahf_serve.sources import resolve_source

from .config import TrainConfig
from .data import Pair, PreferenceData
from .encode import encode, prompt_ids
from .forward import response_logprob
from .health import greedy

ADAPTER = "aligned"


@dataclass
class Scores:
    accuracy: float
    margin: float

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": round(self.accuracy, 4), "margin": round(self.margin, 4)}


@torch.no_grad()
def margins(model: torch.nn.Module, tokenizer, pairs: list[Pair], config: TrainConfig, batch_size: int,
            desc: str = "score") -> torch.Tensor:
    """Per pair: mean log p(chosen token) - mean log p(rejected token)."""
    d, pad = config.data, tokenizer.pad_token_id
    out = []
    for start in tqdm(range(0, len(pairs), max(1, batch_size // 2)), desc=desc, leave=False):
        chunk = pairs[start:start + max(1, batch_size // 2)]
        examples = [encode(tokenizer, p.chat(), r, max_prompt=d.max_prompt_tokens, max_response=d.max_response_tokens)
                    for p in chunk for r in (p.chosen, p.rejected)]
        ll, n = response_logprob(model, examples, pad)
        per_token = (ll / n.clamp(min=1)).view(-1, 2).float().cpu()
        out.append(per_token[:, 0] - per_token[:, 1])
    return torch.cat(out)


def scores(m: torch.Tensor) -> Scores:
    return Scores(float((m > 0).float().mean()), float(m.mean()))


def generate(model: torch.nn.Module, tokenizer, pair: Pair, config: TrainConfig) -> str:
    prompt = prompt_ids(tokenizer, pair.chat(), config.data.max_prompt_tokens)
    answer = greedy(model, tokenizer, [prompt], config.eval.max_new_tokens)[0]
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def evaluate(base: BaseModel, adapter: str, data: PreferenceData, config: TrainConfig) -> dict[str, Any]:
    """Scores for base and aligned, plus greedy generations of the first few prompts."""
    bundle = read_bundle(resolve_source(adapter))
    model = attach(base.model, bundle, ADAPTER, base.fingerprint, base.name)
    model.set_adapter(ADAPTER)
    model.eval()
    bs = config.eval.batch_size
    with model.disable_adapter():
        before = scores(margins(model, base.tokenizer, data.pairs, config, bs, "score base"))
    after = scores(margins(model, base.tokenizer, data.pairs, config, bs, "score aligned"))
    samples = []
    for pair in data.pairs[:config.eval.generations]:
        with model.disable_adapter():
            plain = generate(model, base.tokenizer, pair, config)
        samples.append({"prompt": pair.messages[-1][1], "base": plain,
                        "aligned": generate(model, base.tokenizer, pair, config)})
    return {"adapter": str(adapter), "data": data.describe(), "pairs": len(data.pairs),
            "base": before.as_dict(), "aligned": after.as_dict(), "generations": samples}


def _cell(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def report(result: dict[str, Any]) -> str:
    b, a = result["base"], result["aligned"]
    lines = [f"# RAHF evaluation: `{result['adapter']}`", "",
             f"{result['pairs']} pairs from `{result['data']['name']}` rows {result['data']['rows'] or 'all'}.", "",
             "| model | preference accuracy | mean margin (nats/token) |", "| --- | --- | --- |",
             f"| base | {b['accuracy']:.3f} | {b['margin']:+.4f} |",
             f"| aligned | {a['accuracy']:.3f} | {a['margin']:+.4f} |", "",
             "## Greedy generations", "", "| prompt | base | aligned |", "| --- | --- | --- |"]
    lines += [f"| {_cell(s['prompt'], 200)} | {_cell(s['base'])} | {_cell(s['aligned'])} |"
              for s in result["generations"]]
    return "\n".join(lines) + "\n"


def write_eval(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    (out_dir / "report.md").write_text(report(result))


def record_metrics(bundle_dir: Path, result: dict[str, Any]) -> None:
    """Rewrite the bundle (atomically) with held-out scores in its manifest and model card."""
    manifest = dict(read_bundle(bundle_dir).manifest or {})
    manifest["metrics"] = {"eval_rows": result["data"]["rows"], "eval_pairs": result["pairs"],
                           "preference_accuracy_base": result["base"]["accuracy"],
                           "preference_accuracy_aligned": result["aligned"]["accuracy"],
                           "mean_margin_base": result["base"]["margin"],
                           "mean_margin_aligned": result["aligned"]["margin"]}
    rewrite_manifest(bundle_dir, manifest)
