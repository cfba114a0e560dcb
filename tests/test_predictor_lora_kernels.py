"""The CPU LoRA kernels the vLLM plugin installs, against a per-token reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loraforge.services.predictor.engines import vllm_cpu_lora as kernels

SLOTS, IN, OUT, RANK = 4, 48, 80, 8


def reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Token by token: x[i] @ weights[indices[i]].T, nothing for a token without an adapter."""
    rows = []
    for i, index in enumerate(indices.tolist()):
        if index < 0:
            rows.append(torch.zeros(weights.shape[-2], dtype=torch.float32))
        else:
            rows.append(x[i] @ weights[index].squeeze(0).T)
    return torch.stack(rows)


def batches() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    cases = [
        [-1] * 5,  # base-model tokens only
        [2] * 7,  # one adapter
        [-1, 1, -1, 1],  # one adapter beside base tokens
        [0, 1, 2, 3, -1, 3, 2, 1, 0, -1, 0, 1, 2, 3, -1, 2],  # a decode batch, 4 adapters + base
        [0] * 40 + [1] * 60 + [-1] * 30 + [3] * 9,  # a prefill batch, grouped by sequence
    ]
    cases.append(torch.randint(-1, SLOTS, (256,), generator=g).tolist())  # the padded-block limit
    cases.append(torch.randint(-1, SLOTS, (257,), generator=g).tolist())  # above: by rows
    cases.append([0] * 200 + [1] * 100 + [-1] * 50 + [3] * 20 + [0] * 7)  # above: by runs
    return cases


@pytest.mark.parametrize("token_indices", batches())
def test_shrink_and_expand_equal_the_per_token_reference(token_indices: list[int]) -> None:
    g = torch.Generator().manual_seed(len(token_indices))
    indices = torch.tensor(token_indices)
    tokens = len(token_indices)
    lora_a = torch.randn(SLOTS, 1, RANK, IN, generator=g)
    lora_b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    x = torch.randn(tokens, IN, generator=g)

    shrunk = torch.zeros(tokens, RANK)
    kernels.bgmv_shrink(x, lora_a, shrunk, indices, 0.5)
    torch.testing.assert_close(shrunk, 0.5 * reference(x, lora_a, indices))

    y = torch.randn(tokens, OUT, generator=g)
    expanded = y.clone()
    kernels.bgmv_expand(shrunk, lora_b, expanded, indices, add_inputs=True)
    torch.testing.assert_close(expanded, y + reference(shrunk, lora_b, indices))

    wide = torch.randn(tokens, OUT + 32, generator=g)
    sliced = wide.clone()
    kernels.bgmv_expand_slice(shrunk, lora_b, sliced, indices, 16, OUT, add_inputs=True)
    expected = wide.clone()
    expected[:, 16 : 16 + OUT] += reference(shrunk, lora_b, indices)
    torch.testing.assert_close(sliced, expected)


def test_a_batch_with_new_indices_in_the_same_buffer_is_regrouped() -> None:
    """vLLM rewrites one index buffer in place each step; a stale grouping would mix adapters."""
    g = torch.Generator().manual_seed(1)
    lora_a = torch.randn(SLOTS, 1, RANK, IN, generator=g)
    x = torch.randn(6, IN, generator=g)
    buffer = torch.tensor([0, 0, 1, 1, -1, -1])
    out = torch.zeros(6, RANK)
    kernels.bgmv_shrink(x, lora_a, out, buffer, 1.0)
    torch.testing.assert_close(out, reference(x, lora_a, buffer))
    buffer.copy_(torch.tensor([3, -1, 3, 2, 2, 0]))
    kernels.bgmv_shrink(x, lora_a, out, buffer, 1.0)
    torch.testing.assert_close(out, reference(x, lora_a, buffer))


