"""Recovery by distillation from the dense model (``--recover distill``), after any pruning, before writing.

The pruned model (student) is trained toward the dense model (teacher) on text from the calibration source: the loss
is the forward KL(teacher ‖ student) of the next-token distributions at temperature T (× T², so gradients keep their
scale), over every position of every window (made a chunk of positions at a time from the final hidden states,
``recover.head_kl``, where the head allows it), plus optionally ``--recover-hidden`` × the MSE of the last hidden
states (normalised by the teacher's). The targets are the teacher's distributions, never the text's labels, so what
is learnt is the dense model's behaviour, not the calibration domain. Masks stay exact and compact shapes stay
compact: the loop is ``prune.fit`` (a pruned weight's gradient is zeroed, the mask re-applied after every step).
Batches walk seeded shuffles of the training windows (``--recover-sampling epoch``: with a budget of two passes
every window is seen twice, where independent draws would leave ~14% of them unseen). AdamW with linear warm-up and
cosine decay to a tenth, gradient clipping, seeded batches, held-out windows (the last ``--recover-heldout``) for
early stopping and for the reported KL before and after. The teacher's targets of a training window seen before come
from its cached final hidden states (``recover.teacher``). In a data-parallel run every rank draws the same global
batches, computes the windows of its share and the gradients are summed over the ranks (``prune.fit``); the held-out
windows are shared out and their losses summed. ``--recover-weights all`` trains every parameter of the decoder
blocks (embeddings and head stay, tied or not); ``lora`` trains peft LoRA adapters on the blocks' linears and merges
them at the end, re-applying each masked linear's mask to the merged weight (the held-out KL after is measured on
the merged, masked model).

Precision: a half-precision student trains in fp32 (master weights; cast back once at the end), under bf16
autocast on a GPU.

Speed: a step is the student's forward and backward and, on a window's first visit, the teacher's forward; the
rest is kept off it: held-out windows are evaluated a batch at a time without the loss's gradient, the head checks
run on a few positions, masks are applied in one foreach call, on a CPU training runs at the faster of torch's
threads and one (``recover.pace``), and student and teacher run causal attention in blocks of queries
(``modeling.attention``: on small models the step is mostly attention, whose CPU backward is slow at these
lengths). The record gives steps/s and tokens/s beside a plain forward's tokens/s of the student (its own
attention) on a batch of the same shape, timed in the same process (stories260K, 4 × 512 tokens, 2 CPU cores:
0.35 steps/s before these changes; docs/bench_recover_speed.md has the ratios with and without blocked attention).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taylorprune import distributed
from taylorprune.modeling.attention import blocked
from taylorprune.options import Options, option
from taylorprune.prune.fit import FitSettings, masked_fit
from taylorprune.recover import pace
from taylorprune.recover.head_kl import Targets, head_kl, head_matches, lm_head
from taylorprune.recover.teacher import CHECK, TargetCache, Teacher, model_outputs

WEIGHTS = ("all", "lora")
SAMPLING = ("epoch", "random")


@dataclass(frozen=True)
class RecoverOptions(Options):
    recover_steps: int = option(260, "Recovery: optimiser steps at most.", minimum=1, maximum=1_000_000)
    recover_lr: float = option(5e-4, "Recovery: AdamW peak learning rate.", above=0)
    recover_batch: int = option(4, "Recovery: windows per step.", minimum=1)
    recover_windows: int | None = option(None, "Recovery: windows of the calibration source to train on "
                                         "(sequential, non-overlapping; the last --recover-heldout of them are held "
                                         "out; default: every window the source holds, at most steps x batch + "
                                         "held-out; more than it holds is an error).", minimum=2)
    recover_seqlen: int | None = option(None, "Recovery: tokens per window (default: the calibration --seqlen).",
                                        minimum=2)
    recover_heldout: int = option(8, "Recovery: windows held out for early stopping and the reported KL (fewer "
                                  "than the windows; more is an error).", minimum=1)
    recover_temperature: float = option(1.0, "Recovery: temperature of both distributions in the KL.", above=0)
    recover_hidden: float = option(0.0, "Recovery: weight of the last-hidden-state MSE beside the KL (0: off).",
                                   minimum=0)
    recover_weights: str = option("all", "Recovery: all (every decoder-block parameter) or lora (peft adapters on "
                                  "the blocks' linears, merged at the end).", choices=WEIGHTS,
                                  memory_hint="--recover-weights lora")
    recover_lora_rank: int = option(16, "Recovery: LoRA rank (alpha = 2 × rank).", minimum=1)
    recover_warmup: float = option(0.05, "Recovery: fraction of the steps spent warming the learning rate up.",
                                   minimum=0, below=1)
    recover_sampling: str = option("epoch", "Recovery: epoch (every training window once before any twice, seeded "
                                   "shuffles) or random (each step's windows drawn afresh).", choices=SAMPLING)
    recover_eval_every: int = option(25, "Recovery: steps between held-out evaluations.", minimum=1)
    recover_patience: int = option(4, "Recovery: held-out evaluations without improvement before stopping.",
                                   minimum=1)
    recover_clip: float = option(1.0, "Recovery: gradient-norm clipping (0: off).", minimum=0)
    recover_checkpoint: bool = option(False, "Recovery: gradient checkpointing of the student's blocks.",
                                         identity=False, memory_hint="--recover-checkpoint")
    recover_teacher: str | None = option(None, "Recovery: the teacher (folder, hub id, .gguf; default: the run's "
                                         "--model, the dense source).")


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per position at ``temperature``, mean over positions, × T² (fp32).

    The teacher's log-probabilities take no graph and ``kl_div`` fuses exp(t)·(t − s) and its sum: on SmolLM2's
    49k-token vocabulary this is ~3× faster than the element-wise formula, which cost as much as the backward."""
    s, t = student.float(), teacher.float()
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    with torch.no_grad():
        t = F.log_softmax(t, dim=-1)
    s = F.log_softmax(s, dim=-1)
    return F.kl_div(s, t, reduction="sum", log_target=True) / (s.numel() // s.shape[-1]) * temperature**2


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE of the last hidden states, relative to the teacher's mean square (scale-free)."""
    t = teacher.to(student.device).float()
    return F.mse_loss(student.float(), t) / t.pow(2).mean().clamp_min(1e-12)


def schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` of the steps, then cosine decay to 0.1."""
    ramp = max(1, int(round(warmup * steps)))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        progress = (step - ramp) / max(1, steps - ramp)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class Student:
    """The model being recovered and what trains in it: the parameters and their masks (None: free)."""

    model: nn.Module
    params: list[nn.Parameter]
    masks: list[torch.Tensor | None]


def _held(outputs: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[Targets, torch.Tensor | None]:
    """Held-out windows' targets, kept in CPU memory (on a 128k vocabulary, 8 windows of 2k tokens are 8 GiB of
    logits); the loss moves what it reads to the device."""
    logits, last = outputs
    return Targets(logits.cpu()), None if last is None else last.cpu()


def _chunked(student: Student, ids: torch.Tensor) -> bool:
    """Whether the loss can be made from the final hidden states in chunks (``head_kl``): the head is not trained
    and gives the model's own logits (checked on a few positions: the check is about the head, not the text)."""
    head = student.model.get_output_embeddings().weight
    return all(p is not head for p in student.params) and head_matches(student.model, ids[:, :CHECK])


class _Losses:
    """The training and held-out losses of one recovery. Held-out windows go through the student a batch at a
    time, without the chunked loss's gradient (an evaluation needs the value only)."""

    def __init__(self, student: Student, teacher: Teacher, train: torch.Tensor, held: torch.Tensor,
                 options: RecoverOptions, device: torch.device, share: range | None) -> None:
        self.model, self.options, self.device, self.share = student.model, options, device, share
        self.train, self.held, self.hidden = train, held, options.recover_hidden > 0
        mine = distributed.world().share(len(held))  # the held-out windows this rank measures (all, in one process)
        step = options.recover_batch
        self.groups = [range(k, min(k + step, mine.stop)) for k in range(mine.start, mine.stop, step)]
        with torch.no_grad():
            self.held_targets = [_held(teacher.outputs(self._ids(held, g))) for g in self.groups]
        self.cache = TargetCache(teacher, len(train) if share is None else len(share),
                                 train.shape[1] * self.model.config.hidden_size * 4, self.hidden)  # fp32: a bound
        self.chunked = _chunked(student, train[:1].to(device))
        self.head = lm_head(self.model)

    def _ids(self, windows: torch.Tensor, group: range) -> torch.Tensor:
        return windows[group.start:group.stop].to(self.device, non_blocking=True)

    def loss(self, ids: torch.Tensor, target: tuple[Targets, torch.Tensor | None]) -> torch.Tensor:
        temperature = self.options.recover_temperature
        with pace.autocast(self.device):
            if self.chunked:
                last = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                value = head_kl(last, self.head, target[0], temperature)
            else:
                logits, last = model_outputs(self.model, ids, self.hidden)
                value = kl_loss(logits, target[0].logits().to(logits.device), temperature)
        if self.hidden:
            value = value + self.options.recover_hidden * hidden_loss(last, target[1])
        return value

    def train_loss(self, pick: torch.Tensor) -> torch.Tensor:
        index = pick if self.share is None else pick + self.share.start
        ids = self.train[index].to(self.device, non_blocking=True)
        with torch.no_grad():
            target = self.cache(ids, index.tolist())
        return self.loss(ids, target)

    def heldout(self) -> float:
        """Mean held-out loss over the windows (every window has the same positions)."""
        with torch.no_grad():
            total = sum(self.loss(self._ids(self.held, g), t) * len(g)
                        for g, t in zip(self.groups, self.held_targets, strict=True))
        return distributed.all_sum_number(float(total)) / len(self.held)


def _optimizer(options: RecoverOptions):
    def make(params):
        # the fused kernel: the default per-tensor loop took 4.13 s a step on 80M fp32 weights, fused 0.10 s (CPU)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        opt = torch.optim.AdamW(params, lr=options.recover_lr, weight_decay=0.0, fused=fused)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule(options.recover_steps, options.recover_warmup))

    return make


def distill(student: Student, teacher: Teacher, train: torch.Tensor, held: torch.Tensor, options: RecoverOptions,
            device: torch.device, seed: int, on_step: Callable[[int], None] | None = None
            ) -> tuple[dict, Callable[[], float]]:
    """Train ``student`` toward ``teacher`` on windows ``train``; returns the record and a function measuring the
    held-out loss on ``held`` again (after adapters are merged). A plain forward of one batch is timed before
    training and beside each held-out evaluation, at the threads training runs with (``recover.pace``), for the
    record's speed ratio; those forwards are not counted in the training's seconds."""
    world = distributed.world()
    share = world.share(len(train)) if world.active else None  # the training windows this rank computes
    batch = min(options.recover_batch, len(train))
    ids = train[:batch].to(device)
    forward, probe = pace.plain_forward(student.model, ids), pace.plain_forward(student.model, ids[:1])
    settings = FitSettings(options.recover_steps, options.recover_batch, options.recover_patience,
                           options.recover_eval_every, options.recover_clip or None,
                           epochs=options.recover_sampling == "epoch")
    with pace.threads(forward, probe, device) as clock, contextlib.ExitStack() as attention:
        for model in (student.model, teacher.model):  # blocked attention on a CPU (``modeling.attention``)
            if model is not None:
                attention.enter_context(blocked(model, device))
        t0 = time.perf_counter()
        losses = _Losses(student, teacher, train, held, options, device, share)

        def step_done(step: int) -> None:
            if on_step is not None:
                on_step(step)
            if step % options.recover_eval_every == 0:  # a forward timed beside each held-out evaluation
                clock.sample()

        info = masked_fit(student.params, losses.train_loss, losses.heldout, len(train), settings,
                          _optimizer(options), torch.Generator().manual_seed(seed * 1_000_003 + 7), student.masks,
                          step_done, share)
        for p in student.params:  # data-parallel ranks keep rank 0's weights (they took identical steps)
            distributed.sync(p.data)
        tokens = info["steps"] * batch * train.shape[1]
        speed = clock.record(time.perf_counter() - t0, info["steps"], tokens, batch * train.shape[1])
    record = {"steps": info["steps"], "tokens_seen": tokens, **speed,
              "kl_before": info["heldout_before"], "kl_after": info["heldout_after"], "heldout_windows": len(held),
              "train_windows": len(train), "seqlen": train.shape[1],
              "kl_curve": [[step, round(kl, 6)] for step, kl in info["heldout_curve"]],
              "teacher_cache": losses.cache.record(), "loss": "chunked" if losses.chunked else "whole"}
    return record, losses.heldout
