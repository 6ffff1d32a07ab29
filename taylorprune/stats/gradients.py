"""The gradient pass: per-sample gradients of the causal-LM loss, reduced over samples as they appear.

As in GBLM-Pruner (Das et al., "Beyond Size: How Gradients Shape Pruning Decisions in Large Language
Models", arXiv:2311.04902), each calibration window is one sample: loss = mean next-token cross-entropy with
labels = inputs, one backward on the dense model, and the per-sample gradient g of each target weight is
scaled (``--grad-scale``, 100 in the paper) and reduced in fp32:

    grad_l1  = Σ_s |g_s|          grad_l2 = sqrt(Σ_s g_s²)          grad_sum = Σ_s g_s

Unlike the reference (two scripts, full fp16 ``.grad`` of every parameter, fp16 accumulators), only target
weights require grad, and a post-accumulate hook folds each weight's gradient into its statistics and frees
it at once, so at most one target ``.grad`` is alive at any time.

``streamed_gradient_pass`` computes the same statistics for models that do not fit on the device (or with
``--stream``): per sweep of windows, a forward block by block keeps each block's input (in CPU memory when the
device is not the CPU), the head gives each window's adjoint of the last hidden state, and a backward block by
block in reverse recomputes each block's forward from its stored input and pulls the adjoint through it, one
window at a time (so each per-sample gradient is exact). Each block visits the device once per sweep and
direction; its statistics are summed on the device during the visit and added to fp32 sums in CPU memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.errors import RunError
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout
from taylorprune.modeling.placement import gradient_bytes
from taylorprune.modeling.sweep import block_sweep, forward, in_sweeps, trainable
from taylorprune.options import Options, option
from taylorprune.stats.source import ModelContext, Scope, Source, Stats

GRAD_STATS = ("grad_l1", "grad_l2", "grad_sum")
FP16_LOSS_SCALE = 1024.0


class _Accumulator:
    """fp32 reductions of one weight's scaled per-sample gradients."""

    def __init__(self, path: str, shape: torch.Size, stats: frozenset[str], scale: float,
                 device: torch.device | str = "cpu") -> None:
        self.path, self.scale = path, scale  # ``scale`` also undoes the loss scaling of fp16 models
        self.sums = {name: torch.zeros(shape, dtype=torch.float32, device=device)
                     for name in GRAD_STATS if name in stats}

    def __call__(self, param: nn.Parameter) -> None:
        """Fold the just-accumulated ``.grad`` into the sums in place, then free it (no extra copies)."""
        g = param.grad
        param.grad = None
        self.fold(g)

    def fold(self, g: torch.Tensor) -> None:
        """Add one sample's gradient (consumed: scaled in place when already fp32)."""
        g = g.to(torch.float32) if g.dtype != torch.float32 else g
        g.mul_(self.scale)
        if "grad_l2" in self.sums:
            self.sums["grad_l2"].addcmul_(g, g)
        if "grad_sum" in self.sums:
            self.sums["grad_sum"].add_(g)
        if "grad_l1" in self.sums:
            self.sums["grad_l1"].add_(g.abs_())

    def merge(self, other: _Accumulator) -> None:
        """Add another accumulator's sums (made on another device, e.g. during one block's visit)."""
        for name, t in other.sums.items():
            self.sums[name].add_(t.to(self.sums[name].device))

    def reduce(self) -> _Accumulator:
        """Sum over the ranks of a data-parallel run (before the square root of grad_l2)."""
        for t in self.sums.values():
            distributed.all_sum(t)
        return self

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
        with trainable(t.module.weight for t in layout.all_targets):
            for tg in layout.all_targets:
                weight = tg.module.weight
                acc = _Accumulator(tg.path, weight.shape, stats, scale / loss_scale, weight.device)
                accs[tg.path] = acc
                handles.append(weight.register_post_accumulate_grad_hook(acc))
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
        if checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        model.train(was_training)
        if device is not None and not getattr(model, "hf_device_map", None):
            model.to(home)
    return {path: acc.reduce().result() for path, acc in accs.items()}


def streamed_gradient_pass(
    model: nn.Module,
    layout: Layout,
    calib_ids: torch.Tensor,
    stats: frozenset[str],
    scale: float = 100.0,
    device: torch.device | str = "cpu",
    on_sample: Callable[[int], None] | None = None,
    windows_per_sweep: int = 16,
    batch_size: int = 1,
) -> dict[str, dict[str, torch.Tensor]]:
    """``gradient_pass``'s statistics, block by block (see the module docstring); the model stays where it is."""
    stats = frozenset(s for s in stats if s in GRAD_STATS)
    runner = BlockRunner(model, layout, torch.device(device), batch_size, stream=True)
    loss_scale = FP16_LOSS_SCALE if next(model.parameters()).dtype == torch.float16 else 1.0
    totals = {t.path: _Accumulator(t.path, t.module.weight.shape, stats, 1.0) for t in layout.all_targets}
    first = layout.first_target_block
    was_training = model.training
    model.eval()
    try:
        with trainable(t.module.weight for t in layout.all_targets):
            for part in in_sweeps(len(calib_ids), windows_per_sweep):
                ids = calib_ids[part]
                stored, last = _forward_sweep(runner, ids, first)
                adjoints = _head_adjoints(runner, ids, last, loss_scale, part.start)
                del last
                _backward_sweep(runner, stored, adjoints, first, totals, stats, scale / loss_scale)
                for k in range(len(ids)):
                    if on_sample:
                        on_sample(part.start + k)
    finally:
        model.train(was_training)
        runner.streamer.close()
    return {path: acc.reduce().result() for path, acc in totals.items()}


