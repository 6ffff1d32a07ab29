"""Quantization core: grids, RTN, GPTQ (checked against a column-by-column GPTQ written here), masks, joint mode.

The reference GPTQ and reference rounding below follow the paper and GPTQ's/compressed-tensors' formulas directly
and share no code with ``taylorprune.quantize``. Equality checks against them run in float64, where round-off
(~1e-13) cannot move a value across a rounding boundary; exact (bitwise) checks are only made between a value and
the same elementwise formula on the same stored parameters.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taylorprune.errors import UserError
from taylorprune.prune.masks import Pattern, build_mask, check_nm
from taylorprune.prune.obs import obs_prune
from taylorprune.quantize import GptqOptions, GridSpec, compute_grid, gptq, holds_zero, rtn, sparse_gptq
from taylorprune.quantize.grid import dequantize_weight, quantize_weight
from taylorprune.quantize.search import search_grid

DEAD = (5, 17, 100, 201)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: intra-op threads only add contention on a shared machine (10x slower at load 9)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layer(rows=64, cols=256, tokens=512, seed=0, dtype=torch.float32):
    """Random weight, correlated inputs with a few dead input columns, H = 2XᵀX/N."""
    g = torch.Generator().manual_seed(seed)
    W, X, mix = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                 ((rows, cols), (tokens, cols), (cols, cols)))
    X = X @ mix * 0.2
    X[:, [d for d in DEAD if d < cols]] = 0
    H = 2 * X.T @ X / tokens
    return W.to(dtype), X.to(dtype), H.to(dtype)


def out_error(W, V, X):
    return ((W - V) @ X.T).norm().item()



def ref_params(x, bits, sym):
    """GPTQ's find_params (range widened to 0; sym: scale 2·amax/maxq, zero 2^(b-1)), scale rounded to fp16."""
    maxq = 2**bits - 1
    lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    if sym:
        amax = torch.maximum(-lo, hi)
        amax[amax == 0] = 1
        scale = (2 * amax / maxq).half().to(x.dtype)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    both = (lo == 0) & (hi == 0)
    lo[both], hi[both] = -1, 1
    scale = ((hi - lo) / maxq).half().to(x.dtype)
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def ref_round(w, scale, zero, bits):
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return q, scale * (q - zero)


