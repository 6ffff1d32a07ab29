"""The stream around block fits (``--recon block``): the inputs a fit spanning several blocks starts from, the
re-run of the stream through the blocks it changed, and the model-level guard that undoes a fit the model's
held-out next-token loss does not favour.

Why a model-level guard: a fit can lower its blocks' error against the dense targets on held-out windows and
still raise the model's perplexity. On stories260K (neurons 30%, Wanda, 16 × 128 sequential wikitext2-valid
windows) the last block's fit lowered its MSE by 3.7% and the KL to the dense model's logits by 1.5% on fresh
calibration windows while their next-token loss rose by 0.034 nats; keeping that fit alone gave 143.15 against
139.76 over 200 test windows. The guard runs the held-out windows from the fitted blocks' inputs through the rest
of the model as it stands (later blocks not yet pruned) and its head, with and without the fit.

Which fits it checks (``--recon-guard``): ``model``, every fit; ``last``, only the fit ending at the last block,
whose check is exact (only the head follows) and costs no pass of later blocks; ``auto`` (the default), ``model``
for compact blocks (``--structure``) and ``last`` for masked ones. Measured on stories260K, 16 windows, PPL over
400 test windows: 30% of the neurons, sequential windows, five seeds, none 163.42, ``model`` 153.15–160.09
(every seed better), ``last`` 157.00–167.63, block error alone 157.88–167.63. For masked blocks the check through
later blocks misjudges fits that the later fits build on: SparseGPT 50%'s block-0 fit (random windows) lowered
that block's error by 69% and raised the loss through the dense later blocks by 0.056 nats, yet restoring it made
the final model worse; ``model`` against ``last``: SparseGPT 154.17 / 149.60 (random windows), Wanda 152.01 /
146.23 (sequential).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.modeling.blocks import BlockRunner

GUARDS = ("auto", "model", "last", "block")


def heldout_windows(n: int, most: int) -> range:
    """The global calibration windows held out of a fit: the last eighth, two to ``most`` of them, at least one
    left to train on. One window is too few to judge a fit by; a quarter of 16 windows took training data enough
    to cost SparseGPT 50% + recon 155.27 against 149.60 PPL. With a single window it is the training one too."""
    return range(n - min(most, max(2, n // 8), n - 1), n) if n > 1 else range(n)


def mine(held: range) -> list[int]:
    """This rank's positions of the held-out windows it holds (all of them in one process)."""
    share = distributed.world().share(held.stop)  # the held-out windows end with the last one
    return [g - share.start for g in held if g in share]


