"""Block reconstruction (``--recon block``): re-fit a pruned block's kept weights to the dense block's outputs.

After every target linear of a block is masked (and refined and updated), the kept weights of all of them are
optimised together with Adam so that the pruned block maps its calibration inputs (the pruned model's
activations, as the engine propagates them) to the dense outputs — the dense block on the dense model's
activations (``--recon-target dense``: errors of earlier blocks are corrected too, as in EBFT, Guo et al.,
"EBFT: Effective and Block-Wise Fine-Tuning for Sparse LLMs", 2024) or on the same inputs (``same``). Masks are
fixed (``prune.fit``, the loop shared with recovery). The weights are optimised in fp32 (a half-precision block
is upcast and cast back once at the end); the last eighth of the calibration windows (two at least, at most
``--recon-heldout``) is held out and the weights with the lowest held-out error are kept (early stop after
``--recon-patience`` evaluations without improvement). Batches are drawn from a generator seeded by ``--seed``
and the block index, so runs repeat exactly.

A fit never leaves its blocks worse than it found them on the held-out windows: it is kept only if it lowers
their error there (on the weights as returned, in the model's dtype) and the model's next-token loss there
(``--recon-guard``: every fit of compact blocks, the last block's fit of masked ones; ``prune.trail`` says why
block error is not enough); otherwise every weight it changed is restored, a span's jointly. The report's record
of each fit says ``kept`` and the held-out numbers without and with it; the phase record counts the fits kept
(``recon_summary``). One held-out window was too few: on stories260K (neurons 30%) fits lowered the error of the
window they were early-stopped on by 9–13% and that of four fresh windows by only 0.6–3.7%.

``--recon-span N`` (our extension; 1 is the plain block fit above) fits the block just pruned together with the
N − 1 blocks before it, from the first one's calibration inputs to the last one's goal outputs (``Trail`` keeps
those inputs and re-runs the stream through the changed blocks). A block alone can only partly undo the error
its inputs carry; a span lets the earlier blocks change what they pass on. On compact (neuron-pruned) SmolLM2
blocks a single block's held-out error falls only 1–6% while span 2 lowers PPL further (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.options import NoOptions, Options, by_name, option
from taylorprune.prune.fit import FitSettings, Trainer, masked_fit, plain
from taylorprune.prune.trail import GUARDS, Trail, heldout_windows, mine

__all__ = ["BLOCK", "NONE", "RECONS", "ReconOptions", "Trail", "recon_summary", "reconstruct", "settled"]

TARGETS = ("dense", "same")
LOSSES = ("auto", "mse", "normed")
# Defaults by block kind, measured: pre-norm blocks (LLaMA, SmolLM2-135M: mse, 3e-3, docs/BENCHMARKS.md) and blocks
# whose sublayer outputs are normalised before the residual add (Gemma-3-270m, SparseGPT 50% + recon: normed with
# 5e-4 62.82 against SparseGPT alone 70.08; mse with 5e-4 74.59, normed with 3e-3 83.44, mse with 3e-3 689.60).
DEFAULTS = {False: ("mse", 3e-3), True: ("normed", 5e-4)}


@dataclass(frozen=True)
class ReconOptions(Options):
    recon_steps: int = option(25, "Adam steps per block at most (25 keeps SparseGPT+recon within 2× SparseGPT's "
                              "prune time on SmolLM2, docs/BENCHMARKS.md).", minimum=1, maximum=100_000)
    recon_lr: float | None = option(None, "Adam learning rate of the block reconstruction (default: 3e-3, or 5e-4 for "
                                    "blocks with post-sublayer norms such as Gemma's; SmolLM2 2:4 SparseGPT+recon: "
                                    "1e-4 73.29, 3e-4 68.68, 1e-3 61.24, 3e-3 58.98; SparseGPT alone 86.20).",
                                    above=0)
    recon_batch: int = option(4, "Calibration windows per reconstruction step.", minimum=1)
    recon_target: str = option("dense", "Fit to the dense block's outputs on the dense model's activations (dense) "
                               "or on the pruned model's (same).", choices=TARGETS)
    recon_patience: int = option(3, "Held-out evaluations (every 10 steps) without improvement before stopping.",
                                 minimum=1)
    recon_span: int = option(1, "Blocks fitted together: the block just pruned and the span − 1 blocks before it, "
                             "from the first one's inputs to the last one's goal outputs; each block is fitted up to "
                             "span times and a step costs about span block passes (SmolLM2, 20% of parameters as "
                             "neurons, 100 steps at 1e-3: span 1 45.22, span 2 44.28, span 3 with --recon-patience 10 "
                             "43.72 PPL against 29.19 dense; docs/BENCHMARKS.md).",
                             minimum=1, maximum=8)
    recon_loss: str = option("auto", "Block error to fit: mse of the block outputs, normed: mse of what the next "
                             "reader sees (the next block's input norm, the final norm after the last block), or "
                             "auto: normed for blocks with post-sublayer norms (Gemma), mse otherwise.",
                             choices=LOSSES)
    recon_heldout: int = option(4, "Calibration windows held out of the fit at most (the last eighth of them, at "
                                "least 2): the fit is early-stopped on them and kept only where it lowers the error "
                                "on them (--recon-guard); else the weights from before the fit come back.",
                                minimum=1, maximum=64)
    recon_guard: str = option("auto", "Which fits must also lower the model's next-token loss on the held-out "
                              "windows to be kept (every fit must lower its blocks' error there): model: every fit, "
                              "through the later blocks as they stand (a pass of them per fit); last: the fit of the "
                              "last block; block: none; auto: model for compact blocks (--structure), last for "
                              "masked ones (stories260K, 30% of the neurons, five seeds, PPL over 400 test windows: "
                              "model 153.15-160.09, last 157.00-167.63, none 163.42; see prune.trail).",
                              choices=GUARDS)


@dataclass(frozen=True)
class Recon:
    """A block-level stage after the per-linear ones: ``apply(runner, i, inputs, targets, linears, options, seed)``."""

    name: str
    summary: str
    apply: Callable[..., dict] | None
    options: type[Options] = NoOptions

    def span(self, options: Options) -> int:
        """How many blocks one fit covers (``--recon-span``; 1 without a fit)."""
        return getattr(options, "recon_span", 1) if self.apply is not None else 1

    def dense_stream(self, options: Options) -> bool:
        """Whether the engine must carry the dense model's activations along (targets on dense inputs)."""
        return self.apply is not None and getattr(options, "recon_target", "") == "dense"


