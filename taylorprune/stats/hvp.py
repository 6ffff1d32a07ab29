"""Exact Hessian-vector products for Optimal Brain Apoptosis scores.

Sun et al., "Optimal Brain Apoptosis", ICLR 2025 (arXiv:2502.17941): the loss change of removing parameter i
is estimated to second order with the *exact* Hessian, ΔL_i ≈ g_i·δθ_i + ½·δθ_i·(H δθ)_i with δθ = −θ over all
pruned parameters, so cross-parameter (and cross-layer) curvature enters every score. H·δθ is a
Hessian-vector product, never the Hessian itself:

- ``blockwise`` (default): forward-over-reverse one decoder block at a time, the checkpointed form of the
  next mode. A forward sweep carries (h, ḣ) through the blocks with ``jvp`` (ḣ: the hidden states' tangent
  along δθ) and keeps only the block inputs; the head gives the output adjoint and its tangent; a backward
  sweep applies ``jvp`` to each block's ``vjp`` with tangents (ḣ_i, δθ_i, ȧ_{i+1}), which yields the gradient,
  H·δθ for the block's weights and the next adjoint pair. Exact (the chain rule applied to the gradient's own
  block-by-block composition), and only one block's second-order graph plus the logits' lives at a time;
- ``fwd-rev``: the same through the whole model at once, ``torch.func.jvp`` of ``torch.func.grad``;
- ``double-backward``: reverse-over-reverse, ``autograd.grad`` of the gradient with ``create_graph=True``.
The last two keep the whole model's second-order graph (8–11 GiB for one 512-token window of SmolLM2-135M)
and serve as references in the tests.

Streamed (``--stream``, or weights that do not fit beside the pass): ``blockwise`` with the model left in CPU
memory, each block visiting the device once per sweep of ``--stream-batch`` windows and direction, the block
inputs and tangents waiting in CPU memory, a half-precision block upcast on the device only. Equal to the
in-memory pass up to float round-off (tests/test_streamed_passes.py).

Scopes:
- ``model``: the calibration loss of the whole model (mean next-token cross-entropy per window, summed over
  windows), at the dense weights, before pruning — cross-layer terms included;
- ``block``: inside the layer-by-layer engine, the block's output reconstruction objective
  ½‖f(θ+δθ; X) − f(θ; X)‖² on the (already pruned upstream) block inputs X. At δθ = 0 its gradient is zero
  and its Hessian is exactly the Gauss-Newton JᵀJ, so H·δθ = Jᵀ(J·δθ) (a jvp then a vjp) and only one
  block's graph lives in memory: the path for large models. It is the objective layer-wise methods
  (SparseGPT, Wanda) minimise per linear, lifted to the block so q/k/v/o/MLP interactions count.

Attention runs as ``eager`` during these passes: fused SDPA kernels lack forward-mode AD / double backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from taylorprune.errors import RunError
from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout, Target
from taylorprune.modeling.streaming import activation_bytes, model_bytes, moved
from taylorprune.options import Options, option
from taylorprune.stats.source import ModelContext, Scope, Source, Stats

HVP_MODES = ("blockwise", "fwd-rev", "double-backward")
MODEL_HVP_STATS = ("oba_g", "oba_hvp")
ALL_MODEL_STATS = ("oba_g", "oba_hvp", "oba_gn")  # oba_gn: the Gauss–Newton part of H·δθ


def _loss_fn(model: nn.Module, names: list[str], ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    def loss(*weights: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, weights, strict=True))
        return functional_call(model, params, (ids,), {"labels": ids, "use_cache": False}, strict=False).loss

    return loss


def model_hvp(model: nn.Module, targets: list[Target], ids: torch.Tensor, mode: str = "fwd-rev"):
    """(g, H·δθ) of one window's loss w.r.t. the target weights, δθ = −W; tuples in target order."""
    weights = [t.module.weight for t in targets]
    primals = tuple(w.detach() for w in weights)
    tangents = tuple(-w.detach() for w in weights)
    if mode == "fwd-rev":
        names = [f"{t.path}.weight" for t in targets]
        return jvp(grad(_loss_fn(model, names, ids), argnums=tuple(range(len(names)))), primals, tangents)
    if mode == "double-backward":
        for w in weights:
            w.requires_grad_(True)
        try:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            g = torch.autograd.grad(loss, weights, create_graph=True)
            hv = torch.autograd.grad(g, weights, grad_outputs=tangents)
            return tuple(x.detach() for x in g), hv
        finally:
            for w in weights:
                w.requires_grad_(False)
    raise ValueError(f"unknown HVP mode {mode!r}")


