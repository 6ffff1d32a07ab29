"""The ``run`` data flow end to end: load → calibrate → score → mask → update → save → evaluate.

The CLI only parses options into ``RunOptions`` and renders progress; everything else happens here so
tests and benchmark scripts drive exactly what users run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import taylorprune
from taylorprune.calib import sampling, text
from taylorprune.errors import UserError
from taylorprune.evaluate.perplexity import EvalResult, perplexity_of_windows, tokenizer_fingerprint, windows_of
from taylorprune.export import atomic, save
from taylorprune.modeling import loading
from taylorprune.modeling.layout import find_layout
from taylorprune.prune.blocks import BlockRunner
from taylorprune.prune.engine import PruneResult, prune_layers
from taylorprune.prune.masks import parse_pattern
from taylorprune.prune.update import get_update
from taylorprune.scoring import cache, get_method, model_stats
from taylorprune.scoring.hvp import HVP_MODES
from taylorprune.scoring.stats import BLOCK_FN_STATS

MAX_DEFAULT_SEQLEN = 2048


@dataclass
class RunOptions:
    """Every option of ``taylorprune run``; recorded verbatim in the report."""

    model: str
    output: str
    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    group: str = "row"
    targets: str | None = None
    calib: str = "c4"
    calib_file: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    calib_sampling: str = "random"
    batch_size: int = 1
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    offload_folder: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    eval: bool = False
    eval_dataset: str = "wikitext2"
    eval_text_file: str | None = None
    eval_seqlen: int | None = None
    max_windows: int | None = None
    update: str = "none"
    save_scores: str | None = None
    plots: bool = False
    method_options: dict = field(default_factory=dict)


CURRENT_PHASE = {"name": "starting"}  # read by the CLI to say where an out-of-memory error happened


@dataclass
class Hooks:
    """Progress callbacks the CLI plugs in (all optional)."""

    phase: Callable[[str], None] = lambda name: None
    task: Callable[[str, int], Callable[[int], None]] = lambda name, total: (lambda i: None)
    windows: Callable[[int, int], None] | None = None
    events: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def resolve_seqlen(requested: int | None, model, flag: str = "--seqlen") -> int:
    """Default min(2048, max_position_embeddings): never the raw 131072 of Llama-3."""
    limit = max_positions(model)
    if requested is None:
        return min(MAX_DEFAULT_SEQLEN, limit or MAX_DEFAULT_SEQLEN)
    if requested < 2:
        raise UserError(f"{flag} {requested}: must be at least 2")
    if limit and requested > limit:
        raise UserError(f"{flag} {requested}: the model supports at most {limit} positions")
    return requested


def load_calibration(opts: RunOptions, tokenizer, seqlen: int):
    corpus = text.read_file(opts.calib_file) if opts.calib_file else text.calibration_corpus(opts.calib)
    return sampling.sample(tokenizer, corpus, opts.nsamples, seqlen, opts.seed, opts.calib_sampling)


def eval_text(dataset: str, text_file: str | None) -> tuple[str, str]:
    """(text, name) for evaluation: a local file or a named test split."""
    if text_file:
        corpus = text.read_file(text_file)
        return corpus.joined(), str(Path(text_file).name)
    return text.evaluation_text(dataset), dataset


def eval_windows(model, tokenizer, dataset, text_file, seqlen, max_windows) -> tuple[torch.Tensor, str]:
    """Tokenize the evaluation text once and cut its windows (fails early when the text is too short)."""
    body, label = eval_text(dataset, text_file)
    return windows_of(sampling.tokenize(tokenizer, body), resolve_seqlen(seqlen, model, "--eval-seqlen"),
                      max_windows, label), label


def evaluate_windows(model, tokenizer, windows, label, name, device, hooks) -> EvalResult:
    if not getattr(model, "hf_device_map", None):
        model.to(device)
    result = perplexity_of_windows(model, windows, label, name, device, hooks.windows)
    return dataclasses.replace(result, tokenizer=tokenizer_fingerprint(tokenizer))


def evaluate_model(model, tokenizer, name, dataset, text_file, seqlen, max_windows, device, hooks) -> EvalResult:
    windows, label = eval_windows(model, tokenizer, dataset, text_file, seqlen, max_windows)
    return evaluate_windows(model, tokenizer, windows, label, name, device, hooks)


def validate(opts: RunOptions) -> None:
    """Everything that can be checked before loading anything heavy."""
    method = get_method(opts.method)
    get_update(opts.update)
    if method.solver is not None and opts.update != "none":
        raise UserError(f"--method {opts.method} updates weights itself; drop --update {opts.update}")
    parse_pattern(opts.sparsity, opts.pattern, opts.group)
    if opts.nsamples < 1:
        raise UserError(f"--nsamples {opts.nsamples}: must be at least 1")
    if opts.seqlen is not None and opts.seqlen < 2:
        raise UserError(f"--seqlen {opts.seqlen}: must be at least 2")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size {opts.batch_size}: must be at least 1")
    if opts.calib_sampling not in sampling.SAMPLINGS:
        raise UserError(f"--calib-sampling {opts.calib_sampling}: choose random or sequential")
    if opts.calib_file is None and opts.calib not in text.CALIB_SOURCES:
        raise UserError(f"--calib {opts.calib}: choose one of {', '.join(text.CALIB_SOURCES)}")
    if opts.calib_file and not Path(opts.calib_file).expanduser().is_file():
        raise UserError(f"--calib-file {opts.calib_file}: file not found")
    if opts.eval_text_file and not Path(opts.eval_text_file).expanduser().is_file():
        raise UserError(f"--eval-text-file {opts.eval_text_file}: file not found")
    mo = opts.method_options
    method.needs_for(mo)  # validates scope options
    if mo.get("hvp_mode", "blockwise") not in HVP_MODES:
        raise UserError(f"--hvp-mode {mo['hvp_mode']}: choose one of {', '.join(HVP_MODES)}")
    if mo.get("grad_norm", "l2") not in ("l1", "l2"):
        raise UserError(f"--grad-norm {mo['grad_norm']}: choose l1 or l2")
    if float(mo.get("grad_scale", 100.0)) <= 0:
        raise UserError(f"--grad-scale {mo['grad_scale']}: must be positive")
    if not 0 <= float(mo.get("percdamp", 0.01)) < 10:
        raise UserError(f"--percdamp {mo['percdamp']}: expected a small non-negative fraction such as 0.01")
    if int(mo.get("blocksize", 128)) < 1:
        raise UserError(f"--blocksize {mo['blocksize']}: must be at least 1")
    if opts.save_scores and Path(opts.save_scores).expanduser().is_dir():
        raise UserError(f"--save-scores {opts.save_scores}: is a folder; give a .safetensors file path")
    for key in ("grad_cache", "hvp_cache"):
        if mo.get(key) and Path(mo[key]).expanduser().is_dir():
            raise UserError(f"--{key.replace('_', '-')} {mo[key]}: is a folder; give a .safetensors file path")
    resolve_device(opts.device)
    loading.torch_dtype(opts.dtype)
    source, gguf = loading.resolve_source(opts.model)
    inputs = [Path(source)] if Path(source).exists() else []
    atomic.check_output(Path(opts.output), inputs, opts.overwrite)
    for flag, value in (("--save-scores", opts.save_scores), ("--grad-cache", mo.get("grad_cache")),
                        ("--hvp-cache", mo.get("hvp_cache"))):
        if value and any(src.resolve() in Path(value).expanduser().resolve().parents for src in inputs if src.is_dir()):
            raise UserError(f"{flag} {value}: inside the input model folder, which taylorprune never writes to")
    config = loading.load_config(opts.model, opts.trust_remote_code)
    limit = getattr(config, "max_position_embeddings", None)
    for flag, value in (("--seqlen", opts.seqlen), ("--eval-seqlen", opts.eval_seqlen)):
        if value is not None and limit and value > limit:
            raise UserError(f"{flag} {value}: the model supports at most {limit} positions")
    if opts.eval_seqlen is not None and opts.eval_seqlen < 2:
        raise UserError(f"--eval-seqlen {opts.eval_seqlen}: must be at least 2")
    if opts.max_windows is not None and opts.max_windows < 1:
        raise UserError(f"--max-windows {opts.max_windows}: must be at least 1")
    size = loading.input_bytes(opts.model)
    if size is not None:
        atomic.check_free_space(Path(opts.output), size)


def versions() -> dict[str, str]:
    import transformers

    return {"taylorprune": taylorprune.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class Pruned:
    """A pruned model still in memory, with everything its report needs."""

    opts: RunOptions
    loaded: loading.Loaded
    method: object
    pattern: object
    spec: sampling.CalibSpec | None
    result: PruneResult
    phases: dict[str, float]
    evaluation: dict | None = None


class BlockStatCache:
    """``--hvp-cache`` for block-scope HVPs: they depend on how the blocks before were pruned, so the identity
    holds the whole pruning recipe besides model and calibration."""

    def __init__(self, opts: RunOptions, model, layout, spec, needs: frozenset[str], hooks: Hooks) -> None:
        self.path = opts.method_options.get("hvp_cache") if any(n in BLOCK_FN_STATS for n in needs) else None
        self.identity: dict[str, str] = {}
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        if self.path:
            recipe = {k: v for k, v in asdict(opts).items() if k in RECIPE_KEYS}
            recipe["method_options"] = {k: opts.method_options.get(k) for k in ("percdamp", "blocksize", "hvp_scope")}
            self.identity = {"kind": "hvp-block", "model": cache.model_fingerprint(model, layout),
                             "calibration": json.dumps({k: v for k, v in spec.describe().items() if k != "source"},
                                                       sort_keys=True),
                             "recipe": json.dumps(recipe, sort_keys=True), "dtype": str(next(model.parameters()).dtype)}
            self.stats = cache.load_matching(self.path, self.identity)
            self._known = {p: set(d) for p, d in self.stats.items()}
            if self.stats:
                hooks.events.append("hvp_cache_hit")

    def save(self) -> None:
        if self.path and {p: set(d) for p, d in self.stats.items()} != self._known:
            cache.store(self.path, self.identity, self.stats)


RECIPE_KEYS = ("method", "sparsity", "pattern", "group", "targets", "update", "batch_size")


@contextlib.contextmanager
def _phase(hooks: Hooks, phases: dict[str, float], key: str, label: str) -> Iterator[None]:
    """Announce, time and remember the current phase (the CLI names it in out-of-memory errors)."""
    CURRENT_PHASE["name"] = label
    hooks.phase(label)
    t0 = time.perf_counter()
    yield
    phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0


def prune(opts: RunOptions, hooks: Hooks | None = None) -> Pruned:
    """Load, calibrate and prune in memory (no output written)."""
    hooks = hooks or Hooks()
    validate(opts)
    torch.manual_seed(opts.seed)
    method, update = get_method(opts.method), get_update(opts.update)
    needs = method.needs_for(opts.method_options) | update.needs
    pattern = parse_pattern(opts.sparsity, opts.pattern, opts.group)
    device = resolve_device(opts.device)
    phases: dict[str, float] = {}
    calib_ids, spec, windows, dense_stats = None, None, None, {}

    with _phase(hooks, phases, "load", "loading model"):
        loaded = loading.load(opts.model, opts.dtype, opts.device_map, opts.offload_folder, opts.trust_remote_code)
        layout = find_layout(loaded.model, opts.targets)
        if any(t.module.weight.device.type == "meta" for t in layout.all_targets):
            raise UserError("--device-map placed decoder blocks on disk (offloaded); they cannot be pruned in place. "
                            "Give the CPU enough memory (--device-map cpu, or no --device-map) and let taylorprune "
                            "stream blocks to the GPU")
        atomic.check_free_space(Path(opts.output), save.estimate_bytes(loaded.model))
    with _phase(hooks, phases, "calibration_data", "tokenizing calibration and evaluation text"):
        if needs:
            calib_ids, spec = load_calibration(opts, loaded.tokenizer, resolve_seqlen(opts.seqlen, loaded.model))
        if opts.eval:  # before any heavy work: a too-short evaluation text fails now, not after pruning
            windows = eval_windows(loaded.model, loaded.tokenizer, opts.eval_dataset, opts.eval_text_file,
                                   opts.eval_seqlen, opts.max_windows)
    if any(model_stats.is_model_stat(n) for n in needs):
        with _phase(hooks, phases, "model_statistics", "model-scope statistics on the dense model"):
            ctx = model_stats.Context(loaded.model, layout, calib_ids, spec, opts.method_options, device, hooks.task,
                                      hooks.events)
            dense_stats = model_stats.collect(needs, ctx)
    with _phase(hooks, phases, "prune", f"pruning with {method.name} ({pattern.describe()})"):
        runner = BlockRunner(loaded.model, layout, device, opts.batch_size)
        scores: dict[str, torch.Tensor] | None = {} if opts.save_scores else None
        block_cache = BlockStatCache(opts, loaded.model, layout, spec, needs, hooks)
        result = prune_layers(runner, layout, method, pattern, calib_ids, opts.method_options, dense_stats,
                              on_block=hooks.task("pruning blocks", len(layout.blocks)), update=update,
                              scores=scores, fn_cache=block_cache.stats)
        block_cache.save()
        if scores is not None:
            save.write_tensors(Path(opts.save_scores), scores, {"method": method.name, "pattern": pattern.describe()})
    phases.update({f"prune.{k}": v for k, v in result.timings.items()})
    pruned = Pruned(opts, loaded, method, pattern, spec, result, phases)
    if windows is not None:
        with _phase(hooks, phases, "eval", "evaluating perplexity"):
            pruned.evaluation = evaluate_windows(loaded.model, loaded.tokenizer, *windows, opts.output, device,
                                                 hooks).to_dict()
    return pruned


def write(pruned: Pruned, hooks: Hooks | None = None) -> dict:
    """Write the pruned model atomically, verify it on disk, and return the report written with it."""
    hooks = hooks or Hooks()
    opts = pruned.opts
    t0 = time.perf_counter()
    CURRENT_PHASE["name"] = "writing the output"
    hooks.phase(f"writing {opts.output}")
    report = build_report(pruned)
    with atomic.atomic_dir(Path(opts.output), opts.overwrite) as tmp:
        save.save_model(pruned.loaded.model, pruned.loaded.tokenizer, tmp)
        save.verify(tmp, pruned.result.linears)
        report["phases_s"]["save"] = time.perf_counter() - t0
        report["peak_memory_mib"] = save.peak_memory()
        save.write_report(tmp, report)
        if opts.plots:
            from taylorprune.report.plots import plot_layer_sparsity

            plot_layer_sparsity(report, tmp / "layer_sparsity.png")
    return report


def run(opts: RunOptions, hooks: Hooks | None = None) -> dict:
    """Prune ``opts.model`` and write ``opts.output``; returns the report that was written."""
    return write(prune(opts, hooks), hooks)


def build_report(p: Pruned) -> dict:
    opts, method, pattern, result = p.opts, p.method, p.pattern, p.result
    return {
        "method": method.name,
        "update": opts.update,
        "paper": method.paper,
        "pattern": pattern.describe(),
        "sparsity": pattern.sparsity,
        "achieved_sparsity": result.sparsity,
        "options": asdict(opts),
        "source": {"model": opts.model, "resolved": p.loaded.source, "gguf_file": p.loaded.gguf_file},
        "calibration": p.spec.describe() if p.spec else None,
        "linears": result.linears,
        "warnings": result.warnings,
        "evaluation": p.evaluation,
        "phases_s": p.phases,
        "peak_memory_mib": save.peak_memory(),
        "versions": versions(),
    }
