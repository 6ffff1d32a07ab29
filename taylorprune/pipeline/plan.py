"""``RunOptions`` (what the user asked for) checked and resolved into a ``Plan`` (what will run).

``validate`` does every check that needs no weights: components and their options, pattern, device, dtype,
calibration and evaluation inputs, output folder, free disk, and the model's config (sequence lengths).
``prune`` then works from the plan alone, so nothing is parsed twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from taylorprune.calib import sampling, text
from taylorprune.errors import UserError
from taylorprune.export import atomic
from taylorprune.modeling import loading
from taylorprune.pipeline.components import Components, resolve
from taylorprune.prune.masks import Pattern, parse_pattern
from taylorprune.prune.structures import Shape, check_config, parse_structures, removal_counts
from taylorprune.scoring.registry import DEFAULT_METHOD
from taylorprune.stats.collect import cache_path

MAX_DEFAULT_SEQLEN = 2048


@dataclass
class RunOptions:
    """Every option of ``taylorprune run``; recorded verbatim in the report.

    ``method_options`` holds the component options the user gave (flat: ``{"alpha": 0.5}``); everything not
    given takes the default its component declares.
    """

    model: str
    output: str
    method: str = DEFAULT_METHOD
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
    stream: bool = False
    max_gpu_memory: float | None = None
    stream_batch: int = 16
    overwrite: bool = False
    trust_remote_code: bool = False
    eval: bool = False
    eval_dataset: str = "wikitext2"
    eval_text_file: str | None = None
    eval_seqlen: int | None = None
    max_windows: int | None = None
    allocation: str = "uniform"
    refine: str | None = None  # None: the method's own default (none for most)
    update: str = "none"
    recon: str = "none"
    save_scores: str | None = None
    plots: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)
    structure: str | None = None  # e.g. "neurons" or "heads,neurons": structured pruning, --sparsity = ratio
    target_params: float | None = None  # structured: fraction of all parameters to remove (instead of --sparsity)
    speed: bool = False  # time prefill/decode of the dense and the pruned model and add it to the report


@dataclass(frozen=True)
class StructuredPlan:
    """What a structured run removes: kinds in processing order, the ratio or the parameter target, and (for a
    ratio) the count of each kind per block, known from the config alone."""

    kinds: tuple[str, ...]
    ratio: float | None
    target_params: float | None
    counts: dict[str, int] | None

    def describe(self) -> str:
        how = f"ratio {self.ratio:g}" if self.ratio is not None else f"{self.target_params:g} of the parameters"
        return f"structured {'+'.join(self.kinds)}, {how}"


@dataclass(frozen=True)
class Plan:
    """A validated run: resolved components, pattern, device, dtype, sequence lengths and model config."""

    opts: RunOptions
    parts: Components
    pattern: Pattern
    device: torch.device
    dtype: torch.dtype | str
    config: Any
    seqlen: int
    eval_seqlen: int
    structured: StructuredPlan | None = None

    @property
    def needs(self) -> frozenset[str]:
        return self.parts.needs

    @property
    def whole_model(self):
        """The method's whole-model procedure for these options, or None (the layer-by-layer engine)."""
        return self.parts.method.whole_model(self.parts.method_options)

    @property
    def calibrated(self) -> bool:
        if self.structured is not None:
            return bool(self.needs) or "blocks" in self.structured.kinds or self.parts.group.select is not None
        return bool(self.needs) or self.whole_model is not None

    def describe(self) -> str:
        return self.structured.describe() if self.structured else self.pattern.describe()

    def recipe(self) -> dict[str, Any]:
        """Everything that decides how the blocks are pruned (block-scope cache identity)."""
        keys = ("sparsity", "pattern", "group", "targets", "batch_size", "seed")
        return {**{k: v for k, v in asdict(self.opts).items() if k in keys}, **self.parts.recipe()}


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


def resolve_seqlen(requested: int | None, config, flag: str = "--seqlen") -> int:
    """Default min(2048, max_position_embeddings): never the raw 131072 of Llama-3."""
    limit = getattr(config, "max_position_embeddings", None)
    if requested is None:
        return min(MAX_DEFAULT_SEQLEN, limit or MAX_DEFAULT_SEQLEN)
    if requested < 2:
        raise UserError(f"{flag} {requested}: must be at least 2")
    if limit and requested > limit:
        raise UserError(f"{flag} {requested}: the model supports at most {limit} positions")
    return requested