@pytest.mark.parametrize("lengths", [[30, 12, 7, 1], [300, 12, 7, 1]], ids=["padded", "by-rows"])
def test_per_sequence_kernels_equal_the_per_token_reference(lengths: list[int]) -> None:
    """sgmv_*: one adapter slot per sequence (a prefill batch), expanded to its tokens."""
    g = torch.Generator().manual_seed(2)
    slots = torch.tensor([1, -1, 3, 1])
    lengths = torch.tensor(lengths)
    indices = torch.repeat_interleave(slots, lengths)
    tokens = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    meta = (starts, lengths, slots, len(slots), int(lengths.max()), tokens)
    lora_a = torch.randn(SLOTS, 1, RANK, IN, generator=g)
    lora_b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    x = torch.randn(tokens, IN, generator=g)

    shrunk = torch.zeros(tokens, RANK)
    kernels.sgmv_shrink(x, lora_a, shrunk, *meta, 2.0)
    torch.testing.assert_close(shrunk, 2.0 * reference(x, lora_a, indices))

    y = torch.randn(tokens, OUT, generator=g)
    expanded = y.clone()
    kernels.sgmv_expand(shrunk, lora_b, expanded, *meta, add_inputs=True)
    torch.testing.assert_close(expanded, y + reference(shrunk, lora_b, indices))

    wide = torch.zeros(tokens, OUT + 8)
    kernels.sgmv_expand_slice(shrunk, lora_b, wide, *meta, 8, OUT, add_inputs=False)
    torch.testing.assert_close(wide[:, 8:], reference(shrunk, lora_b, indices))
    torch.testing.assert_close(wide[:, :8], torch.zeros(tokens, 8))
    added = torch.ones(tokens, OUT + 8)
    kernels.sgmv_expand_slice(shrunk, lora_b, added, *meta, 8, OUT, add_inputs=True)
    torch.testing.assert_close(added[:, 8:], 1 + reference(shrunk, lora_b, indices))
    torch.testing.assert_close(added[:, :8], torch.ones(tokens, 8))


@pytest.mark.parametrize(
    "token_indices", [[1] * 300, [0] * 150 + [-1] * 50 + [2] * 100, [3, -1, 0, 1] * 4]
)
def test_bfloat16_activations_give_the_reference_within_bfloat16_precision(
    token_indices: list[int],
) -> None:
    g = torch.Generator().manual_seed(3)
    indices = torch.tensor(token_indices)
    tokens = len(token_indices)
    lora_a = torch.randn(SLOTS, 1, RANK, IN, generator=g).to(torch.bfloat16)
    lora_b = torch.randn(SLOTS, 1, OUT, RANK, generator=g).to(torch.bfloat16)
    x = torch.randn(tokens, IN, generator=g).to(torch.bfloat16)
    shrunk = torch.zeros(tokens, RANK)  # vLLM's buffer is float32
    kernels.bgmv_shrink(x, lora_a, shrunk, indices, 0.5)
    expected = 0.5 * reference(x.float(), lora_a.float(), indices)
    torch.testing.assert_close(shrunk, expected, rtol=2e-2, atol=2e-1)
    y = torch.zeros(tokens, OUT, dtype=torch.bfloat16)
    kernels.bgmv_expand(shrunk, lora_b, y, indices, add_inputs=True)
    expected_y = reference(shrunk.to(torch.bfloat16).float(), lora_b.float(), indices)
    torch.testing.assert_close(y.float(), expected_y, rtol=2e-2, atol=5e-1)


# --- a linear layer's whole LoRA, fused across its slices (PunicaWrapperCPU.add_lora_linear) ---

# A packed q/k/v layer: slices of different widths; the last adapter slot left empty (zeros),
# as vLLM leaves a slot no adapter is loaded into.
PACKED_SLICES, PACKED_IN = (48, 16, 16), 40


def punica(indices: list[int]) -> Any:
    """vLLM's CPU punica wrapper, with our replacements installed, mapping tokens to slots."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    kernels.register()
    wrapper = PunicaWrapperCPU(4096, 256, "cpu")
    wrapper._token_lora_indices[: len(indices)].copy_(torch.tensor(indices))
    wrapper._sampler_indices[: len(indices)].copy_(torch.tensor(indices))  # one token each
    wrapper.indices_len[:] = [len(indices)] * 4
    return wrapper


def packed_weights(
    g: torch.Generator, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    lora_a = tuple(torch.randn(SLOTS, 1, RANK, PACKED_IN, generator=g) for _ in PACKED_SLICES)
    lora_b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=g) for size in PACKED_SLICES)
    for a, b in zip(lora_a, lora_b, strict=True):
        a[SLOTS - 1].zero_()
        b[SLOTS - 1].zero_()
    return tuple(a.to(dtype) for a in lora_a), tuple(b.to(dtype) for b in lora_b)


def linear_reference(
    x: torch.Tensor,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    indices: list[int],
    scale: float,
) -> torch.Tensor:
    """Token by token, slice by slice, in float64: what each token's adapter adds."""
    rows = []
    for i, slot in enumerate(indices):
        parts = []
        for a, b in zip(lora_a, lora_b, strict=True):
            if slot < 0:
                parts.append(torch.zeros(b.shape[2], dtype=torch.float64))
            else:
                h = x[i].double() @ a[slot, 0].double().T * scale
                parts.append(h @ b[slot, 0].double().T)
        rows.append(torch.cat(parts))
    return torch.stack(rows)