def reader(runner: BlockRunner, i: int, device: torch.device) -> nn.Module | None:
    """The norm that reads block ``i``'s output (the next block's ``input_layernorm``, else the final norm), as an
    fp32 copy on ``device``; None when the model has no such module."""
    blocks = runner.layout.blocks
    found = getattr(blocks[i + 1], "input_layernorm", None) if i + 1 < len(blocks) else None
    found = found if found is not None else getattr(runner.model.base_model, "norm", None)
    return None if found is None else copy.deepcopy(found).to(device, torch.float32).requires_grad_(False)


def chained(runner: BlockRunner, first: int, last: int, hidden: torch.Tensor) -> torch.Tensor:
    """Blocks ``first`` .. ``last`` applied to ``hidden`` (autograd follows the caller's mode)."""
    for j in range(first, last + 1):
        hidden = runner.call(j, hidden)
    return hidden


def _loss(runner: BlockRunner, span: tuple[int, int], inputs: torch.Tensor, targets: torch.Tensor,
          norm: nn.Module | None = None) -> torch.Tensor:
    out, goal = chained(runner, *span, inputs).to(torch.float32), targets.to(torch.float32)
    if norm is not None:
        out, goal = norm(out), norm(goal.to(out.device))
    return torch.nn.functional.mse_loss(out, goal)


