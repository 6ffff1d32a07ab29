"""Recover phase (``--recover distill``): train the pruned model toward the dense one, after pruning, before
evaluating and writing (``recover.distill``).

The teacher is the run's dense source (or ``--recover-teacher``), loaded again into CPU memory: it joins the
student on the device only when both and the training working set fit there, and otherwise streams through the
device block by block for each batch, so it never doubles the device memory a run needs. The training windows
come from the calibration source (sequential, non-overlapping, tokenized before any heavy work); the estimate of
the device memory the training needs is checked before it starts (a one-line error naming the options that
lower it). Masks are checked afterwards: every pruned weight is still zero.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from taylorprune.errors import RunError, UserError
from taylorprune.export import save
from taylorprune.modeling import loading
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.placement import GIB, USABLE, device_budget, model_bytes, training_bytes
from taylorprune.modeling.sweep import forward
from taylorprune.pipeline import sources
from taylorprune.pipeline.state import Phase, RunFacts, RunState
from taylorprune.quantize.train import resync_all, settled
from taylorprune.recover import heldout, windows
from taylorprune.recover.distill import distill
from taylorprune.recover.head_kl import CHUNK
from taylorprune.recover.student import finish, on_its_grid, prepare
from taylorprune.recover.teacher import Teacher, pair, resident


def _stage(plan):
    stage = plan.parts.stage("recover")
    return stage if stage is not None and not stage.off else None


def teacher_source(plan) -> str:
    return _stage(plan).options.recover_teacher or plan.opts.model


def recovery_windows(state: RunState, options) -> tuple[torch.Tensor, torch.Tensor, list[dict] | None]:
    """(training windows, held-out windows, per-source records of a mix) of the calibration sources, sequential
    and non-overlapping (``recover.windows``: every window the source holds by default; a count beyond it is an
    error; a mix's held-out windows come from every source)."""
    tokenizer = state.loaded.tokenizer
    seqlen, bos = options.recover_seqlen or state.plan.seqlen, loading.window_start(state.model.config, tokenizer)
    made = sources.corpora(state)
    if state.opts.calib.calib_mix is not None:
        return windows.mixed_windows(tokenizer, made, options, seqlen, bos)
    return (*windows.recovery_windows(tokenizer, made[0][1], options, seqlen, bos), None)


def _trained_numel(model: nn.Module, layout, options) -> int:
    if options.recover_weights == "lora":
        r = options.recover_lora_rank
        return sum(r * (t.module.in_features + t.module.out_features) for t in layout.all_targets)
    return sum(p.numel() for p in layout.blocks.parameters())


def _check_memory(state: RunState, options, teacher_bytes: int) -> dict:
    """The device memory training needs (estimate), against the budget; a one-line error when it cannot fit."""
    plan, model = state.plan, state.model
    fp32 = model_bytes(model) * 4 // next(model.parameters()).element_size()
    need = training_bytes(model.config, fp32, _trained_numel(model, state.layout, options), options.recover_batch,
                          options.recover_seqlen or plan.seqlen, options.recover_checkpoint, teacher_bytes, CHUNK)
    budget = device_budget(plan.device, state.opts.placement.max_gpu_memory)
    if budget is not None and need > USABLE * budget:
        raise UserError(f"recovery needs about {need / GIB:.2f} GiB on {plan.device} ({USABLE:.0%} of "
                        f"{budget / GIB:.2f} GiB is usable); lower --recover-batch or --recover-seqlen, or use "
                        "--recover-checkpoint or --recover-weights lora")
    return {"estimate_gib": round(need / GIB, 3), "budget_gib": None if budget is None else round(budget / GIB, 3)}


def _teacher(state: RunState, options) -> tuple[Teacher, str, nn.Module]:
    """The teacher: resident beside the student when both fit (its final hidden states then cached for a
    window's second visit, ``recover.teacher``), streamed block by block otherwise."""
    plan, lo = state.plan, state.opts.load
    source = teacher_source(plan)
    model = loading.load(source, lo.dtype, None, None, lo.trust_remote_code,
                         config=plan.config if source == plan.opts.model else None).model
    hidden = options.recover_hidden > 0
    student = model_bytes(state.model) * 4 // next(state.model.parameters()).element_size()
    budget = device_budget(plan.device, state.opts.placement.max_gpu_memory)
    fits = budget is None or student + model_bytes(model) <= USABLE * budget
    if fits:
        model.to(plan.device)
        return resident(model, hidden), "resident", model
    runner = BlockRunner(model, find_layout(model), plan.device, state.opts.calib.batch_size, stream=True)

    def streamed(ids: torch.Tensor):
        last = forward(runner, runner.capture(ids), write=False)
        with runner.outside_on_device(head=True):
            out = runner.head(ids, last, output_hidden_states=hidden)
        return pair(out, hidden)

    return Teacher(streamed), "stream", model


def _quant_train(plan) -> str | None:
    """The quantized run's ``--quant-train`` (None without ``--quantize``)."""
    stage = plan.parts.stage("quantize")
    return None if stage is None or stage.off else settled(stage.options.quant_train, "recover")


def _check_masks(state: RunState, before: dict[str, int]) -> None:
    """Every pruned weight is still 0: a quantized linear's by its mask (a kept weight rounded to 0 may move off
    it), the others by their count of zeros."""
    for t in state.layout.all_targets:
        q = state.quantized.get(t.path)
        if q is not None:
            if q.keep is not None and bool((t.module.weight.detach().cpu()[~q.keep] != 0).any()):
                raise RunError(f"recovery moved a pruned weight of {t.path} off 0")
            continue
        zeros = int((t.module.weight == 0).sum())
        if zeros < before[t.path]:
            raise RunError(f"recovery changed the mask of {t.path} ({before[t.path]} zeros before, {zeros} after)")


class Recover(Phase):
    name = "recover"

    def wanted(self, facts: RunFacts) -> bool:
        """``--recover distill`` (after a run's pruning, or alone in ``taylorprune recover``)."""
        return facts.recovers

    def check(self, plan) -> None:
        if _quant_train(plan) and _stage(plan).options.recover_weights == "lora":
            raise UserError("--recover-weights lora cannot keep a quantized model on its grid (merged adapters "
                            "are dense updates); use --recover-weights all with --quantize")
        source = teacher_source(plan)
        if source != plan.opts.model:
            config = loading.load_config(source, plan.opts.load.trust_remote_code)
            if getattr(config, "vocab_size", None) != getattr(plan.config, "vocab_size", None):
                raise UserError(f"--recover-teacher {source}: its vocabulary ({config.vocab_size}) is not the "
                                f"student's ({plan.config.vocab_size}); distillation compares the two per token")

    def prepare(self, state: RunState) -> None:
        state.prepared["recover"] = recovery_windows(state, _stage(state.plan).options)

    def run(self, state: RunState) -> dict:
        plan, hooks = state.plan, state.hooks
        stage = _stage(plan)
        options = stage.options
        train, held, per_source = state.prepared["recover"]
        if state.placement is not None and state.placement.stream:
            raise UserError("recovery trains the whole student on the device, and it does not fit there "
                            f"({state.placement.reason}); use --recover-weights lora, or a device with more memory")
        with hooks.timed(state.phases_s, "recover", f"recovering by {stage.name} ({options.recover_steps} steps)"):
            teacher, where, teacher_model = _teacher(state, options)
            memory = _check_memory(state, options, model_bytes(teacher_model) if where == "resident" and
                                   plan.device.type != "cpu" else 0)
            before = {t.path: int((t.module.weight == 0).sum()) for t in state.layout.all_targets}
            state.model.to(plan.device)
            prepared = prepare(state.model, state.layout, options)
            tick = hooks.task("recovery steps", options.recover_steps)
            mode = _quant_train(plan) or (settled("auto", "recover") if state.quantized else None)  # a packed --model
            try:
                if per_source is not None:  # each source's held-out KL, before and after (``recover.heldout``)
                    kl_before = heldout.per_source(prepared.student.model, teacher, held, per_source,
                                                   options.recover_temperature, plan.device)
                with on_its_grid(prepared, state.layout, state.quantized, mode) if mode else nullcontext():
                    record, measure = distill(prepared.student, teacher, train, held, options, plan.device,
                                              plan.opts.calib.seed, on_step=lambda s: tick(s - 1))
                state.loaded.model = finish(prepared, prepared.student.model, state.layout)
                if prepared.peft is not None:
                    record["kl_after_merged"] = measure()
                if mode == "round":  # the fit's kl_after is of the float weights; this of the rounded ones
                    record["kl_after_rounded"] = measure()
                if per_source is not None:
                    kl_after = heldout.per_source(state.model, teacher, held, per_source, options.recover_temperature,
                                                  plan.device)
                    record["sources"] = [{**r, "kl_before": kl_before[r["source"]], "kl_after": kl_after[r["source"]]}
                                         for r in per_source]
            finally:
                del teacher_model
        if mode:  # the writer's codes (or scales) follow the trained weights, checked exact
            record["on_grid"] = {"quant_train": mode, **resync_all(state.quantized, {
                t.path: t.module for t in state.layout.all_targets if t.path in state.quantized})}
        if "generated" in state.prepared:  # how the teacher-written text was made
            record["generated"] = state.prepared["generated"]
        _check_masks(state, before)
        for lin in state.linears:  # the same masks; the records follow the weights as they are now
            weight = state.model.get_submodule(lin["name"]).weight
            lin["zeros"] = int((weight == 0).sum())
            lin["sparsity"] = lin["zeros"] / weight.numel()
        windows_tokens = len(train) * train.shape[1]
        used = {"recover_windows": len(train) + len(held)}  # the number taken, the default (none: all) resolved
        return {"method": stage.name, **options.as_dict(), **used, "teacher": teacher_source(plan),
                "teacher_placement": where,
                **record, "passes": record["tokens_seen"] / windows_tokens, "memory": memory,
                "peak_memory_mib": save.peak_memory()}
