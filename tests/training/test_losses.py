"""The loss arithmetic against hand-computed values and direct (slow) reference computations."""

import math

import torch

from training.losses import (
    alignment_distance,
    predicting_positions,
    scit_contrastive,
    sequence_logprob,
    sequence_logprob_kl,
)


def test_scit_contrastive_hand_computed():
    # softmax([-1, -2]) = [0.7310586, 0.2689414]; smoothed target (eps 0.2, 2 classes) = [0.9, 0.1]
    # loss = -(0.9 ln 0.7310586 + 0.1 ln 0.2689414) = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
    loss = scit_contrastive(torch.tensor([-1.0]), torch.tensor([-2.0]), label_smoothing=0.2)
    assert math.isclose(loss.item(), 0.4132617, abs_tol=1e-6)
    # without smoothing it is plain -ln softmax: ln(1 + e^-1) = 0.3132617
    plain = scit_contrastive(torch.tensor([-1.0]), torch.tensor([-2.0]), label_smoothing=0.0)
    assert math.isclose(plain.item(), 0.3132617, abs_tol=1e-6)
    # a matching instruction that is already far more likely still pays the smoothing floor
    floor = scit_contrastive(torch.tensor([0.0]), torch.tensor([-50.0]), 0.2).item()
    assert math.isclose(floor, 0.1 * 50, rel_tol=1e-4)
    # scale is an inverse temperature: a 0.05-nat gap at scale 20 is the 1-nat gap at scale 1
    scaled = scit_contrastive(torch.tensor([-1.0]), torch.tensor([-1.05]), 0.2, scale=20.0)
    assert math.isclose(scaled.item(), 0.4132617, abs_tol=1e-5)


def test_response_logprob_uses_shifted_positions_hand_computed():
    # tokens [0, 1, 2, 1], response = the last two tokens (2 at position 2, 1 at position 3).
    ids = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[0, 0, 1, 1]])
    logits = torch.tensor([[[0.0, 0.0, 50.0],              # pos 0 predicts token 1: not a response token
                            [0.0, 0.0, 0.0],               # pos 1 predicts token 2: p = 1/3
                            [0.0, math.log(3.0), 0.0],     # pos 2 predicts token 1: p = 3/5
                            [50.0, -50.0, 0.0]]])          # pos 3 predicts nothing: must be ignored
    total, count = sequence_logprob(logits, torch.nn.Identity(), ids, mask)
    assert math.isclose(total.item(), math.log(1 / 3) + math.log(3 / 5), abs_tol=1e-5)
    assert count.tolist() == [2.0]
    rows, cols = predicting_positions(mask)
    assert rows.tolist() == [0, 0] and cols.tolist() == [1, 2]


def test_response_logprob_matches_full_log_softmax_with_padding():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (3, 7))
    mask = torch.zeros(3, 7, dtype=torch.long)
    mask[0, 3:7] = 1   # full row
    mask[1, 2:5] = 1   # right padding after position 4
    mask[2, 5:6] = 1   # one response token
    logits = torch.randn(3, 7, 11)
    total, count = sequence_logprob(logits, torch.nn.Identity(), ids, mask)
    logp = torch.log_softmax(logits, -1)
    for b in range(3):
        expected = sum(logp[b, t - 1, ids[b, t]] for t in range(7) if mask[b, t])
        assert torch.allclose(total[b], expected, atol=1e-5)
        assert count[b] == mask[b].sum()


def test_alignment_distance_ignores_padding():
    hidden = torch.zeros(2, 3, 4)
    target = torch.zeros(2, 3, 4)
    target[0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])   # distance 5 at a response token
    target[1, 2] = 1e6                                  # a padding position: must not count
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert alignment_distance(hidden, target, mask).item() == 5.0


def test_sequence_logprob_kl_against_a_direct_sum():
    torch.manual_seed(1)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[0, 2:6] = 1
    mask[1, 3:5] = 1
    logits, ref_logits = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    rows, cols = predicting_positions(mask)
    reference = torch.log_softmax(ref_logits[rows, cols], -1)
    total, kl, count = sequence_logprob_kl(logits, torch.nn.Identity(), ids, mask, reference)
    plain, plain_count = sequence_logprob(logits, torch.nn.Identity(), ids, mask)
    assert torch.allclose(total, plain, atol=1e-5) and torch.equal(count, plain_count)
    logp, ref = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    for b in range(2):
        expected = sum((ref[b, t - 1].exp() * (ref[b, t - 1] - logp[b, t - 1])).sum()
                       for t in range(6) if mask[b, t])
        assert torch.allclose(kl[b], expected, atol=1e-5) and kl[b] > 0
    # against itself the divergence is zero
    own = torch.log_softmax(logits[rows, cols], -1)
    assert torch.allclose(sequence_logprob_kl(logits, torch.nn.Identity(), ids, mask, own)[1], torch.zeros(2), atol=1e-6)