def heldout_error(runner: BlockRunner, span: tuple[int, int], inputs: torch.Tensor, targets: torch.Tensor,
                  norm: nn.Module | None, held: range, cast: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Mean error of blocks ``span`` over the held-out windows ``held`` (global indices) of all ranks: each rank
    sums the ones it holds and the sums are added, so every rank gets the same number and takes the same
    keep-or-restore decision."""
    total = 0.0
    with torch.no_grad():
        for k in mine(held):
            pick = torch.tensor([k])
            total += float(_loss(runner, span, cast(inputs[pick]), targets[pick], norm))
    return distributed.all_sum_number(total) / max(len(held), 1)


def reconstruct(runner: BlockRunner, i: int, inputs: torch.Tensor, targets: torch.Tensor, linears: list[nn.Linear],
                options: ReconOptions, seed: int = 0, first: int | None = None, trainer: Trainer | None = None) -> dict:
    """Fit the kept weights of ``linears`` (in blocks ``first`` .. ``i``, default block ``i`` alone) so those
    blocks map ``inputs`` (block ``first``'s) to ``targets`` (block ``i``'s goal outputs); keep the fit only if it
    lowers the span's error on the held-out windows (measured on the weights as returned, in the model's dtype),
    else restore every weight of the span: a fit never leaves its blocks worse than it found them. ``trainer``: what
    the fit trains (default the weights under their masks; a quantized run's keeps the weights on their grid)."""
    if not linears:
        return {}
    span = (i if first is None else first, i)
    loss, lr = settled(options, runner.layout.blocks[i])
    norm = reader(runner, i, inputs.device) if loss == "normed" else None
    n = round(distributed.all_sum_number(inputs.shape[0]))  # calibration windows of all ranks
    held = heldout_windows(n, options.recon_heldout)
    saved = [lin.weight.detach().clone() for lin in linears]
    before = heldout_error(runner, span, inputs, targets, norm, held, lambda x: x)
    info = _fit(runner, span, inputs, targets, linears, options, norm, lr, held, n, seed, trainer or plain)
    after = heldout_error(runner, span, inputs, targets, norm, held, lambda x: x)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for lin, w in zip(linears, saved, strict=True):
                lin.weight.copy_(w)
    spanned = {"blocks": list(span)} if span[0] != i else {}
    # before / after: without and with the fit; kept: which of them the blocks were left with
    return {"steps": info["steps"], "kept": kept, "heldout_windows": len(held) if n > 1 else 0,
            "heldout_mse_before": before, "heldout_mse_after": after, "loss": loss, "lr": lr, **spanned}


def _fit(runner: BlockRunner, span: tuple[int, int], inputs: torch.Tensor, targets: torch.Tensor,
         linears: list[nn.Linear], options: ReconOptions, norm: nn.Module | None, lr: float, held: range, n: int,
         seed: int, trainer: Trainer) -> dict:
    """The Adam fit on the windows before ``held`` (all ``n`` when there is one), early-stopped on ``held``; in
    fp32 (a half-precision span is upcast and cast back once at the end)."""
    blocks = [runner.layout.blocks[j] for j in range(span[0], span[1] + 1)]
    home = next(blocks[-1].parameters()).dtype
    upcast = home in (torch.float16, torch.bfloat16)
    cast = (lambda x: x.to(torch.float32)) if upcast else (lambda x: x)
    world = distributed.world()
    share = world.share(n)  # the global windows this rank holds (all of them in one process)
    if upcast:
        for block in blocks:
            block.to(torch.float32)
    try:
        with trainer(linears) as (weights, masks):
            return masked_fit(weights, lambda pick: _loss(runner, span, cast(inputs[pick]), targets[pick], norm),
                              lambda: heldout_error(runner, span, inputs, targets, norm, held, cast),
                              held.start if held.start > 0 else n,
                              FitSettings(options.recon_steps, options.recon_batch, options.recon_patience),
                              lambda weights: (torch.optim.Adam(weights, lr=lr), None),
                              torch.Generator().manual_seed(seed * 1_000_003 + span[1]), masks,
                              share=share if world.active else None)
    finally:
        if upcast:
            for block in blocks:
                block.to(home)


def post_norms(block: nn.Module) -> bool:
    """Whether ``block`` normalises its sublayers' outputs before adding them to the residual stream (Gemma 2/3's
    ``post_feedforward_layernorm``). Such a residual stream grows huge (Gemma-3-270m: the first token's RMS
    reaches ~10⁵ against a median of 10³–10⁴, up to 42% of a window's squared norm in one position), so a plain
    MSE fits little but that one token; and its weights are small (RMS 0.02–0.04 against SmolLM2's median 0.19),
    so a step that suits SmolLM2 moves them by ~10% at once."""
    return getattr(block, "post_feedforward_layernorm", None) is not None


def settled(options: ReconOptions, block: nn.Module) -> tuple[str, float]:
    """(loss, learning rate) of ``block``'s reconstruction: the options, or the defaults of its kind of block."""
    loss, lr = DEFAULTS[post_norms(block)]
    return (loss if options.recon_loss == "auto" else options.recon_loss,
            lr if options.recon_lr is None else options.recon_lr)


def recon_summary(records: Iterable[dict]) -> dict:
    """The phase record's count of the fits the guards kept: ``{"recon": {fits, kept, restored, kept_blocks}}``
    (a span's fit is the record of its last block), or nothing when no block was fitted. ``records``: per-block
    records with ``block`` and, for a fit, ``kept``."""
    fits = [r for r in records if "kept" in r]
    kept = [r["block"] for r in fits if r["kept"]]
    counts = {"fits": len(fits), "kept": len(kept), "restored": len(fits) - len(kept), "kept_blocks": kept}
    return {"recon": counts} if fits else {}


NONE = Recon("none", "no block reconstruction", None)
BLOCK = Recon("block", "Adam re-fit of each pruned block's kept weights to the dense outputs", reconstruct,
              ReconOptions)

RECONS: dict[str, Recon] = by_name(
    NONE,
    BLOCK,
)
