"""The options of a run, as typed groups declared once (``option(...)`` fields, as components declare theirs).

- ``load``: what model and how it is loaded; ``calib``: the calibration windows; ``placement``: where the
  weights live; ``target``: the method and how much to prune; ``write``: the output folder, its format and side
  files;
- one group per evaluator (its own options, ``evaluate.registry``);
- the stage values ({kind: value}, ``pipeline.stages``) and the component option values (flat, checked against
  the components that run).

``RunOptions`` takes them all as one flat mapping (``RunOptions(model=..., sparsity=0.5, alpha=0.5)``), as the
CLI does, and routes each name to its group; the CLI flags of ``run`` and ``sweep`` are generated from the same
declarations, and each group validates its own values (bounds, choices, files that must exist).

Beside the options, ``kind`` (``RunKind``) says which command the run is: set by the command that builds the
options, never guessed from which options are present, so the plan derives its phases from a declared fact.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from taylorprune.calib import mix, sampling, text
from taylorprune.calib.generate import GenerateOptions
from taylorprune.errors import UserError
from taylorprune.evaluate.registry import EVALUATORS
from taylorprune.evaluate.spec import Evaluator
from taylorprune.export.formats import DEFAULT as DEFAULT_FORMAT
from taylorprune.export.formats import FORMATS, format_groups
from taylorprune.options import Options, option
from taylorprune.pipeline.stages import KINDS
from taylorprune.prune.masks import GROUPS
from taylorprune.scoring.registry import DEFAULT_METHOD


@dataclass(frozen=True)
class LoadOptions(Options):
    model: str | None = option(None, "HF folder, hub id, .gguf file, or 'demo' (bundled stories260K).", required=True)
    dtype: str = option("auto", "auto, float32, bfloat16 or float16.", choices=("auto", "float32", "bfloat16",
                                                                              "float16"))
    device_map: str | None = option(None, "accelerate device map (auto, balanced, sequential, cpu).")
    offload_folder: str | None = option(None, "Folder for accelerate's disk offload.")
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint (off: never run it).")


@dataclass(frozen=True)
class CalibOptions(Options):
    calib: str | None = option(None, f"Calibration data set (default c4 unless --calib-file): "
                               f"{', '.join(text.CALIB_SOURCES)}.", choices=text.CALIB_SOURCES)
    calib_file: str | None = option(None, "Calibration text file (.txt, or .jsonl with 'text').")
    calib_mix: str | None = option(None, "Calibration windows from several sources in proportion, e.g. "
                                   "wikitext2-valid:0.5,generated:0.5 (named sources, .txt/.jsonl files).")
    nsamples: int = option(128, "Number of calibration windows.", minimum=1)
    seqlen: int | None = option(None, "Calibration tokens per window (default: min(2048, max positions)).",
                                minimum=2)
    seed: int = option(0, "Seed of the calibration sampler (and of every seeded stage).")
    calib_sampling: str = option("random", f"Window sampler: {', '.join(sampling.SAMPLINGS)}.",
                                 choices=sampling.SAMPLINGS)
    batch_size: int = option(1, "Windows per forward while calibrating.", minimum=1)

    def check(self) -> None:
        if self.calib_file and not Path(self.calib_file).expanduser().is_file():
            raise UserError(f"--calib-file {self.calib_file}: file not found")
        if self.calib_file and self.calib:
            raise UserError(f"--calib {self.calib} and --calib-file {self.calib_file} both name the calibration text; "
                            "keep one")
        if self.calib_mix is not None:
            if self.calib or self.calib_file:
                raise UserError(f"--calib-mix and --calib{'-file' if self.calib_file else ''} both name the "
                                "calibration text; keep one (a mix may name files and sources)")
            mix.parse(self.calib_mix)

    def entries(self) -> tuple[mix.Entry, ...]:
        """The calibration sources with their weights: the mix, or the one source (a file or a named set)."""
        if self.calib_mix is not None:
            return mix.parse(self.calib_mix)
        return (mix.Entry(self.calib_file or self.source, 1.0),)

    @property
    def source(self) -> str:
        """The named calibration set (c4 unless a file or another set is given)."""
        return self.calib or "c4"


@dataclass(frozen=True)
class PlacementOptions(Options):
    device: str = option("auto", "Compute device: auto, cpu, cuda, cuda:1, ...")
    stream: bool = option(False, "Keep the model in CPU memory and bring one decoder block at a time to the device, "
                          "for every pass (statistics, pruning, evaluation), on any device (default: only when the "
                          "model does not fit).")
    max_gpu_memory: float | None = option(None, "GiB of device memory this run may use: the model stays on the GPU "
                                          "when it fits under this (with its working set), else it streams; also "
                                          "caps PyTorch's CUDA allocator (default: the free memory).", above=0)
    stream_batch: int = option(16, "Calibration or evaluation windows per block-by-block sweep: each block visits the "
                               "device once per sweep (more: fewer transfers, more memory for stored block inputs).",
                               minimum=1)


@dataclass(frozen=True)
class TargetOptions(Options):
    method: str = option(DEFAULT_METHOD, "Pruning method; see `taylorprune methods`.")
    sparsity: float | None = option(None, "Fraction of weights to prune in each target, e.g. 0.5 (with --structure: "
                                    "of the linears the structures leave, pruned after them).")
    pattern: str | None = option(None, "N:M semi-structured pattern, e.g. 2:4 (keep N of every M).")
    group: str = option("row", "Unstructured comparison group: row (Wanda) or layer.", choices=GROUPS)
    targets: str | None = option(None, "Regex on module paths selecting the linears to prune.")


@dataclass(frozen=True)
class WriteOptions(Options):
    output: str | None = option(None, "Folder to write (created atomically; must not exist).", required=True)
    overwrite: bool = option(False, "Replace an existing output folder.")
    save_scores: str | None = option(None, "Write each target's fp32 scores (.safetensors, module paths).")
    plots: bool = option(False, "Also write layer_sparsity.png into the output.")
    format: str = option(DEFAULT_FORMAT, "Output format: " + "; ".join(f"{f.name} ({f.summary})"
                                                                     for f in FORMATS.values()) + ".",
                         choices=tuple(FORMATS))


GROUPS_OF_RUN: dict[str, type[Options]] = {"load": LoadOptions, "calib": CalibOptions, "generate": GenerateOptions,
                                           "placement": PlacementOptions, "target": TargetOptions,
                                           "write": WriteOptions}


def evaluator_groups() -> dict[str, type[Options]]:
    return {e.name: e.options for e in EVALUATORS.values()}


def option_groups() -> dict[str, type[Options]]:
    """Every option group of a run: the run's own, each evaluator's and each output format's."""
    return {**GROUPS_OF_RUN, **evaluator_groups(), **format_groups()}


