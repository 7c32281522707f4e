"""Evaluation against direct computations: shared-prompt scoring, paired statistics, behaviour."""

import json

import pytest
import torch

from training.config import load_config
from training.data import load_preferences
from training.encode import encode, prompt_ids, response_ids
from training.evaluate import PromptSet, evaluate, margins, report
from training.forward import response_logprob, shared_prompt_logprob

from .conftest import DATA


def test_shared_prompt_scores_equal_separate_passes(tiny_base):
    tok = tiny_base.tokenizer
    pairs = load_preferences(str(DATA), "0:6").pairs
    for p in pairs:
        prompt = prompt_ids(tok, p.chat(), 64)
        sides = [response_ids(tok, r, 40) for r in (p.chosen, p.rejected)]
        with torch.no_grad():
            got = shared_prompt_logprob(tiny_base.model, prompt, sides)
            # reference: each side on its own, unpadded, through the full forward
            for side, value in zip(sides, got, strict=True):
                ids = torch.tensor([prompt + side])
                logp = torch.log_softmax(tiny_base.model(input_ids=ids).logits[0, :-1].float(), -1)
                want = logp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).mean()
                assert abs(float(value) - float(want)) < 1e-4


def test_margins_match_the_padded_batch_path(tiny_base):
    cfg = load_config("tiny")
    tok = tiny_base.tokenizer
    pairs = load_preferences(str(DATA), "0:5").pairs
    with torch.no_grad():
        got = margins(tiny_base.model, tok, pairs, cfg, desc=None)
        e = cfg.eval
        examples = [encode(tok, p.chat(), r, max_prompt=e.max_prompt_tokens, max_response=e.max_response_tokens)
                    for p in pairs for r in (p.chosen, p.rejected)]
        ll, n = response_logprob(tiny_base.model, examples, tok.pad_token_id)
    want = (ll / n).view(-1, 2)
    torch.testing.assert_close(got, want[:, 0] - want[:, 1], atol=1e-4, rtol=1e-4)


def test_evaluate_compares_every_adapter_with_the_base(scit_run, tiny_base, tmp_path):
    cfg = load_config("tiny")
    cfg.eval.generations = 1
    data = load_preferences(str(DATA), "240:246")
    result = evaluate(tiny_base, {"a": str(scit_run / "bundle"), "b": str(scit_run / "bundle")}, data, cfg,
                      transfer=load_preferences(str(DATA), "250:253"),
                      prompts=[PromptSet("harmful", data, 3), PromptSet("benign", data, 2)])
    scores = result["preference"]["scores"]
    assert list(scores) == ["base", "a", "b"] and "vs_base" not in scores["base"]
    assert scores["a"] == scores["b"]   # the same bundle twice: the same numbers
    margins_a = torch.tensor(result["preference"]["margins"]["a"])
    assert scores["a"]["accuracy"] == round(float((margins_a > 0).float().mean()), 4)
    assert result["transfer"]["pairs"] == 3
    harmful = result["behaviour"]["harmful"]
    assert harmful["prompts"] == 3 and len(harmful["models"]["a"]["answers"]) == 3
    assert 0 <= harmful["models"]["a"]["decline"]["rate"] <= 1 and "decline_vs_base" in harmful["models"]["a"]
    text = report(result)
    assert "## Behaviour: benign prompts" in text and "McNemar" in text
    json.dumps(result)   # the whole result is JSON


def test_extend_reuses_the_earlier_models_and_equals_one_call(scit_run, tiny_model_dir, tmp_path, capsys):
    from training.cli import main

    common = ["--base", str(tiny_model_dir), "--data", str(DATA), "--rows", "240:244", "--config", "tiny",
              "--behaviour", "2"]
    bundle = str(scit_run / "bundle")
    assert main(["eval", "--adapter", f"a={bundle}", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["eval", "--adapter", f"b={bundle}", *common, "--out", str(tmp_path / "two"),
                 "--extend", str(tmp_path / "one" / "eval.json")]) == 0
    assert main(["eval", "--adapter", f"a={bundle}", "--adapter", f"b={bundle}", *common,
                 "--out", str(tmp_path / "both")]) == 0
    two, both = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("two", "both"))
    assert two["preference"]["scores"] == both["preference"]["scores"]
    assert list(two["behaviour"]["harmful"]["models"]) == ["base", "a", "b"]
    # merging evaluations runs nothing and keeps every model
    assert main(["eval", *common, "--extend", str(tmp_path / "one" / "eval.json"),
                 "--extend", str(tmp_path / "two" / "eval.json"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "eval.json").read_text())
    assert merged["preference"]["scores"] == both["preference"]["scores"]
    # other rows cannot be merged into it
    capsys.readouterr()
    assert main(["eval", "--adapter", f"c={bundle}", *common[:4], "--rows", "250:254", *common[6:],
                 "--extend", str(tmp_path / "two" / "eval.json")]) == 2
    assert "other pairs" in capsys.readouterr().err


def test_rename_swaps_names_everywhere_and_refuses_clashes():
    from training.evaluate import rename

    scores = {"base": {"accuracy": 0.5}, "old": {"accuracy": 0.6}, "new": {"accuracy": 0.7}}
    result = {"adapters": {"old": "runs/a", "new": "runs/b"},
              "preference": {"margins": {"base": [0.0], "old": [1.0], "new": [2.0]}, "scores": scores},
              "behaviour": {"harmful": {"models": {"base": {}, "old": {"r": 1}, "new": {"r": 2}}}},
              "generations": [{"prompt": "p", "base": "x", "old": "y", "new": "z"}]}
    out = rename(result, {"old": "previous", "new": "old"})
    assert out["adapters"] == {"previous": "runs/a", "old": "runs/b"}
    assert out["preference"]["margins"]["old"] == [2.0] and out["preference"]["scores"]["previous"]["accuracy"] == 0.6
    assert out["behaviour"]["harmful"]["models"]["old"] == {"r": 2}
    assert out["generations"][0] == {"prompt": "p", "base": "x", "previous": "y", "old": "z"}
    assert result["adapters"] == {"old": "runs/a", "new": "runs/b"}  # the input is left as it was
    with pytest.raises(ValueError, match="share a name"):
        rename(result, {"old": "new"})
    with pytest.raises(ValueError, match="not among"):
        rename(result, {"missing": "x"})
    with pytest.raises(ValueError, match="base"):
        rename(result, {"old": "base"})