def _target_names(block: nn.Module, targets: list[Target]) -> list[str]:
    """Parameter names of the targets' weights relative to ``block`` (for ``functional_call``)."""
    inside = {id(m): n for n, m in block.named_modules()}
    return [f"{inside[id(t.module)]}.weight" for t in targets]


def _block_fn(block: nn.Module, targets: list[Target], kwargs: dict) -> Callable[..., torch.Tensor]:
    """Block output as a function of (hidden states, *target weights)."""
    names = _target_names(block, targets)

    def f(hidden: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        out = functional_call(block, dict(zip(names, weights, strict=True)), (hidden,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    return f


Grads = tuple[torch.Tensor, ...]


def residual_hvp(logits_fn: Callable[..., torch.Tensor], params: tuple[torch.Tensor, ...],
                 tangents: tuple[torch.Tensor, ...], loss_of_logits: Callable[[torch.Tensor], torch.Tensor]):
    """R·v = H·v − Jᵀ(∇²_z ℓ)(J·v) of ℓ(z(θ)), z = ``logits_fn(*params)``: the residual (non Gauss–Newton) part
    of the Hessian applied to ``tangents``, in one piece for any function. ``blockwise_hvp(gauss_newton=True)``
    computes the same for a decoder stack block by block; this form is its reference in the tests."""

    def loss(*p: torch.Tensor) -> torch.Tensor:
        return loss_of_logits(logits_fn(*p))

    _, hv = jvp(grad(loss, argnums=tuple(range(len(params)))), params, tangents)
    z, dz = jvp(logits_fn, params, tangents)
    _, u = jvp(grad(loss_of_logits), (z,), (dz,))
    gn = vjp(logits_fn, *params)[1](u)
    return tuple(h - g for h, g in zip(hv, gn, strict=True))


def causal_lm_loss_of_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss with labels = inputs: mean next-token cross-entropy, logits in fp32."""
    shifted = logits[:, :-1].to(torch.float32)
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1))


def _first_target_block(layout: Layout) -> int:
    return next((i for i, targets in enumerate(layout.targets) if targets), len(layout.blocks))


def blockwise_hvp(runner, ids: torch.Tensor, gauss_newton: bool = False) -> Iterator[tuple[int, Grads, Grads, Grads]]:
    """Yield (block index, g, H·δθ, GN·δθ) of the loss summed over the windows ``ids`` (each window's mean
    next-token cross-entropy), δθ = −W, last block first (see module doc); fp32 sums.

    Windows go through in chunks of ``runner.batch_size``; each block visits the device once per sweep (a
    streaming runner moves it; the block inputs and tangents then wait in CPU memory when the device is not the
    CPU). Blocks before the first one with targets carry a zero tangent, so they run a plain forward.
    ``gauss_newton``: also the Gauss–Newton part Jᵀ(∇²_z ℓ)(J·δθ) of H·δθ (z: the logits), by one more reverse
    sweep whose cotangent is the loss Hessian applied to the logits' tangent; otherwise its entries are empty.
    A generator, so the caller folds each block's results into its sums before the next block's exist.
    """
    layout = runner.layout
    first = _first_target_block(layout)
    offload = runner.stream and runner.device.type != "cpu"
    keep = (lambda t: t.to("cpu")) if offload else (lambda t: t)
    windows = list(ids.split(runner.batch_size))
    hidden = runner.capture(ids)
    h = list(hidden.split(runner.batch_size))
    del hidden
    dh = [torch.zeros_like(x) for x in h]
    states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i in range(len(layout.blocks)):
        with runner.on_device(i, write=False) as block:
            if i < first:
                h = [runner.run(i, x) for x in h]
                continue
            f = _block_fn(block, layout.targets[i], runner.block_kwargs[i])
            w = tuple(t.module.weight.detach() for t in layout.targets[i])
            states[i] = [(keep(x), keep(dx)) for x, dx in zip(h, dh, strict=True)]
            outs = [jvp(f, (x, *w), (dx, *(-v for v in w))) for x, dx in zip(h, dh, strict=True)]
            h, dh = [o[0] for o in outs], [o[1] for o in outs]
    adj, dadj, gn = _head_adjoints(runner, windows, h, dh, gauss_newton)
    del h, dh
    for i in reversed(range(first, len(layout.blocks))):
        with runner.on_device(i, write=False, prefetch=i - 1 if i > first else None) as block:
            f = _block_fn(block, layout.targets[i], runner.block_kwargs[i])
            w = tuple(t.module.weight.detach() for t in layout.targets[i])
            sums: list[list[torch.Tensor]] = [[], [], []]
            for c, (x, dx) in enumerate(states.pop(i)):
                x, dx = x.to(runner.device), dx.to(runner.device)

                def pull(h: torch.Tensor, a: torch.Tensor, *ws: torch.Tensor, f=f) -> tuple[torch.Tensor, ...]:
                    return vjp(f, h, *ws)[1](a)

                (adj[c], *g), (dadj[c], *hv) = jvp(pull, (x, adj[c], *w), (dx, dadj[c], *(-v for v in w)))
                gnv: list[torch.Tensor] = []
                if gn is not None:
                    gn[c], *gnv = vjp(f, x, *w)[1](gn[c])
                for acc, values in zip(sums, (g, hv, gnv), strict=True):
                    _add(acc, values)
            yield i, tuple(sums[0]), tuple(sums[1]), tuple(sums[2])


def _add(sums: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    if not sums:
        sums.extend(v.to(torch.float32) for v in values)
    else:
        for acc, v in zip(sums, values, strict=True):
            acc.add_(v.to(torch.float32))


def _head_adjoints(runner, windows: list[torch.Tensor], h: list[torch.Tensor], dh: list[torch.Tensor],
                   gauss_newton: bool):
    """Per chunk of windows: the adjoint of the last hidden state, its tangent along δθ, and (``gauss_newton``)
    the Gauss–Newton cotangent Jᵀ_head(∇²_z ℓ)(ż); ℓ = the chunk's summed window losses."""
    adj, dadj, gn = [], [], [] if gauss_newton else None
    with runner.outside_on_device(head=True):
        for ids, x, dx in zip(windows, h, dh, strict=True):
            ids = ids.to(runner.input_device)
            count = ids.shape[0]

            def head(z: torch.Tensor, ids=ids) -> torch.Tensor:
                return runner.head(ids, z).logits

            def loss_of_logits(z: torch.Tensor, ids=ids, count=count) -> torch.Tensor:
                return causal_lm_loss_of_logits(z, ids) * count  # windows of equal length: Σ of window means

            a, da = jvp(grad(lambda z: loss_of_logits(head(z))), (x,), (dx,))
            adj.append(a)
            dadj.append(da)
            if gn is not None:
                z, dz = jvp(head, (x,), (dx,))
                _, u = jvp(grad(loss_of_logits), (z.detach(),), (dz.detach(),))
                gn.append(vjp(head, x)[1](u)[0])
    return adj, dadj, gn


def model_hvp_pass(
    model: nn.Module,
    layout: Layout,
    calib_ids: torch.Tensor,
    mode: str = "blockwise",
    device: torch.device | None = None,
    on_sample: Callable[[int], None] | None = None,
    stats: frozenset[str] = frozenset(MODEL_HVP_STATS),
    dtype: str = "float32",
    stream: bool = False,
    windows_per_sweep: int = 16,
    batch_size: int = 1,
) -> dict[str, dict[str, torch.Tensor]]:
    """Σ over windows of g, H·δθ (and GN·δθ when ``oba_gn`` is in ``stats``), fp32 on the CPU, for every target.

    ``dtype`` float32 runs a bf16/fp16 model in fp32 for the pass (second-order products overflow or lose all
    precision in half precision) and casts it back afterwards, which restores the weights exactly.
    ``stream``: the model stays where it is and blocks visit ``device`` one at a time (always ``blockwise``),
    ``windows_per_sweep`` windows per sweep in forward calls of ``batch_size``; half-precision blocks are upcast
    on the device only, the stored weights are never touched.
    """
    if stream:
        return _streamed_hvp_pass(model, layout, calib_ids, device or torch.device("cpu"), on_sample, stats, dtype,
                                  windows_per_sweep, batch_size)
    if "oba_gn" in stats and mode != "blockwise":
        raise ValueError("the Gauss–Newton part is computed in blockwise mode only")
    targets = layout.all_targets
    home_dtype = next(model.parameters()).dtype
    upcast = dtype == "float32" and home_dtype in (torch.float16, torch.bfloat16)
    movable = device is not None and not getattr(model, "hf_device_map", None)
    names = [s for s in ALL_MODEL_STATS if s in stats]
    with moved(model, device if movable else None, torch.float32 if upcast else None), eager_attention(model):
        input_device = model.get_input_embeddings().weight.device
        sums = {n: [torch.zeros(t.module.weight.shape, dtype=torch.float32, device=t.module.weight.device)
                    for t in targets] for n in names}
        runner = BlockRunner(model, layout, input_device, stream=False)  # the model already sits there
        starts = _starts(layout)
        for i, ids in enumerate(calib_ids):
            window = ids.unsqueeze(0).to(input_device)
            if mode == "blockwise":
                parts = ((starts[b], *rest) for b, *rest in blockwise_hvp(runner, window, "oba_gn" in stats))
            else:
                parts = [(0, *model_hvp(model, targets, window, mode), ())]
            _fold(sums, parts)
            if on_sample:
                on_sample(i)
    return _checked({t.path: {n: sums[n][k].cpu() for n in names} for k, t in enumerate(targets)})


def _starts(layout: Layout) -> list[int]:
    """Index of each block's first target in ``layout.all_targets``."""
    starts = [0]
    for block_targets in layout.targets:
        starts.append(starts[-1] + len(block_targets))
    return starts


def _fold(sums: dict[str, list[torch.Tensor]], parts) -> None:
    for first, g, hv, gnv in parts:
        for name, values in (("oba_g", g), ("oba_hvp", hv), ("oba_gn", gnv)):
            if name in sums:
                for j, v in enumerate(values):
                    sums[name][first + j].add_(v.to(sums[name][first + j].device, torch.float32))


def _streamed_hvp_pass(model, layout, calib_ids, device, on_sample, stats, dtype, windows_per_sweep, batch_size):
    home_dtype = next(model.parameters()).dtype
    upcast = dtype == "float32" and home_dtype in (torch.float16, torch.bfloat16)
    runner = BlockRunner(model, layout, torch.device(device), batch_size, stream=True,
                         dtype=torch.float32 if upcast else None)
    targets = layout.all_targets
    names = [s for s in ALL_MODEL_STATS if s in stats]
    sums = {n: [torch.zeros(t.module.weight.shape, dtype=torch.float32) for t in targets] for n in names}
    starts = _starts(layout)
    try:
        with eager_attention(model):
            for start in range(0, len(calib_ids), windows_per_sweep):
                ids = calib_ids[start:start + windows_per_sweep]
                _fold(sums, ((starts[b], *rest) for b, *rest in blockwise_hvp(runner, ids, "oba_gn" in stats)))
                for k in range(len(ids)):
                    if on_sample:
                        on_sample(start + k)
    finally:
        runner.streamer.close()
    return _checked({t.path: {n: sums[n][k] for n in names} for k, t in enumerate(targets)})


def in_memory_bytes(ctx: ModelContext, wanted: frozenset[str], dtype: str) -> int:
    """Device memory ``model_hvp_pass`` needs beside the weights (a heuristic): the fp32 copy of a half-precision
    model, fp32 sums per target weight, one window's block inputs and tangents, one block's second-order graph
    and the logits' (fp32)."""
    config, param = ctx.model.config, next(ctx.model.parameters())
    upcast = dtype == "float32" and param.dtype in (torch.float16, torch.bfloat16)
    numel = sum(t.module.weight.numel() for t in ctx.layout.all_targets)
    seqlen, layers = ctx.calib_ids.shape[-1], max(1, config.num_hidden_layers)
    states = 2 * layers * seqlen * config.hidden_size * 4
    graphs = 3 * activation_bytes(config, seqlen, 4) // layers + 3 * seqlen * config.vocab_size * 4
    return (model_bytes(ctx.model) if upcast else 0) + 4 * len(wanted) * numel + states + graphs


def streaming(ctx: ModelContext, wanted: frozenset[str], dtype: str) -> dict:
    """``model_hvp_pass`` arguments for ``ctx``: block by block when the weights are streamed or the whole-model
    pass would not fit next to them."""
    stream = ctx.blockwise(in_memory_bytes(ctx, wanted, dtype))
    if stream:
        ctx.event("streamed:hvp")
    return {"stream": stream, "windows_per_sweep": ctx.stream_batch, "batch_size": ctx.batch_size}


def block_hvp(block: nn.Module, kwargs: dict, targets: list[Target], hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Jᵀ(J·δθ) of the block outputs w.r.t. its target weights on one batch of inputs, δθ = −W."""
    outputs = functools.partial(_block_fn(block, targets, kwargs), hidden)
    primals = tuple(t.module.weight.detach() for t in targets)
    tangents = tuple(-p for p in primals)
    _, jv = jvp(outputs, primals, tangents)
    _, pullback = vjp(outputs, *primals)
    return pullback(jv)


def _float_kwargs(kwargs: dict) -> dict:
    """Block keyword arguments with floating tensors (rotary cos/sin, masks) in fp32."""

    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(torch.float32)
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    return {k: cast(v) for k, v in kwargs.items()}


def block_hvp_stats(runner, i: int, hidden: torch.Tensor, targets: list[Target], options) -> dict:
    """Σ over calibration batches of the block-scope H·δθ for block ``i`` (its targets only); a half-precision
    block runs in fp32 for it when ``hvp_dtype`` is float32 (cast back afterwards, exactly)."""
    sums = [torch.zeros(t.module.weight.shape, dtype=torch.float32, device=t.module.weight.device) for t in targets]
    block = runner.layout.blocks[i]
    kwargs = runner.block_kwargs[i]
    home = next(block.parameters()).dtype
    upcast = getattr(options, "hvp_dtype", "float32") == "float32" and home in (torch.float16, torch.bfloat16)
    if upcast:
        kwargs = _float_kwargs(kwargs)
    with moved(block, dtype=torch.float32 if upcast else None), eager_attention(runner.model):
        for chunk in hidden.split(runner.batch_size):
            chunk = chunk.to(torch.float32) if upcast else chunk
            for acc, hv in zip(sums, block_hvp(block, kwargs, targets, chunk), strict=True):
                acc.add_(hv.to(torch.float32))
    return _checked({t.path: {"oba_block_hvp": s} for t, s in zip(targets, sums, strict=True)})


def _checked(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    for path, d in stats.items():
        for name, t in d.items():
            if not torch.isfinite(t).all():
                raise RunError(f"{path}: non-finite {name} (overflow?); rerun with --dtype float32")
    return stats


def dtype_option():
    """``hvp_dtype``, declared once for every component that takes Hessian-vector products."""
    return option("float32", "Precision of HVP passes: float32 (a bf16/fp16 model is upcast for them, then cast "
                  "back exactly) or model (the model's own dtype).", choices=("float32", "model"))


@dataclass(frozen=True)
class BlockHvpOptions(Options):
    hvp_cache: str | None = option(None, "HVP cache (.safetensors): reused when it was made the same way (model, "
                                   "calibration, dtype; for block scope also the pruning recipe), else written.",
                                   identity=False)
    hvp_dtype: str = dtype_option()


@dataclass(frozen=True)
class ModelHvpOptions(BlockHvpOptions):
    hvp_mode: str = option("blockwise", "How exact HVPs of the whole model are taken: blockwise (jvp of each "
                           "block's vjp, one block's graph in memory), fwd-rev (jvp of grad, whole model) or "
                           "double-backward; a streamed pass (--stream, or a model that does not fit) is always "
                           "blockwise.", choices=HVP_MODES, identity=False)


def _model_compute(ctx: ModelContext, wanted: frozenset[str], options: ModelHvpOptions) -> Stats:
    tick = ctx.progress("Hessian-vector products (samples)", len(ctx.calib_ids))
    ctx.event("hvp_pass")
    return model_hvp_pass(ctx.model, ctx.layout, ctx.calib_ids, options.hvp_mode, ctx.device, tick, wanted,
                          options.hvp_dtype, **streaming(ctx, wanted, options.hvp_dtype))


MODEL_SOURCE = Source("hvp", Scope.MODEL, ALL_MODEL_STATS,
                      "g, exact H·δθ and its Gauss–Newton part (δθ = −W) of the dense model's calibration loss, "
                      "summed over windows",
                      options=ModelHvpOptions, compute=_model_compute, cache_option="hvp_cache")
BLOCK_SOURCE = Source("hvp-block", Scope.BLOCK, ("oba_block_hvp",),
                      "Jᵀ(J·δθ) of each block's output reconstruction objective on its calibration inputs",
                      options=BlockHvpOptions, compute=block_hvp_stats, cache_option="hvp_cache")
