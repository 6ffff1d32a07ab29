"""Options shared by several commands (run, sweep, eval, check), declared once as annotated types."""

from __future__ import annotations

from typing import Annotated

import typer

from taylorprune.calib.sampling import SAMPLINGS
from taylorprune.calib.text import CALIB_SOURCES, EVAL_DATASETS

Model = Annotated[str, typer.Option(help="HF folder, hub id, .gguf file, or 'demo' (bundled stories260K).")]
Group = Annotated[str, typer.Option(help="Unstructured comparison group: row (Wanda) or layer.")]
Targets = Annotated[str | None, typer.Option(help="Regex on module paths selecting the linears to prune.")]
Calib = Annotated[str, typer.Option(help=f"Calibration data set: {', '.join(CALIB_SOURCES)}.")]
CalibFile = Annotated[str | None, typer.Option(help="Calibration text file (.txt, or .jsonl with 'text').")]
NSamples = Annotated[int, typer.Option(help="Number of calibration windows.")]
SeqLen = Annotated[int | None, typer.Option(help="Calibration tokens per window [default: min(2048, max positions)].")]
Seed = Annotated[int, typer.Option(help="Seed of the calibration sampler.")]
CalibSampling = Annotated[str, typer.Option(help=f"Window sampler: {', '.join(SAMPLINGS)}.")]
BatchSize = Annotated[int, typer.Option(help="Windows per forward while calibrating.")]
DType = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="Compute device: auto, cpu, cuda, cuda:1, ...")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow model code from the checkpoint (off: never run it).")]
EvalDataset = Annotated[str, typer.Option(help=f"Eval data set: {', '.join(EVAL_DATASETS)}.")]
EvalTextFile = Annotated[str | None, typer.Option(help="Evaluate on this text file instead.")]
EvalSeqLen = Annotated[int | None, typer.Option(help="Eval window length [default: min(2048, max positions)].")]
MaxWindows = Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")]
MethodOption = Annotated[list[str] | None, typer.Option(help="Extra method option KEY=VALUE (repeatable).")]
