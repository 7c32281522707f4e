"""The Hub model card (README.md) rendered from a bundle's manifest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def render_card(manifest: Mapping[str, Any] | None, adapter_config: Mapping[str, Any]) -> str:
    """A Hub model card: YAML front matter Hub understands, then what a user needs to know."""
    base = (manifest or {}).get("base", {}).get("id") or adapter_config.get("base_model_name_or_path") or "unknown"
    lines = ["---", "library_name: peft", f"base_model: {base}", "tags:", "- rahf", "- lora",
             "- representation-engineering", "- alignment", "license: apache-2.0", "---", ""]
    if not manifest:
        lines += ["# LoRA adapter", "", f"A PEFT LoRA adapter for `{base}`.", ""]
        return "\n".join(lines)
    name = manifest.get("name", "RAHF adapter")
    lines += [f"# {name}", "",
              f"A LoRA adapter for `{base}` trained with RAHF (Representation Alignment from Human "
              f"Feedback, arXiv 2312.15997), method **{manifest.get('method')}**, by "
              "rahf-serve's `rahf-train`. It loads with plain PEFT and with rahf-serve, which also "
              "uses its mean difference vectors (`rahf_vectors.safetensors`) for steering.", ""]
    if manifest.get("base", {}).get("note"):
        lines += [f"Base weights: {manifest['base']['note']}.", ""]
    data = manifest.get("data") or {}
    if data:
        lines += ["## Data", "", f"`{data.get('name')}`: {data.get('pairs')} preference pairs "
                  f"(sha256 `{str(data.get('sha256', ''))[:16]}…`)."]
        mix = data.get("phase1_mix")
        if mix:
            lines += ["", f"Phase 1 also trained on `{mix.get('name')}` rows {mix.get('rows') or 'all'}: "
                      f"{mix.get('pairs')} pairs (sha256 `{str(mix.get('sha256', ''))[:16]}…`)."]
        lines += [""]
    lines += ["## Training", ""]
    if manifest.get("composition"):
        lines += [f"- model: {manifest['composition']}"]
    val = manifest.get("phase1_validation")
    if val:
        verdict = "separated" if val["separated"] else "did NOT separate (collected with --force)"
        lines += [f"- phase 1 on validation rows {val['rows']}: separation {val['first']['separation']:+.4f} -> "
                  f"{val['last']['separation']:+.4f} nats/token, {verdict}"]
    lines += [f"- target layers: {manifest.get('layers')}", f"- alpha: {manifest.get('alpha')}",
              f"- LoRA: {json.dumps(manifest.get('lora', {}))}", f"- steps: {json.dumps(manifest.get('steps', {}))}"]
    if manifest.get("command"):
        lines += ["", "Reproduce with:", "", "```bash", str(manifest["command"]), "```"]
    metrics = manifest.get("metrics") or {}
    if "preference_accuracy_aligned" in metrics:  # what `rahf-train eval --record` writes
        lines += ["", "## Metrics", "", *_metric_lines(metrics)]
    elif metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    lines += ["", "## Use", "", "```bash", f"rahf-serve --adapter {name}=<this repo or folder>", "```", ""]
    return "\n".join(lines)


def _interval(values: Any) -> str:
    return f" [{values[0]:.3f}, {values[1]:.3f}]" if values else ""


def _metric_lines(m: Mapping[str, Any]) -> list[str]:
    """The card's metrics: held-out preference scores with 95% intervals and the paired test."""
    where = f"`{m['eval_data']}` rows {m.get('eval_rows') or 'all'}" if m.get("eval_data") else f"rows {m.get('eval_rows')}"
    lines = [f"Held-out {where} ({m.get('eval_pairs')} pairs). Preference accuracy: share of pairs whose chosen "
             "answer has the higher mean per-token log-likelihood (plain chat template, no instruction); margin: "
             "mean of that difference in nats/token. Intervals are 95%.", "",
             "| model | preference accuracy | mean margin |", "| --- | --- | --- |",
             f"| base | {m['preference_accuracy_base']:.3f} | {m['mean_margin_base']:+.4f} |",
             f"| this adapter | {m['preference_accuracy_aligned']:.3f}{_interval(m.get('preference_accuracy_aligned_ci'))} "
             f"| {m['mean_margin_aligned']:+.4f} |"]
    if "mcnemar_p" in m:
        diff = m["preference_accuracy_aligned"] - m["preference_accuracy_base"]
        lines += ["", f"Against the base on the same pairs: {diff:+.3f}{_interval(m.get('preference_accuracy_diff_ci'))} "
                      f"(paired bootstrap), exact McNemar p = {m['mcnemar_p']:.2g}."]
    if "transfer" in m:
        t = m["transfer"]
        lines += ["", f"Transfer, `{t['data']}` rows {t['rows']} ({t['pairs']} pairs): accuracy base "
                      f"{t['accuracy_base']:.3f}, this adapter {t['accuracy_aligned']:.3f}."]
    for key, d in m.items():
        if key.startswith("decline_rate_"):
            health = d.get("distinct2")
            lines += ["", f"Greedy answers to {d['prompts']} {key.removeprefix('decline_rate_')} prompts that decline "
                          f"(fixed phrase rule): base {d['base']:.2f}, this adapter {d['aligned']:.2f}"
                          + (f"; distinct-2 of those answers (repetition: lower is worse) base {health['base']:.3f}, "
                             f"this adapter {health['aligned']:.3f}." if health else ".")]
    return lines