class RunKind(StrEnum):
    """Which command a run is, declared by that command: ``run`` prunes (and may quantize and recover), ``recover``
    trains a model pruned earlier toward its teacher, ``export`` writes a model as it is. The plan's phases and
    refusals follow from it (``pipeline.plan``) instead of from which option keys happen to be present."""

    RUN = "run"
    RECOVER = "recover"
    EXPORT = "export"


class RunOptions:
    """Every option of a run (recorded verbatim in the report), from one flat mapping, and the run's ``kind``.

    Names of a group go to that group (validated there), stage kinds to ``stages``, ``method_options`` and any
    other name to the component values (checked against the run's components when it is planned). ``kind`` is
    keyword-only and not an option: the command that builds the options says what the run is.
    """

    def __init__(self, method_options: dict[str, Any] | None = None, *, kind: RunKind | str = RunKind.RUN,
                 **values: Any) -> None:
        try:
            self.kind = RunKind(kind)
        except ValueError:
            raise ValueError(f"run kind {kind!r}: one of {', '.join(k.value for k in RunKind)}") from None
        self.stages: dict[str, str | None] = {k: values.pop(k) for k in list(values) if k in KINDS}
        self.groups: dict[str, Options] = {}
        claimed: set[str] = set()
        for name, cls in option_groups().items():
            mine = {s.name for s in cls.specs()}
            self.groups[name] = cls.build({k: v for k, v in values.items() if k in mine})
            claimed |= mine
        self.method_options: dict[str, Any] = {**{k: v for k, v in values.items() if k not in claimed},
                                               **(method_options or {})}

    load = property(lambda self: self.groups["load"])
    calib = property(lambda self: self.groups["calib"])
    generate = property(lambda self: self.groups["generate"])
    placement = property(lambda self: self.groups["placement"])
    target = property(lambda self: self.groups["target"])
    write = property(lambda self: self.groups["write"])

    @property
    def model(self) -> str:
        return self.load.model

    @property
    def output(self) -> str:
        return self.write.output

    def evaluators(self) -> list[tuple[Evaluator, Options]]:
        """The evaluators this run turns on, with their options, in registry order."""
        return [(e, self.groups[e.name]) for e in EVALUATORS.values() if e.enabled(self.groups[e.name])]

    def flat(self) -> dict[str, Any]:
        """Every option by name, as given or defaulted, and the kind (the report's ``options``; ``RunOptions(**flat)``
        again, the same kind of run)."""
        out: dict[str, Any] = {}
        for group in self.groups.values():
            out.update(group.as_dict())
        return {**out, **self.stages, "method_options": dict(self.method_options), "kind": self.kind.value}

    def replace(self, **changes: Any) -> RunOptions:
        return RunOptions(**{**self.flat(), **changes})

    def __repr__(self) -> str:
        return f"RunOptions({self.flat()!r})"