def _forward_sweep(runner: BlockRunner, ids: torch.Tensor, first: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Block inputs from block ``first`` on (in CPU memory unless computing on the CPU), and the last output."""
    offload = runner.device.type != "cpu"
    stored: dict[int, torch.Tensor] = {}

    def keep(i: int, hidden: torch.Tensor) -> None:
        if i >= first:
            stored[i] = hidden.to("cpu") if offload else hidden

    return stored, forward(runner, runner.capture(ids), visit=keep, write=False)


def _head_adjoints(runner: BlockRunner, ids: torch.Tensor, last: torch.Tensor, loss_scale: float,
                   start: int) -> torch.Tensor:
    """d(loss · loss_scale)/d(last hidden state) of each window, from the model's own head and loss."""
    adjoints = []
    with runner.outside_on_device(head=True):
        for k in range(len(ids)):
            h = last[k:k + 1].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = runner.head(ids[k:k + 1], h, labels=True).loss
                if not torch.isfinite(loss):
                    raise RunError(f"calibration window {start + k}: non-finite loss ({loss.item()}); check --dtype")
                (adjoint,) = torch.autograd.grad(loss * loss_scale, h)
            adjoints.append(adjoint)
    return torch.cat(adjoints)


def _backward_sweep(runner: BlockRunner, stored: dict[int, torch.Tensor], adjoints: torch.Tensor, first: int,
                    totals: dict[str, _Accumulator], stats: frozenset[str], scale: float) -> None:
    """Last block first: recompute each window's block forward, pull its adjoint through, fold the gradients."""

    def step(i: int, adjoints: torch.Tensor) -> torch.Tensor:
        targets = runner.layout.targets[i]
        weights = [t.module.weight for t in targets]
        partial = [_Accumulator(t.path, w.shape, stats, scale, w.device) for t, w in zip(targets, weights, strict=True)]
        need_input = i > first
        pulled = []
        for k in range(len(adjoints)):
            x = stored[i][k:k + 1].to(runner.device)
            if need_input:
                x.requires_grad_(True)
            with torch.enable_grad():
                y = runner.call(i, x)
                grads = list(torch.autograd.grad(y, ([x] if need_input else []) + weights,
                                                 grad_outputs=adjoints[k:k + 1]))
            if need_input:
                pulled.append(grads.pop(0))
            for acc, g in zip(partial, grads, strict=True):
                acc.fold(g)
        for t, acc in zip(targets, partial, strict=True):
            totals[t.path].merge(acc)
        del stored[i]
        return torch.cat(pulled) if need_input else adjoints

    block_sweep(runner, adjoints, step, blocks=range(first, len(runner.layout.blocks)), reverse=True, write=False)


def in_memory_bytes(ctx: ModelContext, wanted: frozenset[str], checkpointing: bool) -> int:
    """Device memory ``gradient_pass`` needs beside the weights (``placement.gradient_bytes``)."""
    numel = sum(t.module.weight.numel() for t in ctx.layout.all_targets)
    element = next(ctx.model.parameters()).element_size()
    return gradient_bytes(ctx.model.config, numel, len(set(wanted) & set(GRAD_STATS)), ctx.calib_ids.shape[-1],
                          element, checkpointing)


@dataclass(frozen=True)
class GradientOptions(Options):
    grad_scale: float = option(100.0, "Scale of each per-sample gradient (GBLM-Pruner uses 100).", above=0)
    grad_cache: str | None = option(None, "Gradient cache (.safetensors): reused when model, calibration, scale "
                                    "and dtype match (a mismatch is an error), else computed and written.",
                                    identity=False)
    grad_checkpointing: bool = option(False, "Gradient checkpointing in the gradient pass (long sequences).",
                                      identity=False, memory_hint="--grad-checkpointing")


def _compute(ctx: ModelContext, wanted: frozenset[str], options: GradientOptions) -> Stats:
    ctx.event("gradient_pass")
    if ctx.blockwise(in_memory_bytes(ctx, wanted, options.grad_checkpointing)):
        ctx.event("streamed:gradients")
        tick = ctx.progress("gradient pass, block by block (samples)", len(ctx.calib_ids))
        return streamed_gradient_pass(ctx.model, ctx.layout, ctx.calib_ids, wanted, options.grad_scale, ctx.device,
                                      tick, ctx.stream_batch, ctx.batch_size)
    tick = ctx.progress("gradient pass (samples)", len(ctx.calib_ids))
    return gradient_pass(ctx.model, ctx.layout, ctx.calib_ids, wanted, options.grad_scale, ctx.device,
                         options.grad_checkpointing, tick)


SOURCE = Source("gradients", Scope.MODEL, GRAD_STATS,
                "per-sample gradients of the dense model's loss, scaled, reduced as Σ|g|, sqrt(Σg²), Σg",
                options=GradientOptions, compute=_compute, cache_option="grad_cache",
                cache_together=("grad_l1", "grad_l2"))
