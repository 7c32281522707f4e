"""Evaluation: base vs any number of adapters, on the same rows, in one process.

Preference: per pair, the margin is the chosen answer's mean log-likelihood per token minus the
rejected one's (both under the base's chat template, no instruction, up to eval.max_response_tokens
answer tokens); accuracy is the share of positive margins. Every adapter is compared with the base
on the same pairs (training.stats: Wilson interval, exact McNemar test on the pairs that flip,
paired bootstrap of the differences).
Behaviour: greedy answers to prompts (harmful ones from the HH test set, benign ones for
over-refusal), the share that declines by the fixed phrase rule of training.behaviour, and the
generation health figures of training.health.
Each adapter is a bundle attached to the base through rahf_serve.bundle (validated like a served
adapter); the base is the same weights with adapters disabled, so it is scored once.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rahf_serve.bundle import DEFAULT_MAX_RANK, attach, read_bundle, rewrite_manifest
from rahf_serve.models import BaseModel
from rahf_serve.sources import resolve_source

from . import behaviour, stats
from .config import TrainConfig
from .data import Pair, PreferenceData
from .encode import prompt_ids, response_ids
from .forward import shared_prompt_logprob
from .health import measure

BASE = "base"


@dataclass
class PromptSet:
    """Prompts for behaviour: `harmful` ones should be declined, `benign` ones answered."""

    kind: str
    data: PreferenceData
    n: int

    @property
    def pairs(self) -> list[Pair]:
        return self.data.pairs[:self.n]


@torch.no_grad()
def margins(model: torch.nn.Module, tokenizer, pairs: list[Pair], config: TrainConfig,
            desc: str | None = "score") -> torch.Tensor:
    """Per pair: mean log p(chosen token) - mean log p(rejected token), the prompt run once per pair."""
    e = config.eval
    out = torch.empty(len(pairs))
    for i, p in enumerate(tqdm(pairs, desc=desc, leave=False, disable=desc is None)):
        prompt = prompt_ids(tokenizer, p.chat(), e.max_prompt_tokens)
        sides = [response_ids(tokenizer, r, e.max_response_tokens) for r in (p.chosen, p.rejected)]
        chosen, rejected = shared_prompt_logprob(model, prompt, sides).tolist()
        out[i] = chosen - rejected
    return out


def scores(m: torch.Tensor) -> dict[str, Any]:
    return stats.describe(m)


class Models:
    """The base with every adapter attached once; `use(name)` makes one of them (or the base) active.
    `max_rank` lifts the bundle reader's rank limit for trusted local folders (an exact LoRA of a full
    fine-tune has the rank of its widest weight)."""

    def __init__(self, base: BaseModel, adapters: dict[str, str], *, max_rank: int = DEFAULT_MAX_RANK) -> None:
        self.tokenizer = base.tokenizer
        self.names = [BASE, *adapters]
        model: Any = base.model
        for name, source in adapters.items():
            model = attach(model, read_bundle(resolve_source(source), max_rank=max_rank), name, base.fingerprint,
                           base.name)
        model.eval()
        self.model = model

    def use(self, name: str) -> AbstractContextManager:
        if name == BASE:
            if hasattr(self.model, "disable_adapter"):
                return self.model.disable_adapter()
            return torch.no_grad()
        self.model.set_adapter(name)
        return torch.no_grad()


def _reusable(block: dict[str, Any] | None, data: PreferenceData) -> dict[str, Any]:
    """An earlier block on the very same pairs (same rows and content), or an empty one."""
    if block is None:
        return {}
    if block["data"]["sha256"] != data.sha256:
        raise ValueError(f"the earlier evaluation scored other pairs than {data.source} rows {data.rows or 'all'}")
    return block


def preference(models: Models, data: PreferenceData, config: TrainConfig,
               earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    old = _reusable(earlier, data)
    out: dict[str, Any] = {"data": data.describe(), "pairs": len(data.pairs), "scores": {}, "margins": {}}
    for name in [*old.get("margins", {}), *models.names]:
        if name in out["margins"]:
            continue
        if name in old.get("margins", {}):
            m = torch.tensor(old["margins"][name])
        else:
            with models.use(name):
                m = margins(models.model, models.tokenizer, data.pairs, config, f"score {name}")
        out["margins"][name] = [round(float(v), 5) for v in m]  # per pair: anyone can recompute the tests
        base = torch.tensor(out["margins"][BASE])
        out["scores"][name] = stats.describe(m) if name == BASE else stats.compare(base, m)
    return out


def behave(models: Models, prompts: PromptSet, config: TrainConfig,
           earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    old = _reusable(earlier, prompts.data).get("models", {})
    if old and len(next(iter(old.values()))["answers"]) != prompts.n:
        raise ValueError("the earlier evaluation answered a different number of prompts")
    ids = [prompt_ids(models.tokenizer, p.chat(), config.eval.max_prompt_tokens) for p in prompts.pairs]
    out: dict[str, Any] = {"kind": prompts.kind, "data": prompts.data.describe(), "prompts": len(ids), "models": {}}
    for name in [*old, *models.names]:
        if name in out["models"]:
            continue
        if name in old:
            out["models"][name] = old[name]
            continue
        t0 = time.perf_counter()
        with models.use(name):
            health = measure(models.model, models.tokenizer, ids, config.eval.max_new_tokens, config.eval.batch_size,
                             desc=f"answer {prompts.kind} {name}")
        record = {**{k: v for k, v in health.items() if k != "answers"}, "decline": behaviour.decline_rate(health["answers"]),
                  "answers": health["answers"], "seconds": round(time.perf_counter() - t0, 1)}
        if name != BASE:
            flags = [behaviour.declines(a) is not None for a in health["answers"]]
            base_flags = [behaviour.declines(a) is not None for a in out["models"][BASE]["answers"]]
            record["decline_vs_base"] = stats.mcnemar_exact(base_flags, flags)
        out["models"][name] = record
    return out


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several evaluations of the same rows with the same settings as one (their base must agree)."""
    out = json.loads(json.dumps(results[0]))
    for other in results[1:]:
        if other.get("settings") != out.get("settings"):
            raise ValueError("evaluations with different eval settings cannot be merged")
        out["adapters"].update(other["adapters"])
        for key in ("preference", "transfer"):
            if key not in out or key not in other:
                continue
            if other[key]["data"]["sha256"] != out[key]["data"]["sha256"]:
                raise ValueError(f"evaluations of different {key} pairs cannot be merged")
            if max(abs(a - b) for a, b in zip(other[key]["margins"][BASE], out[key]["margins"][BASE], strict=True)) > 1e-4:
                raise ValueError("the evaluations' base scores differ: not the same base or cuts")
            out[key]["margins"].update(other[key]["margins"])
            out[key]["scores"].update(other[key]["scores"])
        for kind, block in other.get("behaviour", {}).items():
            out.setdefault("behaviour", {}).setdefault(kind, block)["models"].update(block["models"])
        for mine, theirs in zip(out["generations"], other["generations"], strict=False):
            mine.update(theirs)
        out["seconds"] = round(out.get("seconds", 0) + other.get("seconds", 0), 1)
    return out


