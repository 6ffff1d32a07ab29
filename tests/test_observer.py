"""``--observer minmax|mse|imatrix``: how each group's grid is chosen before RTN rounds or GPTQ's loop runs.

The searched grids (``quantize.search``) must never have a higher (weighted) rounding error than min-max, must stay
grids the writer stores exactly, and must keep pruned weights at 0; RTN with ``imatrix`` reads the inputs' Σx²,
GPTQ its own H.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taylorprune import pipeline
from taylorprune.errors import UserError
from taylorprune.prune.masks import Pattern, build_mask
from taylorprune.quantize.gptq import GptqOptions, gptq
from taylorprune.quantize.grid import GridSpec, compute_grid, dequantize_weight
from taylorprune.quantize.stage import GPTQ, RTN, GptqStageOptions, GridOptions

SMALL = dict(model="demo", calib="wikitext2-valid", nsamples=8, seqlen=64, device="cpu")
ATTENTION_AND_UP = "self_attn|gate_proj|up_proj"


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and an H = 2XXᵀ/N whose inputs have very unequal energy (where weighting matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g) * torch.logspace(-1, 1, 64)
    return torch.randn(48, 64, generator=g), 2 * x.T @ x / x.shape[0]


def _output_error(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor) -> float:
    """The layer's output error (q − w)ᵀH(q − w) summed over rows."""
    d = q - w
    return float(torch.einsum("oi,ij,oj->", d, h, d))


def _weighted_error(w: torch.Tensor, q: torch.Tensor, a: torch.Tensor) -> float:
    return float(((w - q).pow(2) * a).sum())


@pytest.mark.parametrize("observer", ["mse", "imatrix"])
def test_rtn_search_never_rounds_worse_than_minmax(observer):
    w, h = _layer()
    spec = GridSpec(3, 32)
    a = torch.diagonal(h) if observer == "imatrix" else torch.ones(64)
    stats = {"act_norm_sq": torch.diagonal(h) / 2}
    plain = RTN.quantize(w, None, stats, GridOptions(wbits=3, group_size=32), "w", spec).values
    searched = RTN.quantize(w, None, stats, GridOptions(wbits=3, group_size=32, observer=observer), "w", spec)
    assert _weighted_error(w, searched.values, a) < _weighted_error(w, plain, a)
    want = dequantize_weight(searched.codes, searched.grid, spec, searched.group_index)
    assert torch.equal(searched.values, want)  # the values are exactly the stored grid's


def test_gptq_on_a_searched_grid_lowers_the_layer_error_and_keeps_masks():
    w, h = _layer(1)
    spec = GridSpec(3, 32)
    keep = build_mask(w.abs(), Pattern(0.5))
    stats = {"hessian": h}

    plain = GPTQ.quantize(w, keep, stats, GptqStageOptions(wbits=3, group_size=32), "w", spec)
    searched = GPTQ.quantize(w, keep, stats, GptqStageOptions(wbits=3, group_size=32, observer="imatrix"), "w", spec)
    assert bool((searched.values[~keep] == 0).all())
    assert torch.equal(searched.values, dequantize_weight(searched.codes, searched.grid, spec, searched.group_index))
    assert _output_error(w, h, searched.values) < _output_error(w, h, plain.values)
    assert not torch.equal(searched.grid.scale, compute_grid(torch.where(keep, w, 0), spec).scale)


def test_gptq_dynamic_groups_search_each_group_on_the_updated_weights():
    """--no-static-groups --observer imatrix: each group's grid is searched when the loop reaches it (not given
    before the loop), the values stay on the stored grid, masks stay at 0, and the layer's output error is below
    dynamic min-max GPTQ's."""
    w, h = _layer(3)
    spec = GridSpec(3, 32)
    keep = build_mask(w.abs(), Pattern(0.25))
    stats = {"hessian": h}

    def run(observer: str):
        opts = GptqStageOptions(wbits=3, group_size=32, observer=observer, static_groups=False, act_order=False)
        return GPTQ.quantize(w, keep, stats, opts, "w", spec)

    plain, searched = run("minmax"), run("imatrix")
    assert searched.info["static_groups"] is False
    assert bool((searched.values[~keep] == 0).all())
    assert torch.equal(searched.values, dequantize_weight(searched.codes, searched.grid, spec, searched.group_index))
    assert _output_error(w, h, searched.values) < _output_error(w, h, plain.values)
    static = GPTQ.quantize(w, keep, stats, GptqStageOptions(wbits=3, group_size=32, observer="imatrix",
                                                             act_order=False), "w", spec)
    assert not torch.equal(searched.grid.scale, static.grid.scale)  # searched on other weights than the start


def test_gptq_with_a_given_grid_uses_it_unchanged():
    w, h = _layer(2)
    spec = GridSpec(4, 32)
    grid = compute_grid(w * 0.8, spec)  # a deliberately tighter grid
    q = gptq(w, h, spec, GptqOptions(), grid=grid)
    assert torch.equal(q.grid.scale, grid.scale)


def test_the_observer_reaches_the_run_and_its_report(tmp_path: Path):
    state = pipeline.prune(pipeline.RunOptions(**SMALL, output=str(tmp_path / "o"), quantize="rtn", wbits=3,
                                               group_size=32, targets=ATTENTION_AND_UP, observer="imatrix"))
    plain = pipeline.prune(pipeline.RunOptions(**SMALL, output=str(tmp_path / "p"), quantize="rtn", wbits=3,
                                               group_size=32, targets=ATTENTION_AND_UP))
    name = next(iter(state.quantized))
    assert not torch.equal(state.quantized[name].grid.scale, plain.quantized[name].grid.scale)
    assert pipeline.write(state)["quantize"]["observer"] == "imatrix"


def test_an_unknown_observer_is_refused():
    with pytest.raises(UserError, match="observer"):
        pipeline.validate(pipeline.RunOptions(**SMALL, output="/tmp/never", quantize="gptq", observer="mean"))
