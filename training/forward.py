"""Forward passes that compute only what a phase needs.

The vocabulary projection dominates memory for a 49k-token vocabulary, so log-likelihoods run
the decoder and project only the positions that predict response tokens; hidden-state passes
never project at all. (This skips model-specific logit post-processing such as Gemma-2's
softcapping: fine for llama-family bases, which are what rahf-serve targets.)
"""

from __future__ import annotations

import torch

from .encode import Encoded, collate
from .losses import predicting_positions, sequence_logprob, sequence_logprob_kl


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder(), lm.get_output_embeddings()


def _inputs(model: torch.nn.Module, examples: list[Encoded], pad_id: int):
    batch = collate(examples, pad_id)
    device = next(model.parameters()).device
    return batch, batch.input_ids.to(device), batch.attention_mask.to(device)


class _Stop(Exception):
    """Raised by a hook once the last needed block has run: later blocks cannot change the result."""


def block_outputs(model: torch.nn.Module, examples: list[Encoded], pad_id: int, layers: list[int]
                  ) -> dict[int, torch.Tensor]:
    """{l: output of block l-1} for the given layers, skipping every block after the deepest one.

    These are `output_hidden_states` indices, with one difference: transformers returns the last
    entry after the final norm, while this is the residual stream there too, the stream a
    steering hook on that block adds to. Phase 3 needs layers up to the middle of the stack only,
    so the rest of the forward never runs.
    """
    return _blocks(model, examples, pad_id, layers, through=False)[0]


def block_outputs_and_logprobs(model: torch.nn.Module, examples: list[Encoded], pad_id: int, layers: list[int]
                               ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """`block_outputs`, the whole forward run, plus the log-softmax at every position that predicts a
    response token ([N, V], in `predicting_positions` order)."""
    out, final, response_mask = _blocks(model, examples, pad_id, layers, through=True)
    _, head = _parts(model)
    return out, _predicting_logprobs(head, final, response_mask.to(final.device))


def _predicting_logprobs(head: torch.nn.Module, hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax [N, V] at the positions that predict a response token, in `predicting_positions` order."""
    rows, cols = predicting_positions(response_mask)
    return torch.log_softmax(head(hidden[rows, cols]).float(), dim=-1)


def _blocks(model: torch.nn.Module, examples: list[Encoded], pad_id: int, layers: list[int], through: bool
            ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """(the block outputs, the final hidden state or None when stopped early, the batch's response mask)."""
    decoder, _ = _parts(model)
    batch, ids, attn = _inputs(model, examples, pad_id)
    blocks, last, out = decoder.layers, max(layers), {}
    handles = []

    def capture(layer: int):
        def hook(_module, _args, output):
            out[layer] = output[0] if isinstance(output, tuple) else output
            if layer == last and not through:
                raise _Stop
        return hook

    for layer in layers:
        handles.append(blocks[layer - 1].register_forward_hook(capture(layer)))
    final = None
    try:
        final = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out, final, batch.response_mask


def response_logprob(model: torch.nn.Module, examples: list[Encoded], pad_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's response tokens [B], response token count [B])."""
    decoder, head = _parts(model)
    batch, ids, attn = _inputs(model, examples, pad_id)
    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    return sequence_logprob(hidden, head, ids, batch.response_mask.to(ids.device))


def response_logprob_kl(model: torch.nn.Module, examples: list[Encoded], pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`response_logprob` plus KL(base || model) summed over each row's response positions [B].

    The base is `model` with its adapters disabled, run without gradients at the same positions.
    """
    decoder, head = _parts(model)
    batch, ids, attn = _inputs(model, examples, pad_id)
    mask = batch.response_mask.to(ids.device)
    with torch.no_grad(), model.disable_adapter():
        base = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        reference = _predicting_logprobs(head, base, mask)
    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    return sequence_logprob_kl(hidden, head, ids, mask, reference)


def per_token_logprob(model: torch.nn.Module, examples: list[Encoded], pad_id: int, max_tokens: int = 2048,
                      progress: str | None = None) -> torch.Tensor:
    """Mean log p per response token of every example [N], in the order given.

    Examples are scored longest first in batches of at most `max_tokens` padded tokens, so rows of
    a batch have similar lengths: with answers from 5 to 500 tokens, batching in the given order
    spends most of the compute on padding.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out = torch.empty(len(examples))
    bar = tqdm(total=len(examples), desc=progress, leave=False, disable=progress is None)
    start = 0
    while start < len(order):
        width = len(examples[order[start]].input_ids)
        stop = min(len(order), start + max(1, max_tokens // max(1, width)))
        chunk = order[start:stop]
        ll, n = response_logprob(model, [examples[i] for i in chunk], pad_id)
        out[chunk] = (ll / n.clamp(min=1)).float().cpu()
        bar.update(len(chunk))
        start = stop
    bar.close()
    return out


def shared_prompt_logprob(model: torch.nn.Module, prompt: list[int], responses: list[list[int]]) -> torch.Tensor:
    """Mean log p per token of each response [len(responses)], all continuing the same prompt.

    The prompt runs once and its key/value cache serves every response, so a preference pair costs
    one prompt pass instead of two (prompts are most of the tokens of multi-turn dialogues). The
    responses are right-padded: causal attention keeps padding out of every scored position.
    """
    import torch.nn.functional as F

    decoder, head = _parts(model)
    device = next(model.parameters()).device
    first = decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache = first.cache
    cache.batch_repeat_interleave(len(responses))
    width = max(len(r) for r in responses)
    ids = torch.zeros((len(responses), width), dtype=torch.long, device=device)
    for i, r in enumerate(responses):
        ids[i, :len(r)] = torch.tensor(r, device=device)
    # The last prompt position predicts every response's first token; position j predicts j + 1.
    hidden = decoder(input_ids=ids[:, :-1], cache=cache, use_cache=False).last_hidden_state \
        if width > 1 else ids.new_zeros((len(responses), 0, first.last_hidden_state.size(-1)), dtype=torch.float)
    out = torch.empty(len(responses))
    for i, r in enumerate(responses):
        states = torch.cat([first.last_hidden_state[0, -1:], hidden[i, :len(r) - 1]])
        logp = F.log_softmax(head(states).float(), dim=-1)
        out[i] = logp.gather(1, torch.tensor(r, device=device)[:, None]).mean().cpu()
    return out
