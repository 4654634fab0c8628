"""The merge arithmetic, tile by tile through each term kind, against whole-tensor float64 formulas written out
independently."""

import math
from pathlib import Path

import pytest
import torch

from shardmerge import mergemath, terms
from shardmerge.safetensors_io import TensorInfo

torch.manual_seed(0)


class Memory:
    """Tensors held in memory under TensorInfos, loaded in float64 the way verify loads them from files."""

    def __init__(self):
        self.tensors = {}

    def info(self, tensor: torch.Tensor) -> TensorInfo:
        name = f"t{len(self.tensors)}"
        self.tensors[name] = tensor
        return TensorInfo(name, "F32", tuple(tensor.shape), Path("memory"), 0, 4 * tensor.numel())

    def load(self, info: TensorInfo) -> torch.Tensor:
        return self.tensors[info.name].double()


def lora(mem: Memory, a, b, scaling, weight=1.0, transposed=False, magnitude=None) -> terms.LoraTerm:
    m = None if magnitude is None else mem.info(magnitude)
    return terms.LoraTerm(mem.info(a), mem.info(b), scaling, weight, transposed, m, "test")


def tiled(base: torch.Tensor, make_terms, rows_per_tile: int) -> torch.Tensor:
    """Merge row blocks as the executor does (the column-norm pre-pass first) and stitch the rows together."""
    mem = Memory()
    term_list = make_terms(mem)
    factors = terms.load_factors(term_list, mem.load)
    rows = base.shape[0]
    flat = base.reshape(rows, -1).double()
    blocks = [(r, min(r + rows_per_tile, rows)) for r in range(0, rows, rows_per_tile)]
    for r0, r1 in blocks:
        terms.column_pass(term_list, factors, flat[r0:r1].clone(), r0, r1, rows)
    out = [terms.merge_tile(term_list, factors, flat[r0:r1].clone(), r0, r1) for r0, r1 in blocks]
    return torch.cat(out).reshape(base.shape)


@pytest.mark.parametrize("rows_per_tile", [1, 3, 7, 64])
def test_linear_rows_equal_whole_delta(rows_per_tile):
    w, a, b = torch.randn(20, 12), torch.randn(4, 12), torch.randn(20, 4)
    expected = w.double() + 0.5 * (b.double() @ a.double())
    got = tiled(w, lambda mem: [lora(mem, a, b, scaling=0.5, weight=1.0, transposed=False)], rows_per_tile)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows_per_tile", [1, 5, 64])
def test_conv1d_fan_in_fan_out_rows_equal_transposed_delta(rows_per_tile):
    # GPT-2 Conv1D stores (in, out); PEFT's delta is (B @ A)^T with A (r, in), B (out, r).
    w, a, b = torch.randn(12, 30), torch.randn(4, 12), torch.randn(30, 4)
    expected = w.double() + 2.0 * (b.double() @ a.double()).t()
    got = tiled(w, lambda mem: [lora(mem, a, b, scaling=2.0, weight=1.0, transposed=True)], rows_per_tile)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows_per_tile", [1, 9, 100])
