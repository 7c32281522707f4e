import math

import torch
from peft import LoraConfig, get_peft_model

from training.health import base_loglik, distinct2, greedy, measure


def test_distinct2_hand_computed():
    # bigrams: (1,2) (2,1) (1,2) | (3,3) (3,3) -> 3 unique of 5
    assert math.isclose(distinct2([[1, 2, 1, 2], [3, 3, 3]]), 3 / 5)
    assert distinct2([[7], []]) == 0.0  # no bigrams at all: no division by zero


def test_base_loglik_is_the_plain_bases_even_with_an_adapter_active(tiny_base):
    tok, model = tiny_base.tokenizer, tiny_base.model
    prompts = [[5, 6, 7], [8, 9]]
    answers = [[10, 11, 12], [13, 14]]
    direct = []
    with torch.no_grad():
        for p, a in zip(prompts, answers, strict=True):
            logits = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
            direct.append(sum(float(logits[len(p) - 1 + i, t]) for i, t in enumerate(a)) / len(a))
    expected = sum(direct) / 2
    assert math.isclose(base_loglik(model, tok, prompts, answers), expected, rel_tol=1e-4)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert math.isclose(base_loglik(peft, tok, prompts, answers), expected, rel_tol=1e-4)


def test_greedy_matches_unbatched_generation_and_measure_reports_it(tiny_base):
    tok, model = tiny_base.tokenizer, tiny_base.model
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # different lengths: left padding must not change answers
    batched = greedy(model, tok, prompts, max_new_tokens=6, batch=2)
    alone = [greedy(model, tok, [p], max_new_tokens=6, batch=1)[0] for p in prompts]
    assert batched == alone
    m = measure(model, tok, prompts, max_new_tokens=6)
    assert m["mean_length"] == sum(map(len, batched)) / 2
    assert m["distinct2"] == round(distinct2(batched), 4) and len(m["answers"]) == 2
