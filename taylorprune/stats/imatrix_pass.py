"""The importance matrix of a model on calibration windows: Σx² per input column of every decoder linear, as
llama-imatrix gathers it, for ``llama-quantize --imatrix`` (``taylorprune imatrix``).

Why this is the dense activation pass and not a hook of its own: the statistic is the one OWL's pre-pass and
Wanda's ``scaler_row`` already gather (``stats.hooks.ActNormSq``: fp32 Σx² whatever the model dtype), over the
same block-by-block forward the run uses (``stats.hooks.dense_activations``: no KV cache between windows, blocks
streamed to the device one at a time, so a model larger than the GPU still works). Only the bookkeeping is
llama.cpp's: token counts (windows × seqlen), chunk size and count, and llama.cpp's tensor names, which every
target must have (a linear llama.cpp cannot name could not be weighed by llama-quantize anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from taylorprune.errors import UserError
from taylorprune.export.imatrix import Imatrix, to_gguf
from taylorprune.modeling.layout import find_layout
from taylorprune.options import NoOptions
from taylorprune.stats.hooks import dense_activations
from taylorprune.stats.source import ModelContext

_STAT = "dense_act_norm_sq"


def _no_progress(_name: str, _total: int) -> Callable[[int], None]:
    return lambda _i: None


def gguf_names(model: nn.Module) -> dict[str, str]:
    """{linear path: llama.cpp tensor name} of every linear in the decoder blocks; a one-line error naming the
    first linear llama.cpp has no name for (checked before any forward)."""
    names = {}
    for target in find_layout(model).all_targets:
        try:
            names[target.path] = to_gguf(target.path)
        except ValueError:
            raise UserError(f"{target.path}: llama.cpp has no tensor name for this linear, so an imatrix cannot "
                            "name it (LLaMA-class projections only: q/k/v/o, gate/up/down)") from None
    return names


def model_imatrix(model: nn.Module, windows: torch.Tensor, device: torch.device | str, *,
                  datasets: Iterable[str] = ("taylorprune",),
                  progress: Callable[[str, int], Callable[[int], None]] = _no_progress) -> Imatrix:
    """The imatrix of ``model`` on ``windows`` [n, seqlen]: per decoder linear Σx² over all n·seqlen tokens and
    that count; chunk size seqlen and chunk count n, as llama-imatrix records its ``n_ctx`` chunks."""
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be [n, seqlen] with n ≥ 1, got {tuple(windows.shape)}")
    gguf_names(model)
    layout = find_layout(model)
    ctx = ModelContext(model, layout, windows, torch.device(device), progress=progress)
    stats = dense_activations(ctx, frozenset({_STAT}), NoOptions())
    nseq, seqlen = (int(s) for s in windows.shape)
    act = {path: {"act_norm_sq": values[_STAT]} for path, values in stats.items()}
    return Imatrix.from_act_norm_sq(act, nseq=nseq, seqlen=seqlen, datasets=datasets)
