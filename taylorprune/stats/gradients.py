"""The gradient pass: per-sample gradients of the causal-LM loss, reduced over samples as they appear.

As in GBLM-Pruner (Das et al., "Beyond Size: How Gradients Shape Pruning Decisions in Large Language
Models", arXiv:2311.04902), each calibration window is one sample: loss = mean next-token cross-entropy with
labels = inputs, one backward on the dense model, and the per-sample gradient g of each target weight is
scaled (``--grad-scale``, 100 in the paper) and reduced in fp32:

    grad_l1  = Σ_s |g_s|          grad_l2 = sqrt(Σ_s g_s²)          grad_sum = Σ_s g_s

Unlike the reference (two scripts, full fp16 ``.grad`` of every parameter, fp16 accumulators), only target
weights require grad, and a post-accumulate hook folds each weight's gradient into its statistics and frees
it at once, so at most one target ``.grad`` is alive at any time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune.errors import RunError
from taylorprune.modeling.layout import Layout
from taylorprune.options import Options, option
from taylorprune.stats.source import ModelContext, Scope, Source, Stats

GRAD_STATS = ("grad_l1", "grad_l2", "grad_sum")
FP16_LOSS_SCALE = 1024.0


class _Accumulator:
    """fp32 reductions of one weight's scaled per-sample gradients."""

    def __init__(self, path: str, weight: nn.Parameter, stats: frozenset[str], scale: float) -> None:
        self.path, self.scale = path, scale  # ``scale`` also undoes the loss scaling of fp16 models
        zeros = lambda: torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # noqa: E731
        self.sums = {"grad_l1": zeros()} if "grad_l1" in stats else {}
        if "grad_l2" in stats:
            self.sums["grad_l2"] = zeros()
        if "grad_sum" in stats:
            self.sums["grad_sum"] = zeros()

    def __call__(self, param: nn.Parameter) -> None:
        """Fold the just-accumulated ``.grad`` into the sums in place, then free it (no extra copies)."""
        g = param.grad
        param.grad = None
        g = g.to(torch.float32) if g.dtype != torch.float32 else g
        g.mul_(self.scale)
        if "grad_l2" in self.sums:
            self.sums["grad_l2"].addcmul_(g, g)
        if "grad_sum" in self.sums:
            self.sums["grad_sum"].add_(g)
        if "grad_l1" in self.sums:
            self.sums["grad_l1"].add_(g.abs_())

    def result(self) -> dict[str, torch.Tensor]:
        out = dict(self.sums)
        for name, t in out.items():
            if not torch.isfinite(t).all():
                raise RunError(f"{self.path}: non-finite {name} (fp16 overflow?); use --dtype bfloat16 or float32")
        if "grad_l2" in out:
            out["grad_l2"] = out["grad_l2"].sqrt_()
        return {k: v.cpu() for k, v in out.items()}


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy with labels = inputs (transformers upcasts logits to fp32)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def gradient_pass(
    model: nn.Module,
    layout: Layout,
    calib_ids: torch.Tensor,
    stats: frozenset[str],
    scale: float = 100.0,
    device: torch.device | None = None,
    checkpointing: bool = False,
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run one forward+backward per calibration window; return {target path: {stat: fp32 tensor}} on CPU."""
    stats = frozenset(s for s in stats if s in GRAD_STATS)
    accs: dict[str, _Accumulator] = {}
    handles = []
    was_training = model.training
    home = next(model.parameters()).device
    # fp16 gradients underflow: scale the loss up (fp32 loss), undo it in fp32 inside the accumulators.
    loss_scale = FP16_LOSS_SCALE if next(model.parameters()).dtype == torch.float16 else 1.0
    if device is not None and not getattr(model, "hf_device_map", None):
        model.to(device)  # the backward needs the whole model on one device (or an accelerate device map)
    input_device = model.get_input_embeddings().weight.device
    try:
        for tg in layout.all_targets:
            acc = _Accumulator(tg.path, tg.module.weight, stats, scale / loss_scale)
            accs[tg.path] = acc
            tg.module.weight.requires_grad_(True)
            handles.append(tg.module.weight.register_post_accumulate_grad_hook(acc))
        if checkpointing:  # transformers only checkpoints blocks in training mode; LLaMA-class dropout is 0
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        for i, ids in enumerate(calib_ids):
            loss = causal_lm_loss(model, ids.unsqueeze(0).to(input_device))
            if not torch.isfinite(loss):
                raise RunError(f"calibration window {i}: non-finite loss ({loss.item()}); check --dtype")
            (loss * loss_scale).backward()
            if on_sample:
                on_sample(i)
    finally:
        for h in handles:
            h.remove()
        for tg in layout.all_targets:
            tg.module.weight.requires_grad_(False)
            tg.module.weight.grad = None
        if checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        model.train(was_training)
        if device is not None and not getattr(model, "hf_device_map", None):
            model.to(home)
    return {path: acc.result() for path, acc in accs.items()}


@dataclass(frozen=True)
class GradientOptions(Options):
    grad_scale: float = option(100.0, "Scale of each per-sample gradient (GBLM-Pruner uses 100).", above=0)
    grad_cache: str | None = option(None, "Gradient cache (.safetensors): reused when model, calibration, scale "
                                    "and dtype match (a mismatch is an error), else computed and written.",
                                    identity=False)
    grad_checkpointing: bool = option(False, "Gradient checkpointing in the gradient pass (long sequences).",
                                      identity=False, memory_hint="--grad-checkpointing")


def _compute(ctx: ModelContext, wanted: frozenset[str], options: GradientOptions) -> Stats:
    tick = ctx.progress("gradient pass (samples)", len(ctx.calib_ids))
    ctx.event("gradient_pass")
    return gradient_pass(ctx.model, ctx.layout, ctx.calib_ids, wanted, options.grad_scale, ctx.device,
                         options.grad_checkpointing, tick)


SOURCE = Source("gradients", Scope.MODEL, GRAD_STATS,
                "per-sample gradients of the dense model's loss, scaled, reduced as Σ|g|, sqrt(Σg²), Σg",
                options=GradientOptions, compute=_compute, cache_option="grad_cache",
                cache_together=("grad_l1", "grad_l2"))
