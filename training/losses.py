"""The loss arithmetic of the three phases, as pure functions of tensors.

Functions return per-row sums (and the counts they should be divided by) rather than means, so
the training loop can normalise by counts over the whole batch of every process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def predicting_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions whose output predicts a response token.

    The output at position t predicts token t+1, so response token t+1 is scored at column t:
    the mask shifted left by one, never the response positions themselves.
    """
    return response_mask[:, 1:].nonzero(as_tuple=True)


def sequence_logprob(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs [B], response token count [B]).

    `head` maps final hidden states to logits; it runs only at the predicting positions.
    """
    rows, cols = predicting_positions(response_mask)
    logits = head(hidden[rows, cols]).float()
    logp = -F.cross_entropy(logits, input_ids[rows, cols + 1], reduction="none")
    sums = torch.zeros(input_ids.size(0), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    return sums, response_mask[:, 1:].sum(-1).to(logp.dtype)


def position_kl(reference: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) at each position [N] from both log-softmaxes [N, V]."""
    return (reference.exp() * (reference - logp)).sum(-1)


def sequence_logprob_kl(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                        response_mask: torch.Tensor, reference: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sequence_logprob` plus the sum of KL(reference || model) over each row's predicting positions [B].

    `reference` holds the reference model's log-softmax at those positions ([N, V], in
    `predicting_positions` order), so the KL pulls the whole next-token distribution toward it, not
    only the probability of the data's token.
    """
    rows, cols = predicting_positions(response_mask)
    logp = F.log_softmax(head(hidden[rows, cols]).float(), dim=-1)
    token = logp.gather(1, input_ids[rows, cols + 1][:, None]).squeeze(1)
    kl = position_kl(reference, logp)
    zeros = torch.zeros(input_ids.size(0), dtype=logp.dtype, device=logp.device)
    return zeros.index_add(0, rows, token), zeros.index_add(0, rows, kl), response_mask[:, 1:].sum(-1).to(logp.dtype)


def scit_contrastive(ll_match: torch.Tensor, ll_mismatch: torch.Tensor, label_smoothing: float,
                     scale: float = 1.0) -> torch.Tensor:
    """Per-row loss of a 2-way softmax over scale x length-normalised log-likelihoods, the match as label.

    Label smoothing follows torch: the target puts 1 - eps + eps/2 on the match, eps/2 on the other.
    `scale` is the softmax's inverse temperature: an instruction moves a per-token log-likelihood by
    hundredths of a nat, so at scale 1 the two logits stay equal, the loss stays at ln 2 and its
    gradient is lost under the LM term's (in an early run a whole epoch did not move it).
    """
    logits = scale * torch.stack([ll_match, ll_mismatch], dim=-1)
    labels = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")


def alignment_distance(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of the L2 distance ||hidden - target|| ([B, T, H] -> scalar).

    Divide by mask.sum() (over all layers and processes) for the masked mean; padding never counts.
    """
    return (torch.linalg.vector_norm(hidden - target, dim=-1) * mask).sum()
