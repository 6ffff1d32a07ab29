"""Training on a quantization grid: block reconstruction and recovery of a quantized model stay on its grid.

``--recon block`` and ``--recover distill`` optimise weights with Adam; on a quantized model a plain step moves every
weight off its grid, and the codes the writer holds would no longer be the model. ``on_grid`` swaps each quantized
linear's weight for a parametrization (``torch.nn.utils.parametrize``) for the length of a fit, so the loss, the
held-out checks and the early stopping all see on-grid weights, and bakes exact grid values back into the plain
weight at the end. ``resync`` then re-derives the writer's codes (or scales) from the final weights and proves them
exact, so the folder written is bit for bit the model evaluated. Three modes (``--quant-train``):

- ``ste``: straight-through rounding. The linear keeps a latent fp32 weight (starting at its on-grid
  values); the forward rounds it to nearest on the fixed grid (scales and zero points as quantized), the backward
  passes the gradient through the rounding unchanged (Bengio et al. 2013's straight-through estimator, as in
  QAT). Codes may change, scales do not; masked weights are held at 0 (their latent is kept 0 and their code is
  the zero point).
- ``scales``: codes fixed, one multiplier per group trained (starting at 1); the forward uses the scale rounded to
  its stored dtype (straight-through), so what trains is what is stored. Masked weights and every weight whose
  code is the zero point stay exactly 0; a group can only grow or shrink as a whole (LSQ/OmniQuant-style learnable
  step sizes without the rounding freedom).
- ``round``: the fit moves float weights under the mask, then every weight is rounded to nearest on its fixed grid
  (re-quantizing after the fit); the fit does not see the rounding.

``auto`` (the default) is ``ste`` for recovery and ``round`` for block fits, as measured on stories260K, PPL over
100 × 256 WikiText-2 test windows (221.97 without training)::

    taylorprune run --model demo --method sparsegpt --sparsity 0.5 --quantize gptq --wbits 3 --group-size -1
        --calib wikitext2-valid --nsamples 32 --seqlen 256 --eval --eval-seqlen 256 --max-windows 100
        --device cpu --quant-train MODE  [--recover distill --recover-steps 150 --recover-seqlen 256 | --recon block]

recovery: ste 105.11 (held-out KL 1.700 → 1.006), scales 129.48 (KL → 1.300), round 209.54 (the float fit's KL fell to
0.595, and the rounding took nearly all of it back); block fits (25 Adam steps each): round 142.30, scales 160.46,
ste 168.56. Straight-through needs steps to move codes (a latent must cross half a grid step), which recovery has
and a block fit does not; ``scales`` cannot move single weights. Group size 32 does not divide stories260K's
down_proj width (172), hence per channel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from taylorprune.quantize.grid import Grid, dequantize, quantize
from taylorprune.quantize.stage import QUANT_TRAIN_MODES, QuantizedLinear

MODES = QUANT_TRAIN_MODES
# ``auto``: the mode measured best for each kind of fit (module docstring)
AUTO = {"recover": "ste", "recon": "round"}


def settled(mode: str, fit: str) -> str:
    """The mode a fit (``recover`` or ``recon``) runs: ``mode``, or for ``auto`` the one measured best for it."""
    return AUTO[fit] if mode == "auto" else mode


class _Through(torch.autograd.Function):
    """Forward: ``value`` exactly (no float round-off of x + (v − x)); backward: the gradient goes to ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward, the identity's gradient to ``x`` in the backward (straight-through)."""
    return _Through.apply(x, value.detach())


def _integer(q: QuantizedLinear) -> bool:
    return q.spec.symmetric or q.spec.zero_point == "integer"


class _Rounded(nn.Module):
    """``ste`` (and the final rounding of ``round``): nearest code on the fixed grid, masked entries at the zero
    point, straight-through."""

    def __init__(self, q: QuantizedLinear, device: torch.device) -> None:
        super().__init__()
        gi = q.group_index.to(device)
        self.spec = q.spec
        self.register_buffer("scale", q.grid.scale.to(device)[:, gi].float())
        self.register_buffer("offset", q.grid.offset.to(device)[:, gi])
        self.register_buffer("keep", None if q.keep is None else q.keep.to(device))

    def values(self, latent: torch.Tensor) -> torch.Tensor:
        codes = quantize(latent, self.scale, self.offset, self.spec)
        if self.keep is not None:
            codes = torch.where(self.keep, codes, self.offset)
        return dequantize(codes, self.scale, self.offset, self.spec, latent.dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return through(latent, self.values(latent))


class _Scales(nn.Module):
    """``scales``: fixed codes, per-group multipliers of the scales; the scale used is the stored-dtype rounding
    of base × multiplier (positive), straight-through."""

    def __init__(self, q: QuantizedLinear, device: torch.device) -> None:
        super().__init__()
        self.spec = q.spec
        self.register_buffer("codes", q.codes.to(device))
        self.register_buffer("base", q.grid.scale.to(device).float())
        self.register_buffer("offset", q.grid.offset.to(device)[:, q.group_index.to(device)])
        self.register_buffer("group_index", q.group_index.to(device))
        self.factor = nn.Parameter(torch.ones_like(self.base))

    def stored(self) -> torch.Tensor:
        """The scales [out, groups] as stored: rounded to the stored dtype, never 0 or negative."""
        raw = self.base * self.factor
        tiny = torch.finfo(self.spec.stored_dtype).tiny
        return raw.detach().clamp(min=tiny).to(self.spec.stored_dtype)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        scale = through(self.base * self.factor, self.stored().float())
        return dequantize(self.codes, scale[:, self.group_index], self.offset, self.spec, torch.float32)


@contextlib.contextmanager
def on_grid(linears: Sequence[nn.Linear], quantized: Sequence[QuantizedLinear | None], mode: str
            ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor | None]]]:
    """(what to train, its masks: None = free) for ``linears`` while the block runs on-grid weights; on exit every
    quantized linear's plain weight holds exact grid values again. A linear without a grid (``None``) trains its
    weight with the mask of its zeros, as without quantization."""
    params: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    done: list[tuple[nn.Linear, nn.Module | None]] = []
    try:
        for lin, q in zip(linears, quantized, strict=True):
            weight = lin.weight
            keep = None if q is None or q.keep is None else q.keep.to(weight.device)
            if q is None:
                params.append(weight)
                masks.append(weight.detach() != 0)
            elif mode == "scales":
                part = _Scales(q, weight.device)
                parametrize.register_parametrization(lin, "weight", part, unsafe=True)
                params.append(part.factor)
                masks.append(None)
            else:
                part = _Rounded(q, weight.device)
                if mode == "ste":
                    parametrize.register_parametrization(lin, "weight", part)
                params.append(weight)  # the latent weight (ste), or the plain one (round)
                masks.append(keep)
            done.append((lin, part if q is not None else None))
        yield params, masks
    finally:
        with torch.no_grad():
            for lin, part in done:
                if part is None:
                    continue
                if parametrize.is_parametrized(lin, "weight"):
                    values = lin.weight.detach().clone()
                    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
                else:  # round: the float fit's weights, rounded now
                    values = part.values(lin.weight.detach().float())
                lin.weight.copy_(values.to(lin.weight.dtype))


def _scales_of(q: QuantizedLinear, w: torch.Tensor) -> torch.Tensor:
    """Per-group scales [out, groups] that give ``w`` from ``q``'s codes (the old scale where every code is the
    zero point): exact when ``w`` came from those codes with some stored scale."""
    gi = q.group_index
    offset = q.grid.offset[:, gi].float()
    levels = q.codes.float() - offset if _integer(q) else q.codes.float()
    base = torch.zeros_like(w) if _integer(q) else offset
    ratio = torch.where(levels != 0, (w - base) / torch.where(levels != 0, levels, torch.ones_like(levels)),
                        torch.full_like(w, -torch.inf))
    found = torch.full(q.grid.scale.shape, -torch.inf).scatter_reduce(1, gi.expand_as(w), ratio, "amax")
    return torch.where(torch.isfinite(found), found.to(q.spec.stored_dtype), q.grid.scale)


def resync(q: QuantizedLinear, weight: torch.Tensor) -> tuple[QuantizedLinear, bool]:
    """``q`` brought to ``weight`` (on a grid after a fit): new codes on the same grid (``ste``, ``round``), else new
    scales for the same codes (``scales``); (entry, exact). Not exact only where the model's dtype could not hold
    the grid values (the report's ``exact_in_model_dtype``): then the nearest codes on the old grid."""
    w = weight.detach().float().cpu()
    gi = q.group_index
    scale, offset = q.grid.scale[:, gi], q.grid.offset[:, gi]
    codes = quantize(w, scale, offset, q.spec)
    if q.keep is not None:
        codes = torch.where(q.keep, codes, offset)
    if torch.equal(dequantize(codes, scale, offset, q.spec, w.dtype), w):
        return replace(q, codes=codes), True
    scales = _scales_of(q, w)
    grid = Grid(scales, q.grid.zero, q.grid.minimum)
    if torch.equal(dequantize(q.codes, scales[:, gi], offset, q.spec, w.dtype), w):
        return replace(q, grid=grid), True
    return replace(q, codes=codes), False


def resync_all(quantized: dict[str, QuantizedLinear], linears: Mapping[str, nn.Linear]) -> dict[str, int]:
    """``resync`` the entries of ``quantized`` for ``linears`` ({path: module}) in place from their weights; counts
    of linears whose codes changed, whose scales changed, and that are not exactly on a grid."""
    counts = {"codes_changed": 0, "scales_changed": 0, "off_grid": 0}
    for path, lin in linears.items():
        old = quantized.get(path)
        if old is None:
            continue
        new, exact = resync(old, lin.weight)
        counts["codes_changed"] += int(not torch.equal(new.codes, old.codes))
        counts["scales_changed"] += int(not torch.equal(new.grid.scale, old.grid.scale))
        counts["off_grid"] += int(not exact)
        quantized[path] = new
    return counts


class GridTrainer:
    """A quantized run's ``prune.fit.Trainer``: ``on_grid`` with each linear's entry of ``quantized`` (which the
    engine fills as it goes), and ``resync`` of those entries after a fit (kept or restored)."""

    def __init__(self, quantized: dict[str, QuantizedLinear], linears: Mapping[str, nn.Linear], mode: str) -> None:
        self.quantized, self.linears, self.mode = quantized, linears, mode
        self.paths = {id(m): p for p, m in linears.items()}

    def __call__(self, linears: list[nn.Linear]):
        return on_grid(linears, [self.quantized.get(self.paths.get(id(lin), "")) for lin in linears], self.mode)

    def resync(self, paths: Iterable[str], records: list[dict]) -> dict[str, int]:
        """The entries of ``paths`` follow their weights, and so do their report ``records`` (by ``name``): a kept
        weight rounded to 0 may have moved off it, or another onto it (the masked ones stay 0)."""
        linears = {p: self.linears[p] for p in paths}
        for record in records:
            lin = linears.get(record.get("name"))
            if lin is not None:
                record["zeros"] = int((lin.weight == 0).sum())
                record["sparsity"] = record["zeros"] / lin.weight.numel()
        return resync_all(self.quantized, linears)


def grid_trainer(quantized: dict[str, QuantizedLinear], linears: Mapping[str, nn.Linear], stages: Iterable
                 ) -> GridTrainer | None:
    """The trainer for a run whose stages include a quantizer (``--quant-train`` among its options), else None."""
    mode = next((s.options.quant_train for s in stages if hasattr(s.options, "quant_train")), None)
    return None if mode is None else GridTrainer(quantized, linears, settled(mode, "recon"))
