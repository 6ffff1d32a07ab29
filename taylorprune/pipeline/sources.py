"""The calibration sources of a run as corpora: named sets, files, the dense model's own text (``generated``),
one of them or a mix (``--calib-mix``), made once per run and shared by calibration and recovery.

Generated text is written by the teacher: the run's dense ``--model`` (at calibration, before any pruning), or
``--recover-teacher`` when given (``taylorprune recover``, whose ``--model`` is already pruned), loaded for the
sampling and dropped after. It is sampled on the run's device when the model is resident there; a model that only
streams through the device would decode token by token from CPU memory, which is refused with a line naming
``taylorprune generate`` (run where the model fits; its cache file is then read with ``--gen-cache``).
"""

from __future__ import annotations

import torch

from taylorprune.calib import generate, mix, sampling, text
from taylorprune.calib.text import GENERATED, Corpus
from taylorprune.errors import UserError
from taylorprune.modeling import loading
from taylorprune.modeling.placement import USABLE, device_budget, model_bytes
from taylorprune.pipeline.state import Plan, RunState


def generator_source(plan: Plan) -> str:
    """The model generated text comes from: the recovery teacher when one is named, else the run's model."""
    stage = plan.parts.stage("recover")
    teacher = stage.options.recover_teacher if stage is not None and not stage.off else None
    return teacher or plan.opts.model


def _generated_count(plan: Plan) -> int:
    """Default sequences: the windows the calibration takes from the generated source (its share of a mix)."""
    calib = plan.opts.calib
    entries = calib.entries()
    counts = mix.proportional(calib.nsamples, [e.weight for e in entries])
    return max(2, next(c for e, c in zip(entries, counts, strict=True) if e.source == GENERATED))


def uses_generated(plan: Plan) -> bool:
    return any(e.source == GENERATED for e in plan.opts.calib.entries())


def sampler(plan: Plan, config=None) -> generate.Sampler:
    """The run's generation settings (checked: length within the model's positions, prompts readable)."""
    source = generator_source(plan)
    if config is None:
        config = plan.config if source == plan.opts.model else loading.load_config(
            source, plan.opts.load.trust_remote_code)
    return generate.sampler(plan.opts.generate, plan.opts.calib.seed, _generated_count(plan), plan.seqlen, config)


def check(plan: Plan) -> None:
    """What can be checked of the sources before any weight is loaded."""
    if uses_generated(plan):
        sampler(plan)


def _generator(state: RunState) -> tuple[torch.nn.Module, object, bool]:
    """(model, tokenizer, loaded here) to sample from, on the device where it can decode."""
    plan = state.plan
    source = generator_source(plan)
    if source == plan.opts.model:
        if state.placement is not None and state.placement.stream and plan.device.type != "cpu":
            raise UserError(f"--calib generated samples from the model on {plan.device}, where it does not fit "
                            f"({state.placement.reason}); run `taylorprune generate --model {source} --gen-cache F "
                            "...` where it fits, then give --gen-cache F")
        return state.model, state.loaded.tokenizer, False
    lo = plan.opts.load
    loaded = loading.load(source, lo.dtype, None, None, lo.trust_remote_code)
    budget = device_budget(plan.device, plan.opts.placement.max_gpu_memory)
    if budget is not None and model_bytes(loaded.model) > USABLE * budget:
        raise UserError(f"--calib generated samples from {source}, which does not fit on {plan.device}; run "
                        f"`taylorprune generate --model {source} --gen-cache F ...` where it fits, then give "
                        "--gen-cache F")
    return loaded.model.to(plan.device), loaded.tokenizer, True


def _generated(state: RunState) -> Corpus:
    plan, hooks = state.plan, state.hooks
    model, tokenizer, own = _generator(state)
    s = sampler(plan, model.config)
    tick = hooks.task("generating calibration tokens", generate.sampled_tokens(tokenizer, s))
    with hooks.timed(state.phases_s, "calibration_data.generate", f"generating {s.sequences} sequences of {s.length} "
                     f"tokens from {generator_source(plan)}"):
        corpus, record = generate.generated_corpus(model, tokenizer, s, plan.opts.generate.gen_cache,
                                                   generator_source(plan), lambda n: tick(n - 1))
    if own:
        del model
    if record["reused"]:
        hooks.events.append(f"generated calibration text reused from {record['cache']}")
    state.prepared["generated"] = record
    return corpus


def corpora(state: RunState) -> list[tuple[mix.Entry, Corpus]]:
    """The run's sources with their corpora, made once (the generated text is sampled once per run)."""
    if "corpora" not in state.prepared:
        made = []
        for entry in state.opts.calib.entries():
            if entry.source == GENERATED:
                corpus = _generated(state)
            elif entry.source in text.CALIB_SOURCES:
                corpus = text.calibration_corpus(entry.source)
            else:
                corpus = text.read_file(entry.source)
            made.append((entry, corpus))
        state.prepared["corpora"] = made
    return state.prepared["corpora"]


def windows(state: RunState, seqlen: int, bos: int | None) -> tuple[torch.Tensor, sampling.CalibSpec, dict]:
    """(calibration windows, their CalibSpec, extra record: the mix's choices, the generation) of the run."""
    calib = state.opts.calib
    made = corpora(state)
    extra: dict = {}
    if calib.calib_mix is not None:
        ids, spec, extra["mix"] = mix.sample(state.loaded.tokenizer, made, calib.nsamples, seqlen, calib.seed,
                                             calib.calib_sampling, cache=True, bos=bos)
    else:
        ids, spec = sampling.sample(state.loaded.tokenizer, made[0][1], calib.nsamples, seqlen, calib.seed,
                                    calib.calib_sampling, cache=True, bos=bos)
    if "generated" in state.prepared:
        extra["generated"] = state.prepared["generated"]
    return ids, spec, extra