def reference_gptq(W, H, bits, group, sym, static, act_order, keep=None, percdamp=0.01):
    """GPTQ from Algorithm 1 without lazy batching: explicit H_F⁻¹, updated by Gaussian elimination per column."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    g = cols if group == -1 else group
    pruned = torch.zeros_like(W, dtype=torch.bool) if keep is None else ~keep
    W[pruned] = 0
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grids = [ref_params(W[:, k:k + g], bits, sym) for k in range(0, cols, g)] if static or group == -1 else None
    perm = torch.argsort(H.diag(), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H, pruned = W[:, perm], H[perm][:, perm], pruned[:, perm]
    H += percdamp * H.diag().mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    for j in range(cols):
        if grids is not None:
            scale, zero = grids[int(perm[j]) // g]
        elif j % g == 0:
            scale, zero = ref_params(torch.where(pruned[:, j:j + g], 0.0, W[:, j:j + g]), bits, sym)
        code, q = ref_round(W[:, j], scale, zero, bits)
        code, q = torch.where(pruned[:, j], zero, code), torch.where(pruned[:, j], 0.0, q)
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        W[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
        codes[:, j] = code
    inv = torch.argsort(perm)
    return W[:, inv], codes[:, inv]



@pytest.mark.parametrize("bits,group,sym,static,act_order,blocksize,masked", [
    (4, 32, True, True, False, 128, False),
    (4, 32, True, True, True, 64, False),
    (4, 32, True, False, False, 128, False),  # dynamic groups starting inside a block
    (3, 64, False, False, True, 128, False),  # dynamic + act order: groups in permuted order (g_idx)
    (4, -1, False, True, True, 128, False),
    (2, 128, True, False, True, 32, False),  # blocksize raised to the group size
    (4, 32, True, False, True, 128, True),
    (3, 32, False, True, True, 128, True),
])
def test_gptq_equals_column_by_column_reference(bits, group, sym, static, act_order, blocksize, masked):
    W, _, H = layer(dtype=torch.float64)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5 if masked else None
    spec = GridSpec(bits, group, sym)
    got = gptq(W, H, spec, GptqOptions(blocksize=blocksize, act_order=act_order, static_groups=static), keep=keep)
    values, codes = reference_gptq(W, H, bits, group, sym, static, act_order, keep)
    assert torch.equal(got.codes.double(), codes)
    assert (got.values - values).abs().max() <= 1e-5 * values.abs().max()
    assert torch.equal(got.rebuild(spec, torch.float64), got.values)
    assert got.info["dead_inputs"] == len(DEAD)
    assert got.contiguous_groups == (static or not act_order or group == -1)


@pytest.mark.parametrize("spec", [GridSpec(4, 32), GridSpec(3, 128), GridSpec(4, -1, symmetric=False),
                                  GridSpec(4, 64, symmetric=False, zero_point="float")])
def test_gptq_lowers_output_error_against_rtn_on_the_same_grid(spec):
    W, X, H = layer()
    plain = rtn(W, spec)
    for options in (GptqOptions(), GptqOptions(act_order=False)):
        quantized = gptq(W, H, spec, options, grid=plain.grid)
        assert torch.equal(quantized.grid.scale, plain.grid.scale)
        assert out_error(W, quantized.values, X) < 0.85 * out_error(W, plain.values, X)


def test_gptq_defaults_follow_llm_compressor():
    options = GptqOptions()
    assert (options.percdamp, options.blocksize, options.act_order, options.static_groups) == (0.01, 128, True, True)
    assert GridSpec() == GridSpec(4, 128, True, "integer", "float16")  # compressed-tensors' W4A16 preset


@pytest.mark.parametrize("spec", [GridSpec(4, 32), GridSpec(3, 128), GridSpec(4, 64, symmetric=False)])
@pytest.mark.parametrize("static", [True, False])
def test_masked_gptq_keeps_zeros_and_puts_kept_weights_on_the_grid(spec, static):
    W, X, H = layer()
    keep = build_mask(W.abs() * X.norm(dim=0), Pattern(0.5))
    got = gptq(W, H, spec, GptqOptions(static_groups=static), keep=keep)
    assert torch.all(got.values[~keep] == 0)
    assert got.grid.scale.dtype == torch.float16
    gi = got.group_index
    scale, zero = got.grid.scale.float()[:, gi], got.grid.zero.float()[:, gi]
    assert torch.equal(got.values, scale * (got.codes.float() - zero))  # exactly on the fp16-scaled grid
    assert torch.equal(got.codes[~keep].float(), zero[~keep])
    assert int(got.codes.max()) <= spec.maxq
    assert out_error(W, got.values, X) < out_error(W, rtn(W, spec, keep=keep).values, X)


def test_a_grid_without_zero_refuses_masks_in_one_line():
    W, _, H = layer(rows=8, cols=64)
    spec = GridSpec(4, 32, symmetric=False, zero_point="float")
    assert not holds_zero(spec) and holds_zero(GridSpec(4, 32)) and holds_zero(GridSpec(4, 32, symmetric=False))
    keep = torch.ones_like(W, dtype=torch.bool)
    calls = (lambda: gptq(W, H, spec, keep=keep, name="mlp.up_proj"), lambda: rtn(W, spec, keep=keep),
             lambda: sparse_gptq(W, H, spec, Pattern(0.5)))
    for call in calls:
        with pytest.raises(UserError, match="exact 0") as caught:
            call()
        assert "\n" not in str(caught.value)



@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.5, n=2, m=4)])
def test_joint_prunes_and_quantizes_in_one_pass(pattern):
    W, X, H = layer()
    spec = GridSpec(3, 128)
    got = sparse_gptq(W, H, spec, pattern)
    keep = got.info["keep"]
    assert torch.all(got.values[~keep] == 0)
    assert torch.equal(got.values, got.rebuild(spec))
    if pattern.is_nm:
        assert check_nm(got.values, 2, 4)
    else:  # exactly half of each 128-column block is pruned
        assert all(int((~keep[:, b:b + 128]).sum()) == W.shape[0] * 64 for b in range(0, W.shape[1], 128))
    updated, _, info = obs_prune(W, H, pattern)
    two_pass = rtn(updated, spec, keep=info["keep"])
    magnitude = rtn(W, spec, keep=build_mask(W.abs(), pattern))
    assert out_error(W, got.values, X) < 0.95 * out_error(W, two_pass.values, X)
    assert out_error(W, got.values, X) < 0.9 * out_error(W, magnitude.values, X)


def test_joint_nm_refuses_act_order():
    W, _, H = layer(rows=8, cols=64)
    with pytest.raises(UserError, match="act-order"):
        sparse_gptq(W, H, GridSpec(4, 32), Pattern(0.5, n=2, m=4), GptqOptions(act_order=True))



def ref_rtn(W, bits, group, sym, float_zero=False):
    """Codes and values by the formulas: GPTQ/compressed-tensors min-max, or llama.cpp Q4_1's d·q + m."""
    rows, cols = W.shape
    g = cols if group == -1 else group
    codes, values = torch.zeros_like(W), torch.zeros_like(W)
    for k in range(0, cols, g):
        x = W[:, k:k + g]
        if float_zero:
            m = x.min(1).values
            d = ((x.max(1).values - m) / (2**bits - 1)).half().to(W.dtype)
            m = m.half().to(W.dtype)
            q = torch.clamp(torch.round((x - m[:, None]) / d[:, None]), 0, 2**bits - 1)
            q = torch.where(d[:, None] > 0, q, 0.0)  # llama.cpp: id = d ? 1/d : 0
            codes[:, k:k + g], values[:, k:k + g] = q, d[:, None] * q + m[:, None]
        else:
            scale, zero = ref_params(x, bits, sym)
            codes[:, k:k + g], values[:, k:k + g] = ref_round(x, scale[:, None], zero[:, None], bits)
    return codes, values


