"""The CPU LoRA kernels the vLLM plugin installs, against a per-token reference."""

from __future__ import annotations

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
