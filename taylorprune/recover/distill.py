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
from taylorprune.options import Options, option
from taylorprune.prune.fit import FitSettings, masked_fit
from taylorprune.recover.head_kl import Targets, head_kl, head_matches, lm_head
from taylorprune.recover.teacher import TargetCache, Teacher, model_outputs

WEIGHTS = ("all", "lora")
SAMPLING = ("epoch", "random")


@dataclass(frozen=True)
class RecoverOptions(Options):
    recover_steps: int = option(200, "Recovery: optimiser steps at most.", minimum=1, maximum=1_000_000)
    recover_lr: float = option(1e-4, "Recovery: AdamW peak learning rate.", above=0)
    recover_batch: int = option(4, "Recovery: windows per step.", minimum=1)
    recover_windows: int = option(256, "Recovery: windows of the calibration source to train on (sequential, "
                                  "non-overlapping; the last --recover-heldout of them are held out).", minimum=2)
    recover_seqlen: int | None = option(None, "Recovery: tokens per window (default: the calibration --seqlen).",
                                        minimum=2)
    recover_heldout: int = option(8, "Recovery: windows held out for early stopping and the reported KL.",
                                  minimum=1)
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
    """A held-out window's targets, kept in CPU memory (on a 128k vocabulary, 8 windows of 2k tokens are 8 GiB of
    logits); the loss moves what it reads to the device."""
    logits, last = outputs
    return Targets(logits.cpu()), None if last is None else last.cpu()


def _chunked(student: Student, ids: torch.Tensor) -> bool:
    """Whether the loss can be made from the final hidden states in chunks (``head_kl``): the head is not trained
    and gives the model's own logits."""
    head = student.model.get_output_embeddings().weight
    return all(p is not head for p in student.params) and head_matches(student.model, ids)


def distill(student: Student, teacher: Teacher, train: torch.Tensor, held: torch.Tensor, options: RecoverOptions,
            device: torch.device, seed: int, on_step: Callable[[int], None] | None = None
            ) -> tuple[dict, Callable[[], float]]:
    """Train ``student`` toward ``teacher`` on windows ``train``; returns the record and a function measuring the
    held-out loss on ``held`` again (after adapters are merged)."""
    model, hidden = student.model, options.recover_hidden > 0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    world = distributed.world()
    share = world.share(len(train)) if world.active else None  # the training windows this rank computes
    mine = world.share(len(held))  # the held-out windows this rank measures (all of them in one process)
    with torch.no_grad():
        held_targets = [_held(teacher.outputs(held[k][None].to(device))) for k in mine]
    cache = TargetCache(teacher, len(train) if share is None else len(share),
                        train.shape[1] * model.config.hidden_size * 4, hidden)  # fp32 states: an upper bound

    chunked = _chunked(student, train[:1].to(device))
    head = lm_head(model)

    def loss(ids: torch.Tensor, target: tuple[Targets, torch.Tensor | None]) -> torch.Tensor:
        with autocast:
            if chunked:
                last = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                value = head_kl(last, head, target[0], options.recover_temperature)
            else:
                logits, last = model_outputs(model, ids, hidden)
                value = kl_loss(logits, target[0].logits().to(logits.device), options.recover_temperature)
        if hidden:
            value = value + options.recover_hidden * hidden_loss(last, target[1])
        return value

    def train_loss(pick: torch.Tensor) -> torch.Tensor:
        index = pick if share is None else pick + share.start
        ids = train[index].to(device)
        with torch.no_grad():
            target = cache(ids, index.tolist())
        return loss(ids, target)

    def heldout() -> float:
        total = sum(float(loss(held[k][None].to(device), t)) for k, t in zip(mine, held_targets, strict=True))
        return distributed.all_sum_number(total) / len(held)

    def optimizer(params):
        # the fused kernel: the default per-tensor loop took 4.13 s a step on 80M fp32 weights, fused 0.10 s (CPU)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        opt = torch.optim.AdamW(params, lr=options.recover_lr, weight_decay=0.0, fused=fused)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule(options.recover_steps, options.recover_warmup))

    settings = FitSettings(options.recover_steps, options.recover_batch, options.recover_patience,
                           options.recover_eval_every, options.recover_clip or None,
                           epochs=options.recover_sampling == "epoch")
    t0 = time.perf_counter()
    info = masked_fit(student.params, train_loss, heldout, len(train), settings, optimizer,
                      torch.Generator().manual_seed(seed * 1_000_003 + 7), student.masks, on_step, share)
    for p in student.params:  # data-parallel ranks keep rank 0's weights (they took identical steps)
        distributed.sync(p.data)
    seconds = time.perf_counter() - t0
    tokens = info["steps"] * min(options.recover_batch, len(train)) * train.shape[1]
    record = {"steps": info["steps"], "tokens_seen": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "kl_before": info["heldout_before"], "kl_after": info["heldout_after"], "heldout_windows": len(held),
              "train_windows": len(train), "seqlen": train.shape[1],
              "kl_curve": [[step, round(kl, 6)] for step, kl in info["heldout_curve"]],
              "teacher_cache": cache.record(), "loss": "chunked" if chunked else "whole"}
    return record, lambda: heldout_now(heldout)


def heldout_now(heldout: Callable[[], float]) -> float:
    with torch.no_grad():
        return heldout()
