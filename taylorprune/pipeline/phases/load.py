"""Load phase (``source`` in the report): the model and its tokenizer, its decoder layout, and where it lives.

After loading, the placement is decided once (``modeling.placement``): resident on the device when the weights
and the run's working set fit, streamed block by block otherwise; a resident model moves there now.
"""

from __future__ import annotations

from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.export import atomic, save
from taylorprune.modeling import loading
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.placement import Placement, choose_placement, engine_bytes
from taylorprune.pipeline import quantized_source
from taylorprune.pipeline.evaluation import working_bytes
from taylorprune.pipeline.run_options import RunKind
from taylorprune.pipeline.state import Phase, RunFacts, RunState


def check_placement(stream: bool, max_gpu_memory: float | None, device_map: str | None) -> None:
    """No accelerate device map (which places the model itself) beside the memory options."""
    if device_map and (stream or max_gpu_memory is not None):
        flag = "--stream" if stream else "--max-gpu-memory"
        raise UserError(f"{flag} and --device-map {device_map} both decide where the model lives; drop one (without "
                        "--device-map, taylorprune keeps the model on the GPU when it fits and streams it otherwise)")


class Load(Phase):
    name = "source"
    label = "loading model"

    def wanted(self, facts: RunFacts) -> bool:
        """Every run starts from a loaded model."""
        return True

    def check(self, plan) -> None:
        opts = plan.opts
        check_placement(opts.placement.stream, opts.placement.max_gpu_memory, opts.load.device_map)
        if opts.kind == RunKind.RUN:
            quantized_source.refuse_run(opts.load.model)

    def run(self, state: RunState) -> dict:
        plan, opts, hooks = state.plan, state.opts, state.hooks
        with hooks.timed(state.phases_s, "load", self.label):
            lo = opts.load
            if quantized_source.folder_of(lo.model) is not None:  # packed linears: read by our own unpacker
                loaded, packed = quantized_source.load(lo, plan.config)
                state.quantized.update(packed)
            else:
                loaded = loading.load(lo.model, lo.dtype, lo.device_map, lo.offload_folder, lo.trust_remote_code,
                                      config=plan.config)
            layout = find_layout(loaded.model, opts.target.targets)
            if any(t.module.weight.device.type == "meta" for t in layout.all_targets):
                raise UserError("--device-map placed decoder blocks on disk (offloaded); they cannot be pruned in "
                                "place. Give the CPU enough memory (--device-map cpu, or no --device-map) and let "
                                "taylorprune stream blocks to the GPU")
            atomic.check_free_space(Path(opts.output), save.estimate_bytes(loaded.model))
        state.loaded, state.layout = loaded, layout
        with hooks.timed(state.phases_s, "load", "placing the model"):
            state.placement = place(state)
        return {"model": lo.model, "resolved": loaded.source, "gguf_file": loaded.gguf_file,
                "placement": state.placement.describe()}


def place(state: RunState) -> Placement:
    """Resident on the device when the weights and the run's working set fit (moved there now), else streamed."""
    plan, model = state.plan, state.model
    opts = plan.opts
    param = next(model.parameters())
    widest = max((t.module.in_features for t in state.layout.all_targets), default=0)
    working = engine_bytes(model.config, opts.calib.nsamples, plan.seqlen, param.element_size(), widest, None)
    working += working_bytes(list(plan.evaluators), model.config)
    placement = choose_placement(model, plan.device, opts.placement.stream, opts.placement.max_gpu_memory, working)
    if placement.mode == "resident" and plan.device.type != "cpu":
        model.to(plan.device)
    return placement