def test_embedding_rows_equal_transposed_delta(rows_per_tile):
    # Embedding (vocab, dim): A is (r, vocab), B is (dim, r), delta (B @ A)^T.
    w, a, b = torch.randn(50, 8), torch.randn(4, 50), torch.randn(8, 4)
    expected = w.double() + 1.5 * (b.double() @ a.double()).t()
    got = tiled(w, lambda mem: [lora(mem, a, b, scaling=1.5, weight=1.0, transposed=True)], rows_per_tile)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_conv2d_rows_equal_per_channel_delta(kernel):
    w = torch.randn(6, 5, *kernel)
    a, b = torch.randn(3, 5, *kernel), torch.randn(6, 3, 1, 1)
    # PEFT: for kxk, conv2d(A^T, B)^T; per output channel that is sum_r B[o, r] * A[r].
    expected = w.double() + 0.25 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0].double(), a.double())
    got = tiled(w, lambda mem: [lora(mem, a, b, scaling=0.25, weight=1.0, transposed=False)], 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_weighted_adapters_sum_with_plan_weights():
    w = torch.randn(10, 6)
    a1, b1, a2, b2 = torch.randn(2, 6), torch.randn(10, 2), torch.randn(3, 6), torch.randn(10, 3)
    expected = w.double() + 0.7 * 2.0 * (b1.double() @ a1.double()) - 0.4 * 0.5 * (b2.double() @ a2.double())
    got = tiled(
        w, lambda mem: [lora(mem, a1, b1, scaling=2.0, weight=0.7), lora(mem, a2, b2, scaling=0.5, weight=-0.4)], 3
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_lora_bias_adds_scaled_vector_in_row_blocks():
    bias, vector = torch.randn(11), torch.randn(11)
    got = tiled(bias, lambda mem: [terms.BiasTerm(mem.info(vector), 0.3, "test")], 4)
    torch.testing.assert_close(got, bias.double() + 0.3 * vector.double(), rtol=1e-12, atol=1e-12)


def dora_reference(w, a, b, m, s, transposed):
    w, a, b, m = w.double(), a.double(), b.double(), m.double()
    delta = s * (b @ a)
    if transposed:
        delta = delta.t()
        merged = w + delta
        return merged * (m / merged.norm(dim=0)).unsqueeze(0)
    merged = w + delta
    return merged * (m / merged.norm(dim=1)).unsqueeze(1)


@pytest.mark.parametrize("rows_per_tile", [1, 4, 100])
def test_dora_linear_row_norms_tile_exactly(rows_per_tile):
    w, a, b, m = torch.randn(16, 8), torch.randn(2, 8), torch.randn(16, 2), torch.rand(16) + 0.5
    got = tiled(w, lambda mem: [lora(mem, a, b, scaling=2.0, weight=1.0, transposed=False, magnitude=m)], rows_per_tile)
    torch.testing.assert_close(got, dora_reference(w, a, b, m, 2.0, False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows_per_tile", [1, 7, 100])
def test_dora_embedding_column_norms_tile_exactly(rows_per_tile):
    # Embedding DoRA normalises columns (over the vocabulary), which a row block cannot see alone.
    w, a, b, m = torch.randn(40, 6), torch.randn(3, 40), torch.randn(6, 3), torch.rand(6) + 0.5
    got = tiled(w, lambda mem: [lora(mem, a, b, scaling=1.0, weight=1.0, transposed=True, magnitude=m)], rows_per_tile)
    torch.testing.assert_close(got, dora_reference(w, a, b, m, 1.0, True), rtol=1e-12, atol=1e-12)


def test_dora_weight_interpolates_between_base_and_peft_merge():
    w, a, b, m = torch.randn(8, 5), torch.randn(2, 5), torch.randn(8, 2), torch.rand(8) + 0.5
    full = dora_reference(w, a, b, m, 1.0, False)
    got = tiled(w, lambda mem: [lora(mem, a, b, scaling=1.0, weight=0.25, transposed=False, magnitude=m)], 3)
    torch.testing.assert_close(got, w.double() + 0.25 * (full - w.double()), rtol=1e-12, atol=1e-12)


def within_half_ulp_of_exact(got: torch.Tensor, exact: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """Whether each element of `got` is a nearest value of its dtype to `exact` (up to `slack`): the error is
    at most half the spacing of the dtype's values around it. One extra rounding anywhere exceeds that."""
    _, exponent = torch.frexp(got.double())
    mantissa_bits = round(-math.log2(torch.finfo(got.dtype).eps))
    half_spacing = torch.ldexp(torch.ones_like(exact), exponent - mantissa_bits - 2)
    return (got.double() - exact).abs() <= half_spacing + slack


def test_float32_merge_rounds_once_to_bfloat16():
    # Merged in float32, rounded once: each output is the bfloat16 nearest the exact value, up to float32's own
    # error. Rounding the delta, or an intermediate sum, to a 16-bit type first would miss by more.
    w = torch.randn(256, 64).to(torch.bfloat16)
    a, b = torch.randn(4, 64), torch.randn(256, 4)
    work = w.float()
    mergemath.add_lora(work, mergemath.lora_factors(a, b, scaling=0.01, weight=1.0, transposed=False), 0, 256)
    exact = w.double() + 0.01 * (b.double() @ a.double())
    slack = 1e-6 * (w.double().abs() + 0.01 * (b.double().abs() @ a.double().abs()))
    assert within_half_ulp_of_exact(work.to(torch.bfloat16), exact, slack).all()
    twice = (w.float() + (0.01 * (b @ a)).to(torch.bfloat16).float()).to(torch.bfloat16)  # what it must not do
    assert not within_half_ulp_of_exact(twice, exact, slack).all()


@pytest.mark.parametrize("rows_per_tile", [1, 4, 50])
def test_trainable_token_rows_are_replaced_across_tiles(rows_per_tile):
    w, values = torch.randn(20, 6), torch.randn(3, 6)
    indices = torch.tensor([0, 7, 19])
    expected = w.double().clone()
    expected[indices] = w.double()[indices] + 0.5 * (values.double() - w.double()[indices])
    got = tiled(w, lambda mem: [terms.RowsTerm((0, 7, 19), mem.info(values), 0.5, "test")], rows_per_tile)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