LINEAR_BATCHES = {
    "decode, one adapter": [2] * 16,
    "decode, one token": [1],
    "decode, mixed with base tokens": [0, 1, 2, -1, 2, 1, 0, -1, 3, 3, 0, 1],
    "decode, adapters in slots 2 and 0 only": [2, 0, 2, 0],
    "decode, one adapter in a far slot beside base tokens": [2, -1, 2, -1],
    "decode, base tokens only": [-1] * 6,
    "decode, only the empty slot": [SLOTS - 1] * 5,
    "prefill, one adapter": [1] * 300,
    "prefill, sequences of several adapters": [0] * 120 + [-1] * 90 + [2] * 80 + [0] * 40,
    "prefill, many short sequences (by rows)": [i % 4 - 1 for i in range(600)],
    "prefill, one adapter in a far slot beside base tokens": [2] * 150 + [-1] * 150,
    "prefill, adapters beside the empty slot": [0] * 100 + [SLOTS - 1] * 120 + [1] * 90,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("token_indices", LINEAR_BATCHES.values(), ids=LINEAR_BATCHES.keys())
def test_a_packed_layers_lora_equals_each_tokens_own_adapter_slice_by_slice(
    token_indices: list[int], dtype: torch.dtype
) -> None:
    check_packed_layer(token_indices, dtype)


SEVERAL_ADAPTER_PREFILLS = {
    name: indices
    for name, indices in LINEAR_BATCHES.items()
    if name.startswith("prefill") and len({i for i in indices if 0 <= i < SLOTS - 1}) > 1
}


@pytest.mark.parametrize("plan", ["runs", "rows", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "token_indices", SEVERAL_ADAPTER_PREFILLS.values(), ids=SEVERAL_ADAPTER_PREFILLS.keys()
)
def test_every_layout_of_a_prefill_of_several_adapters_equals_each_tokens_own_adapter(
    token_indices: list[int], dtype: torch.dtype, plan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever layout the machine's costs pick, the numbers are the same."""
    monkeypatch.setattr(kernels, "_large_batch_plan", lambda *args, **kwargs: plan)
    check_packed_layer(token_indices, dtype)


def qkv_pack(dtype: torch.dtype = torch.float32) -> Any:
    g = torch.Generator().manual_seed(5)
    slices = (576, 192, 192)  # SmolLM2-135M's q, k and v, rank 8, 8 adapter slots
    lora_a = tuple(torch.randn(8, 1, RANK, 576, generator=g).to(dtype) for _ in slices)
    lora_b = tuple(torch.randn(8, 1, size, RANK, generator=g).to(dtype) for size in slices)
    return kernels._Packed(lora_a, lora_b, slices)


def test_a_prefill_of_several_adapters_takes_the_layout_cheapest_at_the_machines_costs() -> None:
    pack = qkv_pack()

    def plan(sequences: int, length: int, adapters: int, costs: Any) -> str:
        indices = [i % adapters for i in range(sequences) for _ in range(length)]
        return kernels._large_batch_plan(
            kernels._Grouping(torch.tensor(indices)), pack, torch.bfloat16, costs
        )

    def costs(per_call: tuple[float, ...], per_row: tuple[float, ...]) -> Any:
        return kernels._LayoutCosts(
            dict(zip(kernels._LAYOUTS, per_call, strict=True)),
            dict(zip(kernels._LAYOUTS, per_row, strict=True)),
        )

    # (runs, rows, masked). Calls dear, arithmetic cheap (oneDNN's AMX bfloat16 kernels, as
    # timed on a Xeon): all adapters at once, though masked computes every token 8 times.
    amx = costs((57e-6, 52e-6, 122e-6), (160e-9, 620e-9, 30e-9))
    # Arithmetic dearer (bfloat16 without AMX, as on an AMD EPYC): one shrink and expand
    # per run...
    avx512 = costs((65e-6, 65e-6, 130e-6), (600e-9, 800e-9, 170e-9))
    assert plan(16, 250, 8, amx) == "masked"
    assert plan(16, 250, 8, avx512) == "runs"
    # ... unless the runs are many and short: per adapter, over its rows.
    assert plan(64, 32, 8, avx512) == "rows"


def test_a_layouts_costs_are_fitted_per_call_and_per_row_never_below_zero() -> None:
    # Exact points: 40 us a call, 0.5 us a row.
    exact = [(c, r, c * 40e-6 + r * 0.5e-6) for c, r in ((4, 512), (8, 2048), (32, 2048))]
    per_call, per_row = kernels._fit(exact)
    assert per_call == pytest.approx(40e-6) and per_row == pytest.approx(0.5e-6)
    # Times that fall with more calls (noise) put it all on the rows, not a negative cost.
    per_call, per_row = kernels._fit([(1, 1000, 2e-3), (30, 1000, 1e-3)])
    assert per_call == 0.0 and per_row > 0


def test_the_layout_costs_are_measured_once_per_layer_shape_and_dtype() -> None:
    pack = qkv_pack()
    costs = kernels._measured_layout_costs(pack, torch.float32)
    assert all(v >= 0 for v in (*costs.per_call.values(), *costs.per_row.values()))
    assert sum(costs.per_row.values()) > 0
    assert kernels._measured_layout_costs(qkv_pack(), torch.float32) is costs
    g = torch.Generator().manual_seed(6)
    narrow = kernels._Packed(
        (torch.randn(8, 1, RANK, 576, generator=g),),
        (torch.randn(8, 1, 576, RANK, generator=g),),
        (576,),
    )
    assert kernels._measured_layout_costs(narrow, torch.float32) is not costs


def check_packed_layer(token_indices: list[int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(len(token_indices))
    lora_a, lora_b = packed_weights(g, dtype)
    x = torch.randn(len(token_indices), PACKED_IN, generator=g).to(dtype)
    y = torch.randn(len(token_indices), sum(PACKED_SLICES), generator=g).to(dtype)
    before = y.clone()
    punica(token_indices).add_lora_linear(y, x, lora_a, lora_b, 0.5, PACKED_SLICES)
    expected = before.double() + linear_reference(x, lora_a, lora_b, token_indices, 0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    else:  # one rounding of the output and of the rank-sized intermediate to bfloat16
        torch.testing.assert_close(y.double(), expected, rtol=3e-2, atol=0.5)
    base_rows = torch.tensor(token_indices) < 0
    assert torch.equal(y[base_rows], before[base_rows]), "a base-model token gets no LoRA"


def test_a_slot_rewritten_with_another_adapter_is_computed_with_the_new_weights() -> None:
    """vLLM loads an adapter into a slot an evicted one used, writing the stacked weights in
    place (set_lora); the packed copy must follow."""
    from vllm.lora.layers import MergedColumnParallelLinearWithLoRA
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    g = torch.Generator().manual_seed(7)
    lora_a, lora_b = packed_weights(g, torch.float32)
    indices = [0, 0, 1, 1]
    wrapper = punica(indices)
    x = torch.randn(4, PACKED_IN, generator=g)
    y = torch.zeros(4, sum(PACKED_SLICES))
    wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, PACKED_SLICES)  # packs the weights
    expected = linear_reference(x, lora_a, lora_b, indices, 1.0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)

    # vLLM's own set_lora, on a layer holding our stacked tensors: slot 0 gets a new adapter.
    layer = MergedColumnParallelLinearWithLoRA.__new__(MergedColumnParallelLinearWithLoRA)
    layer.lora_a_stacked, layer.lora_b_stacked = lora_a, lora_b
    layer.n_slices, layer.tp_size = len(PACKED_SLICES), 1
    new_a = [torch.randn(RANK, PACKED_IN, generator=g) for _ in PACKED_SLICES]
    new_b = [torch.randn(size, RANK, generator=g) for size in PACKED_SLICES]
    layer.set_lora(0, new_a, new_b)
    assert torch.equal(lora_a[1][0, 0], new_a[1])
    assert getattr(BaseLinearLayerWithLoRA.reset_lora, "__loraforge_written__", False)

    y.zero_()
    wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, PACKED_SLICES)
    expected = linear_reference(x, lora_a, lora_b, indices, 1.0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "token_indices",
    [[0, 1, -1, 1], [SLOTS - 1, -1, SLOTS - 1], [1] * 3],
    ids=["adapters with a head", "only adapters without one", "one adapter"],
)
def test_the_lm_heads_lora_is_applied_only_for_adapters_that_have_one(
    token_indices: list[int],
) -> None:
    """vLLM gives every adapter an LM-head LoRA slot (zeros for the many that have none)."""
    g = torch.Generator().manual_seed(5)
    vocab, hidden = 96, 32
    lora_a = torch.randn(SLOTS, 1, RANK, hidden, generator=g)
    lora_b = torch.randn(SLOTS, 1, vocab, RANK, generator=g)
    lora_a[SLOTS - 1].zero_()  # an adapter without an LM-head LoRA
    x = torch.randn(len(token_indices), hidden, generator=g)
    y = torch.randn(len(token_indices), vocab, generator=g)
    before = y.clone()
    punica(token_indices).add_lora_logits(y, x, lora_a, lora_b, 1.0)
    slots = torch.tensor(token_indices)
    expected = before + reference(reference(x, lora_a, slots), lora_b, slots)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