def rename(result: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The evaluation with models renamed old -> new everywhere (all at once, so names can swap)."""
    unknown = sorted(set(names) - set(result["adapters"]))
    if unknown:
        raise ValueError(f"--rename: {unknown} not among the evaluated adapters {sorted(result['adapters'])}")
    if BASE in names.values():
        raise ValueError(f"--rename: {BASE!r} is the base's name")

    def re_key(d: dict[str, Any]) -> dict[str, Any]:
        out = {names.get(k, k): v for k, v in d.items()}
        if len(out) != len(d):
            raise ValueError(f"--rename: two models would share a name among {sorted(out)}")
        return out

    out = json.loads(json.dumps(result))
    out["adapters"] = re_key(out["adapters"])
    for key in ("preference", "transfer"):
        if key in out:
            out[key]["margins"], out[key]["scores"] = re_key(out[key]["margins"]), re_key(out[key]["scores"])
    for block in out.get("behaviour", {}).values():
        block["models"] = re_key(block["models"])
    out["generations"] = [re_key(g) for g in out.get("generations", [])]
    return out


def evaluate(base: BaseModel, adapters: dict[str, str] | str, data: PreferenceData, config: TrainConfig, *,
             transfer: PreferenceData | None = None, prompts: list[PromptSet] = (),
             earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preference scores on `data` (and `transfer`), behaviour on `prompts`, for base and adapters.

    With `earlier` (an earlier result on the same rows with the same eval settings), every model it
    already scored is taken from it instead of being run again, and the result holds them all: the
    base is scored once however many calls add adapters.
    """
    if isinstance(adapters, str):
        adapters = {"aligned": adapters}
    settings = dataclasses.asdict(config.eval)
    if earlier is not None and earlier.get("settings") != settings:
        raise ValueError(f"the earlier evaluation used other eval settings: {earlier.get('settings')} vs {settings}")
    earlier = earlier or {}
    clash = sorted(set(adapters) & set(earlier.get("adapters", {})) | ({BASE} & set(adapters)))
    if clash:
        raise ValueError(f"adapter name(s) {clash} already in the earlier evaluation (or reserved); rename them")
    t0 = time.perf_counter()
    models = Models(base, adapters)
    result: dict[str, Any] = {"adapters": {**earlier.get("adapters", {}), **adapters}, "settings": settings,
                              "preference": preference(models, data, config, earlier.get("preference"))}
    if transfer is not None:
        result["transfer"] = preference(models, transfer, config, earlier.get("transfer"))
    result["behaviour"] = {p.kind: behave(models, p, config, earlier.get("behaviour", {}).get(p.kind)) for p in prompts}
    samples = earlier.get("generations") or [{"prompt": p.messages[-1][1]} for p in data.pairs[:config.eval.generations]]
    tok = models.tokenizer
    for pair, sample in zip(data.pairs, samples, strict=False):
        ids = [prompt_ids(tok, pair.chat(), config.eval.max_prompt_tokens)]
        for name in models.names:
            if name not in sample:
                with models.use(name):
                    sample[name] = measure(models.model, tok, ids, config.eval.max_new_tokens)["answers"][0]
    result["generations"] = samples
    result["seconds"] = round(earlier.get("seconds", 0) + time.perf_counter() - t0, 1)
    return result


def _cell(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def _ci(pair: list[float] | tuple[float, float]) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _preference_table(block: dict[str, Any]) -> list[str]:
    d = block["data"]
    lines = [f"{block['pairs']} pairs from `{d['name']}` rows {d['rows'] or 'all'}.", "",
             "| model | accuracy [95% CI] | vs base (paired bootstrap 95% CI) | McNemar p (flips base/new) "
             "| mean margin [95% CI] |", "| --- | --- | --- | --- | --- |"]
    for name, s in block["scores"].items():
        vs = s.get("vs_base")
        diff = f"{vs['accuracy_diff']:+.3f} {_ci(vs['accuracy_diff_ci'])}" if vs else "-"
        mc = f"{vs['mcnemar']['p_value']:.2g} ({vs['mcnemar']['b']}/{vs['mcnemar']['c']})" if vs else "-"
        lines.append(f"| {name} | {s['accuracy']:.3f} {_ci(s['accuracy_ci'])} | {diff} | {mc} "
                     f"| {s['margin']:+.4f} {_ci(s['margin_ci'])} |")
    return lines


def report(result: dict[str, Any]) -> str:
    lines = [f"# RAHF evaluation: {', '.join(f'`{k}` = {v}' for k, v in result['adapters'].items())}", "",
             "## Preference", ""] + _preference_table(result["preference"])
    if "transfer" in result:
        lines += ["", "## Transfer", ""] + _preference_table(result["transfer"])
    for kind, block in result.get("behaviour", {}).items():
        lines += ["", f"## Behaviour: {kind} prompts", "",
                  f"{block['prompts']} prompts from `{block['data']['name']}`; greedy, "
                  "decline = the fixed phrase rule of training/behaviour.py.", "",
                  "| model | declines [95% CI] | McNemar p (flips) | distinct-2 | mean length | base log-lik |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, m in block["models"].items():
            vs = m.get("decline_vs_base")
            mc = f"{vs['p_value']:.2g} ({vs['b']}/{vs['c']})" if vs else "-"
            lines.append(f"| {name} | {m['decline']['rate']:.3f} {_ci(m['decline']['ci'])} | {mc} | "
                         f"{m['distinct2']:.3f} | {m['mean_length']:.1f} | {m['base_loglik']:.2f} |")
    names = [n for n in result["preference"]["scores"] if n != BASE]
    lines += ["", "## Greedy generations", "", "| prompt | base | " + " | ".join(names) + " |",
              "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    lines += ["| " + " | ".join([_cell(s["prompt"], 200), _cell(s[BASE])] + [_cell(s.get(n, "")) for n in names]) + " |"
              for s in result["generations"]]
    return "\n".join(lines) + "\n"


def write_eval(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    (out_dir / "report.md").write_text(report(result))


def metrics_for(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The manifest's metrics for adapter `name`: held-out scores with intervals and tests."""
    pref = result["preference"]
    base, mine = pref["scores"][BASE], pref["scores"][name]
    out = {"eval_data": pref["data"]["name"], "eval_rows": pref["data"]["rows"], "eval_pairs": pref["pairs"],
           "preference_accuracy_base": base["accuracy"], "preference_accuracy_aligned": mine["accuracy"],
           "preference_accuracy_aligned_ci": mine["accuracy_ci"],
           "preference_accuracy_diff_ci": mine["vs_base"]["accuracy_diff_ci"],
           "mcnemar_p": mine["vs_base"]["mcnemar"]["p_value"],
           "mean_margin_base": base["margin"], "mean_margin_aligned": mine["margin"]}
    if "transfer" in result:
        t = result["transfer"]
        out["transfer"] = {"data": t["data"]["name"], "rows": t["data"]["rows"], "pairs": t["pairs"],
                           "accuracy_base": t["scores"][BASE]["accuracy"], "accuracy_aligned": t["scores"][name]["accuracy"]}
    for kind, block in result.get("behaviour", {}).items():
        base, mine = block["models"][BASE], block["models"][name]
        out[f"decline_rate_{kind}"] = {"base": base["decline"]["rate"], "aligned": mine["decline"]["rate"],
                                       "prompts": block["prompts"],
                                       "distinct2": {"base": base["distinct2"], "aligned": mine["distinct2"]}}
    return out


def record_metrics(bundle_dir: Path, result: dict[str, Any], name: str = "aligned") -> None:
    """Rewrite the bundle (atomically) with held-out scores in its manifest and model card."""
    manifest = dict(read_bundle(bundle_dir).manifest or {})
    manifest["metrics"] = metrics_for(result, name)
    rewrite_manifest(bundle_dir, manifest)
