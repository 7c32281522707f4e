"""Forward passes that compute only what a phase needs.

The vocabulary projection dominates memory for a 49k-token vocabulary, so log-likelihoods run
the decoder and project only the positions that predict response tokens; hidden-state passes
never project at all. (This skips model-specific logit post-processing such as Gemma-2's
softcapping: fine for llama-family bases, which are what rahf-serve targets.)
"""

from __future__ import annotations

import torch

from .encode import Encoded, collate
from .losses import sequence_logprob


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
    decoder, _ = _parts(model)
    _, ids, attn = _inputs(model, examples, pad_id)
    blocks, last, out = decoder.layers, max(layers), {}
    handles = []

    def capture(layer: int):
        def hook(_module, _args, output):
            out[layer] = output[0] if isinstance(output, tuple) else output
            if layer == last:
                raise _Stop
        return hook

    for layer in layers:
        handles.append(blocks[layer - 1].register_forward_hook(capture(layer)))
    try:
        decoder(input_ids=ids, attention_mask=attn, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def response_logprob(model: torch.nn.Module, examples: list[Encoded], pad_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's response tokens [B], response token count [B])."""
    decoder, head = _parts(model)
    batch, ids, attn = _inputs(model, examples, pad_id)
    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    return sequence_logprob(hidden, head, ids, batch.response_mask.to(ids.device))
