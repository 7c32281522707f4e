"""Per-request steering inside vLLM's workers: a worker extension with forward hooks on the decoder blocks.

vLLM mixes `SteeringWorker` into each of its workers (`worker_extension_cls`), so the same code runs
in-process, in a separate engine-core process, or on every tensor-parallel rank; the front end reaches
it with `collective_rpc`. A request asks for steering in `SamplingParams.extra_args[STEERING_KEY]`
({"adapter", "coeff", "layers"}), which vLLM hands to the worker with the request. Each forward pass,
the first hook to run reads the model runner's batch (request order and `query_start_loc`, the token
offsets of each request in the flattened batch) and builds, per steered layer, a [tokens, hidden] delta
that is `coeff * mean_diff[l]` on that request's tokens and zero elsewhere: base, adapter, blend and
steered rows stay in one batch. Layer `l` follows the bundle's convention (`hidden_states[l]`, the
output of block `l - 1`). On tensor-parallel ranks the residual stream is replicated, so each rank adds
the same delta. Python hooks need an eager model: the engine turns torch.compile and CUDA graphs off
when steering is enabled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..steering import decoder_layers

STEERING_KEY = "rahf_steering"
"""Where a request's steering rides in `SamplingParams.extra_args`."""


class _BatchSteering:
    """The deltas of the forward pass in progress, rebuilt when a new pass starts."""

    def __init__(self, runner: Any, vectors: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        self.runner = runner
        self.vectors = vectors
        self._context: Any = None
        self._deltas: dict[int, torch.Tensor] = {}

    def delta(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        context = get_forward_context() if is_forward_context_available() else None
        if context is None:
            return None
        if context is not self._context:  # the first steered layer of a new pass
            self._context, self._deltas = context, self._build(hidden)
        return self._deltas.get(layer)

    def _build(self, like: torch.Tensor) -> dict[int, torch.Tensor]:
        batch = self.runner.input_batch
        count = batch.num_reqs
        deltas: dict[int, torch.Tensor] = {}
        offsets = None
        for row, req_id in enumerate(batch.req_ids[:count]):
            state = self.runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            spec = (params.extra_args or {}).get(STEERING_KEY) if params is not None else None
            if not spec or not spec["coeff"]:
                continue
            vectors = self.vectors.get(spec["adapter"])
            if vectors is None:  # unloaded while queued: the front end aborts such requests
                continue
            if offsets is None:
                offsets = self.runner.query_start_loc.np[:count + 1].tolist()
            for layer in spec["layers"]:
                if layer not in deltas:
                    deltas[layer] = torch.zeros_like(like)
                deltas[layer][offsets[row]:offsets[row + 1]] += spec["coeff"] * vectors[layer]
        return deltas


class SteeringWorker:
    """Mixed into vLLM's worker class; every method name carries the `rahf_` prefix to stay clear of vLLM's."""

    def rahf_install_steering(self) -> int:
        """Hook every decoder block of the loaded model; returns how many were hooked."""
        runner: Any = self.model_runner  # type: ignore[attr-defined]
        self.rahf_vectors: dict[str, dict[int, torch.Tensor]] = {}
        self.rahf_batch = _BatchSteering(runner, self.rahf_vectors)
        blocks = decoder_layers(runner.get_model())
        for index, block in enumerate(blocks):
            block.register_forward_hook(_adder(self.rahf_batch, index + 1))
        return len(blocks)

    def rahf_set_vectors(self, name: str, vectors: Mapping[int, Sequence[float]]) -> None:
        """Vectors arrive as lists: RPCs to worker processes serialise tensors as nested lists anyway."""
        param = next(self.model_runner.get_model().parameters())  # type: ignore[attr-defined]
        self.rahf_vectors[name] = {int(layer): torch.tensor(v, dtype=torch.float32).to(param.device, param.dtype)
                                   for layer, v in vectors.items()}

    def rahf_drop_vectors(self, name: str) -> None:
        self.rahf_vectors.pop(name, None)


def _adder(batch: _BatchSteering, layer: int) -> Any:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not batch.vectors:
            return None
        # vLLM's blocks return (hidden, residual) and the next block sums them, so adding to the first
        # part adds to the residual stream; some architectures return the stream itself.
        hidden = output[0] if isinstance(output, tuple) else output
        delta = batch.delta(layer, hidden)
        if delta is None:
            return None
        rows = min(delta.shape[0], hidden.shape[0])  # padded passes carry extra, unsteered rows
        steered = hidden.clone()
        steered[:rows] += delta[:rows]
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook
