"""Model-scope statistics: computed once on the *dense* model before the layer-by-layer engine starts
(gradients now; Hessian-vector products plug in the same way). Block-scope statistics live in ``stats``.

A provider covers a family of statistics and may be cached; the pipeline only calls ``collect``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from taylorprune.calib.sampling import CalibSpec
from taylorprune.modeling.layout import Layout
from taylorprune.scoring import cache
from taylorprune.scoring.gradients import GRAD_STATS, gradient_pass
from taylorprune.scoring.hvp import MODEL_HVP_STATS, model_hvp_pass

Stats = dict[str, dict[str, torch.Tensor]]


@dataclass
class Context:
    """What a provider may use: the dense model, its targets, the calibration windows and the options."""

    model: torch.nn.Module
    layout: Layout
    calib_ids: torch.Tensor
    spec: CalibSpec
    options: dict
    device: torch.device
    progress: Callable[[str, int], Callable[[int], None]] = lambda name, total: (lambda i: None)
    events: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Provider:
    stats: tuple[str, ...]
    compute: Callable[[Context, frozenset[str]], Stats]
    cache_option: str
    identity: Callable[[Context], dict[str, str]]


def _gradients(ctx: Context, needed: frozenset[str]) -> Stats:
    tick = ctx.progress("gradient pass (samples)", len(ctx.calib_ids))
    ctx.events.append("gradient_pass")
    return gradient_pass(ctx.model, ctx.layout, ctx.calib_ids, needed, float(ctx.options.get("grad_scale", 100.0)),
                         ctx.device, bool(ctx.options.get("grad_checkpointing", False)), tick)


def _gradient_identity(ctx: Context) -> dict[str, str]:
    return {
        "kind": "gradients",
        "model": cache.model_fingerprint(ctx.model, ctx.layout),
        # The text's sha256 identifies the calibration source; its path may differ between runs.
        "calibration": json.dumps({k: v for k, v in ctx.spec.describe().items() if k != "source"}, sort_keys=True),
        "grad_scale": repr(float(ctx.options.get("grad_scale", 100.0))),
        "dtype": str(next(ctx.model.parameters()).dtype),
    }


def _hvps(ctx: Context, needed: frozenset[str]) -> Stats:
    tick = ctx.progress("Hessian-vector products (samples)", len(ctx.calib_ids))
    ctx.events.append("hvp_pass")
    return model_hvp_pass(ctx.model, ctx.layout, ctx.calib_ids, str(ctx.options.get("hvp_mode", "blockwise")),
                          ctx.device, tick)


def _hvp_identity(ctx: Context) -> dict[str, str]:
    return dict(_gradient_identity(ctx), kind="hvp", grad_scale="1.0")


PROVIDERS: list[Provider] = [
    Provider(GRAD_STATS, _gradients, "grad_cache", _gradient_identity),
    Provider(MODEL_HVP_STATS, _hvps, "hvp_cache", _hvp_identity),
]


def is_model_stat(name: str) -> bool:
    return any(name in p.stats for p in PROVIDERS)


def collect(needs: frozenset[str], ctx: Context) -> Stats:
    """All model-scope statistics in ``needs``: {target path: {stat: tensor}}."""
    out: Stats = {}
    targets = [t.path for t in ctx.layout.all_targets]
    for provider in PROVIDERS:
        wanted = frozenset(s for s in needs if s in provider.stats)
        if not wanted:
            continue
        path = ctx.options.get(provider.cache_option)
        identity = provider.identity(ctx) if path else {}
        stats = cache.cached(path, identity, wanted, targets, lambda missing, p=provider: p.compute(ctx, missing),
                             on_hit=lambda p=provider: ctx.events.append(f"{p.cache_option}_hit"))
        for t, d in stats.items():
            out.setdefault(t, {}).update(d)
    return out