@pytest.mark.parametrize("bits,group,sym,float_zero", [(4, 32, True, False), (3, 128, True, False),
                                                       (4, 64, False, False), (8, -1, False, False),
                                                       (2, 32, True, False), (4, 32, False, True)])
def test_rtn_equals_reference_rounding(bits, group, sym, float_zero):
    W, _, _ = layer(rows=16, cols=256, dtype=torch.float64)
    W[0, :32] = 0  # an all-zero group
    W[1, :64] = W[1, :64].abs()  # groups without negative weights
    spec = GridSpec(bits, group, sym, "float" if float_zero else "integer")
    got = rtn(W, spec)
    codes, values = ref_rtn(W, bits, group, sym, float_zero)
    assert torch.equal(got.codes.double(), codes)
    assert (got.values - values).abs().max() <= 1e-12 * values.abs().max()


def test_rtn_with_a_mask_and_weighted_search():
    W, X, H = layer()
    spec = GridSpec(4, 32)
    keep = build_mask(W.abs(), Pattern(0.5))
    masked = rtn(W, spec, keep=keep)
    assert torch.all(masked.values[~keep] == 0) and torch.equal(masked.values, masked.rebuild(spec))
    importance = torch.diag(H)
    plain, weighted = rtn(W, spec), rtn(W, spec, importance=importance)

    def group_err(values):
        return (importance * (W - values).pow(2)).reshape(W.shape[0], -1, 32).sum(-1)

    assert torch.all(group_err(weighted.values) <= group_err(plain.values))  # min-max is one of the candidates
    assert group_err(weighted.values).sum() < 0.95 * group_err(plain.values).sum()
    assert out_error(W, weighted.values, X) < out_error(W, plain.values, X)
    assert torch.equal(search_grid(W, spec, importance, steps=0, refit=False).scale, plain.grid.scale)
    assert torch.all(rtn(W, spec, importance=importance, keep=keep).values[~keep] == 0)



SPECS = st.builds(lambda bits, group, kind, dtype: GridSpec(bits, group, kind == "sym",
                                                            "float" if kind == "float" else "integer", dtype),
                  st.integers(2, 8), st.sampled_from([-1, 32, 64]), st.sampled_from(["sym", "asym", "float"]),
                  st.sampled_from(["float16", "bfloat16", "float32"]))


@settings(max_examples=60, deadline=None)
@given(spec=SPECS, rows=st.integers(1, 4), groups=st.integers(1, 3), seed=st.integers(0, 2**16),
       exponent=st.integers(-4, 3), zeros=st.booleans())
def test_quantize_dequantize_is_idempotent_and_codes_stay_in_range(spec, rows, groups, seed, exponent, zeros):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, 64 * groups, generator=g) * 10.0**exponent
    if zeros:
        W[:, ::3] = 0
    grid = compute_grid(W, spec)
    codes = quantize_weight(W, grid, spec)
    values = dequantize_weight(codes, grid, spec)
    again = quantize_weight(values, grid, spec)
    assert torch.equal(again, codes)
    assert torch.equal(dequantize_weight(again, grid, spec), values)
    far = quantize_weight(W * 3 + 1, grid, spec)  # outside the grid's range: clamped
    for c in (codes, far):
        assert c.dtype == torch.uint8 and int(c.min()) >= 0 and int(c.max()) <= 2**spec.wbits - 1
    if holds_zero(spec):
        assert torch.all(values[W == 0] == 0)


@settings(max_examples=30, deadline=None)
@given(group=st.sampled_from([32, 64, 128]), width=st.integers(1, 600))
def test_group_size_must_divide_the_width(group, width):
    spec = GridSpec(4, group)
    if width % group == 0:
        assert compute_grid(torch.randn(2, width), spec).scale.shape == (2, width // group)
        return
    with pytest.raises(UserError, match=f"width {width} "):
        compute_grid(torch.randn(2, width), spec)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(-10, 40).filter(lambda b: not 2 <= b <= 8))
def test_wbits_outside_2_to_8_is_a_user_error(bits):
    with pytest.raises(UserError, match="wbits"):
        GridSpec(bits)


def test_other_bad_specs_are_user_errors():
    for kwargs in ({"group_size": 48}, {"zero_point": "float"}, {"scale_dtype": "int8"}, {"wbits": 4.0}):
        with pytest.raises(UserError):
            GridSpec(**kwargs)