def _at_least(value: int | None, minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{flag} {value}: must be at least {minimum}")


def check_placement(stream: bool, max_gpu_memory: float | None, stream_batch: int, device_map: str | None) -> None:
    """The memory options: a positive cap, a whole number of windows per sweep, and no accelerate device map
    (which places the model itself) beside them."""
    if max_gpu_memory is not None and not max_gpu_memory > 0:
        raise UserError(f"--max-gpu-memory {max_gpu_memory:g}: must be above 0 (GiB)")
    _at_least(stream_batch, 1, "--stream-batch")
    if device_map and (stream or max_gpu_memory is not None):
        flag = "--stream" if stream else "--max-gpu-memory"
        raise UserError(f"{flag} and --device-map {device_map} both decide where the model lives; drop one (without "
                        "--device-map, taylorprune keeps the model on the GPU when it fits and streams it otherwise)")


def _check_inputs(opts: RunOptions) -> None:
    check_placement(opts.stream, opts.max_gpu_memory, opts.stream_batch, opts.device_map)
    _at_least(opts.nsamples, 1, "--nsamples")
    _at_least(opts.seqlen, 2, "--seqlen")
    _at_least(opts.batch_size, 1, "--batch-size")
    _at_least(opts.eval_seqlen, 2, "--eval-seqlen")
    _at_least(opts.max_windows, 1, "--max-windows")
    if opts.calib_sampling not in sampling.SAMPLINGS:
        raise UserError(f"--calib-sampling {opts.calib_sampling}: choose random or sequential")
    if opts.calib_file is None and opts.calib not in text.CALIB_SOURCES:
        raise UserError(f"--calib {opts.calib}: choose one of {', '.join(text.CALIB_SOURCES)}")
    if opts.calib_file and not Path(opts.calib_file).expanduser().is_file():
        raise UserError(f"--calib-file {opts.calib_file}: file not found")
    if opts.eval_text_file and not Path(opts.eval_text_file).expanduser().is_file():
        raise UserError(f"--eval-text-file {opts.eval_text_file}: file not found")
    if opts.eval and opts.eval_text_file is None and opts.eval_dataset not in text.EVAL_DATASETS:
        raise UserError(f"--eval-dataset {opts.eval_dataset}: choose one of {', '.join(text.EVAL_DATASETS)} "
                        "or give --eval-text-file")


def _files_written(opts: RunOptions, parts: Components) -> list[tuple[str, str]]:
    """(flag, path) of every file besides the output folder that this run may write."""
    files = [("--save-scores", opts.save_scores)] if opts.save_scores else []
    for source, source_opts in parts.sources:
        path = cache_path(source, source_opts)
        if path:
            files.append(("--" + source.cache_option.replace("_", "-"), path))
    return files


def _check_files(opts: RunOptions, parts: Components, inputs: list[Path]) -> None:
    for flag, value in _files_written(opts, parts):
        where = Path(value).expanduser()
        if where.is_dir():
            raise UserError(f"{flag} {value}: is a folder; give a .safetensors file path")
        if any(src.resolve() in where.resolve().parents for src in inputs if src.is_dir()):
            raise UserError(f"{flag} {value}: inside the input model folder, which taylorprune never writes to")


def _structured(opts: RunOptions) -> tuple[str, ...]:
    """The structures asked for, and the checks of the options that go with them (config not needed)."""
    if opts.structure is None:
        for flag, value in (("--target-params", opts.target_params), ("--speed", opts.speed or None)):
            if value is not None:
                raise UserError(f"{flag} applies to structured pruning; add --structure neurons|heads|blocks")
        return ()
    kinds = parse_structures(opts.structure)
    if opts.pattern is not None:
        raise UserError("--pattern is for unstructured pruning; with --structure give --sparsity (the fraction of "
                        "each structure removed) or --target-params")
    if opts.targets is not None:
        raise UserError("--targets does not apply with --structure (structures span several linears)")
    if (opts.sparsity is None) == (opts.target_params is None):
        raise UserError("with --structure give exactly one of --sparsity (fraction of each structure removed in "
                        "every block) and --target-params (fraction of all parameters to remove)")
    for flag, value in (("--sparsity", opts.sparsity), ("--target-params", opts.target_params)):
        if value is not None and not 0.0 < value < 1.0:
            raise UserError(f"{flag} {value}: must be between 0 and 1 (exclusive)")
    if opts.target_params is not None and len(kinds) > 1:
        raise UserError("--target-params takes one --structure; combine structures with --sparsity")
    return kinds


def _structured_plan(kinds: tuple[str, ...], opts: RunOptions, parts: Components, config) -> StructuredPlan:
    heads = parts.structure_options("heads")
    mode = heads.head_mode if heads is not None else "kv-groups"
    counts = None
    if opts.sparsity is not None:
        counts = removal_counts(kinds, opts.sparsity, Shape.of(config), mode)
        check_config(config, counts, Shape.of(config), mode, f"--sparsity {opts.sparsity:g}")
    return StructuredPlan(kinds, opts.sparsity, opts.target_params, counts)


def validate(opts: RunOptions) -> Plan:
    """Everything that can be checked before loading weights; returns the plan ``prune`` follows."""
    kinds = _structured(opts)
    parts = resolve(opts.method, opts.update, opts.method_options, refine=opts.refine, allocation=opts.allocation,
                    recon=opts.recon, structures=kinds)
    if kinds:
        pattern = Pattern(opts.sparsity if opts.sparsity is not None else opts.target_params)
    else:
        pattern = parse_pattern(opts.sparsity, opts.pattern, opts.group)
    parts.allocation.check(pattern)
    _check_inputs(opts)
    device = resolve_device(opts.device)
    dtype = loading.torch_dtype(opts.dtype)
    source, _ = loading.resolve_source(opts.model)
    inputs = [Path(source)] if Path(source).exists() else []
    atomic.check_output(Path(opts.output), inputs, opts.overwrite)
    _check_files(opts, parts, inputs)
    config = loading.load_config(opts.model, opts.trust_remote_code)
    seqlen = resolve_seqlen(opts.seqlen, config)
    eval_seqlen = resolve_seqlen(opts.eval_seqlen, config, "--eval-seqlen")
    size = loading.input_bytes(opts.model)
    if size is not None:
        atomic.check_free_space(Path(opts.output), size)
    structured = _structured_plan(kinds, opts, parts, config) if kinds else None
    return Plan(opts, parts, pattern, device, dtype, config, seqlen, eval_seqlen, structured)