class Trail:
    """The pruned stream's inputs of the last blocks visited, for fits that span several blocks (``--recon-span``),
    and the model-level guard of the fits.

    A fit over blocks ``first`` .. ``i`` starts from block ``first``'s inputs and changes all of those blocks, so
    the stream is re-run from there afterwards: the inputs kept for the next fit and block ``i``'s output (what
    the sweep carries on) are then those of the changed blocks — of the restored ones when the guard undid the
    fit. Span 1 keeps nothing and re-runs nothing. ``ids``: this rank's calibration windows, whose next tokens the
    guard scores (None: no model-level guard); ``heldout``: at most this many windows held out (the fit's own);
    ``last_only``: the guard checks only the fit that ends at the last block.
    """

    def __init__(self, runner: BlockRunner, span: int, ids: torch.Tensor | None = None, heldout: int = 4,
                 last_only: bool = False) -> None:
        self.runner, self.span, self.inputs = runner, span, {}
        self.ids, self.heldout, self.last_only = ids, heldout, last_only

    @classmethod
    def of(cls, runner: BlockRunner, stages: Sequence, ids: torch.Tensor | None, compact: bool = False) -> Trail:
        """The trail block stages ``stages`` need: their longest span, and the model-level guard their
        ``--recon-guard`` asks for (``last``: of the fit ending at the last block; ``model``: of every fit;
        ``auto``: ``model`` when the blocks are ``compact``, else ``last``)."""
        span = max((s.choice.span(s.options) for s in stages), default=1)
        guards = {getattr(s.options, "recon_guard", "block") for s in stages}
        guards = {("model" if compact else "last") if g == "auto" else g for g in guards} - {"block"}
        heldout = max((getattr(s.options, "recon_heldout", 1) for s in stages), default=1)
        return cls(runner, span, ids if guards else None, heldout, "model" not in guards)

    def first(self, i: int) -> int:
        return max(0, i - self.span + 1)

    def add(self, i: int, inputs: torch.Tensor) -> None:
        if self.span > 1:
            self.inputs = {j: h for j, h in self.inputs.items() if j >= self.first(i)} | {i: inputs}

    @contextlib.contextmanager
    def held(self, i: int) -> Iterator[None]:
        """Blocks ``first`` .. ``i - 1`` on the compute device too (block ``i`` is there already), written back."""
        with contextlib.ExitStack() as stack:
            for j in range(self.first(i), i):
                stack.enter_context(self.runner.on_device(j, write=True, prefetch=None))
            yield

    def fit(self, i: int, inputs: torch.Tensor, apply: Callable[[int, torch.Tensor, list[nn.Linear]], dict],
            linears_of: Callable[[int], list[nn.Linear]]) -> tuple[dict, torch.Tensor | None]:
        """``apply(first, first's inputs, linears of blocks first..i)``, the model-level guard, then the stream
        re-run; returns the report and block ``i``'s new output (None when only block ``i`` was fitted: the sweep
        runs it)."""
        first = self.first(i)
        start = inputs if first == i else self.inputs[first]
        linears = [lin for j in range(first, i + 1) for lin in linears_of(j)]
        with self.held(i):
            info = self._guarded(i, first, start, linears, apply)
            if self.span == 1:
                return info, None
            for j in range(first, i + 1):
                distributed.sync_module(self.runner.layout.blocks[j])
            hidden = start
            for j in range(first, i):
                hidden = self.runner.run(j, hidden)
                self.inputs[j + 1] = hidden
            return info, (self.runner.run(i, hidden) if first < i else None)

    def _guarded(self, i: int, first: int, start: torch.Tensor, linears: list[nn.Linear],
                 apply: Callable[[int, torch.Tensor, list[nn.Linear]], dict]) -> dict:
        """The fit, undone for the whole span when the model's held-out loss is not lower with it. Every rank
        decides on the same summed losses, so all of them keep or restore alike."""
        if self.ids is None or not linears or (self.last_only and i + 1 < len(self.runner.layout.blocks)):
            return apply(first, start, linears)
        saved = [lin.weight.detach().clone() for lin in linears]
        before = self.token_losses(i, first, start)
        info = apply(first, start, linears)
        if not info.get("kept"):
            return info
        verdict = gain(before, self.token_losses(i, first, start))
        info = {**info, **verdict, "kept": verdict["heldout_loss_gain"] > 0}
        if not info["kept"]:
            with torch.no_grad():
                for lin, w in zip(linears, saved, strict=True):
                    lin.weight.copy_(w)
        return info

    @torch.no_grad()
    def token_losses(self, i: int, first: int, start: torch.Tensor) -> torch.Tensor:
        """The model's next-token losses (fp32, CPU) on this rank's held-out windows, from block ``first``'s inputs
        ``start`` through blocks ``first`` .. ``i`` (on the device already), the later ones (brought there
        read-only) and the head."""
        picks = mine(heldout_windows(round(distributed.all_sum_number(start.shape[0])), self.heldout))
        losses = []
        if picks:
            hidden = start[picks]
            for j in range(first, len(self.runner.layout.blocks)):
                with self.runner.on_device(j, write=False) if j > i else contextlib.nullcontext():
                    hidden = self.runner.run(j, hidden)
            with self.runner.outside_on_device(head=True):
                for k, g in enumerate(picks):
                    ids = self.ids[g:g + 1]
                    logits = self.runner.head(ids, hidden[k:k + 1]).logits[0, :-1].float()
                    losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device),
                                                                    reduction="none").cpu())
        return torch.cat(losses) if losses else torch.zeros(0)


def gain(before: torch.Tensor, after: torch.Tensor) -> dict:
    """Mean held-out next-token loss without and with a fit, and the fit's gain (before − after, per token) with
    its standard error, all summed over the ranks."""
    d = (before - after).double()
    n, s1, s2, b = (distributed.all_sum_number(float(x)) for x in (d.numel(), d.sum(), (d * d).sum(), before.sum()))
    mean = s1 / max(n, 1)
    se = (max(s2 / max(n, 1) - mean * mean, 0.0) / max(n, 1)) ** 0.5
    return {"heldout_loss_before": b / max(n, 1), "heldout_loss_after": (b - s1) / max(n, 1),
            "heldout_loss_gain": mean, "heldout_loss_gain_se": se}
