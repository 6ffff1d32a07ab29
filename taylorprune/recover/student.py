"""What trains during recovery, and how the trained model comes back as a plain, pruned model.

``prepare`` upcasts a half-precision student to fp32 (master weights), picks the trained parameters (every
parameter of the decoder blocks, masks read from the zeros; or peft LoRA adapters on the blocks' linears, free)
and switches gradient checkpointing on when asked; ``finish`` merges adapters, re-applies every masked linear's
mask (a merged low-rank update is dense), casts back and leaves the model frozen in eval mode, as it came.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune.errors import UserError
from taylorprune.modeling.layout import Layout
from taylorprune.quantize.stage import QuantizedLinear
from taylorprune.quantize.train import on_grid
from taylorprune.recover.distill import RecoverOptions, Student


@dataclass
class Prepared:
    """A student ready to train, with what ``finish`` needs to undo."""

    student: Student
    home_dtype: torch.dtype
    masks: dict[str, torch.Tensor]  # masked linears' keep-masks, by module path
    peft: object | None = None


def _masks(layout: Layout) -> dict[str, torch.Tensor]:
    """Keep-masks of the target linears that have zeros (compact and dense linears have none worth keeping)."""
    out = {}
    for t in layout.all_targets:
        keep = t.module.weight.detach() != 0
        if not keep.all():
            out[t.path] = keep
    return out


def _lora(model: nn.Module, layout: Layout, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--recover-weights lora needs peft: pip install peft") from None
    names = sorted({t.path.rsplit(".", 1)[-1] for t in layout.all_targets})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names, bias="none")
    wrapped = get_peft_model(model, config)
    params = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    return wrapped, params


def prepare(model: nn.Module, layout: Layout, options: RecoverOptions) -> Prepared:
    home = next(model.parameters()).dtype
    if home in (torch.float16, torch.bfloat16):
        model.to(torch.float32)
    masks = _masks(layout)
    if options.recover_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # LLaMA-class models have no dropout: train mode only lets checkpointing act
    if options.recover_weights == "lora":
        wrapped, params = _lora(model, layout, options.recover_lora_rank)
        return Prepared(Student(wrapped, params, [None] * len(params)), home, masks, wrapped)
    params = list(dict.fromkeys(p for p in layout.blocks.parameters()))
    keep = {id(t.module.weight): masks.get(t.path) for t in layout.all_targets}
    student_masks = [keep.get(id(p)) for p in params]  # norms and dense linears: free
    return Prepared(Student(model, params, student_masks), home, masks)


@torch.no_grad()
def finish(prepared: Prepared, model: nn.Module, layout: Layout) -> nn.Module:
    """The plain model again: adapters merged, masks re-applied, home dtype, frozen, eval mode."""
    if prepared.peft is not None:
        model = prepared.peft.merge_and_unload()
    for t in layout.all_targets:
        keep = prepared.masks.get(t.path)
        if keep is not None:
            t.module.weight.mul_(keep.to(t.module.weight.device))
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.eval()
    model.requires_grad_(False)
    if prepared.home_dtype != torch.float32:
        model.to(prepared.home_dtype)
    return model


@contextlib.contextmanager
def on_its_grid(prepared: Prepared, layout: Layout, quantized: Mapping[str, QuantizedLinear], mode: str
                ) -> Iterator[None]:
    """A quantized student trains on its grid (``quantize.train.on_grid``, ``--quant-train``): each quantized
    linear's weight is replaced in the trained parameters by what the mode trains (its latent weight, or its scale
    multipliers), masked by the pruning mask itself, not by its zeros (a kept weight rounded to 0 may move), and
    ``finish`` re-applies that mask only. On exit the weights hold exact grid values."""
    if prepared.peft is not None:
        raise UserError("--recover-weights lora cannot keep a quantized model on its grid; use "
                        "--recover-weights all")
    paths = [t.path for t in layout.all_targets if t.path in quantized]
    linears = [t.module for t in layout.all_targets if t.path in quantized]
    index = {id(lin.weight): k for k, lin in enumerate(linears)}
    for path in paths:
        keep = quantized[path].keep
        if keep is None:
            prepared.masks.pop(path, None)
        else:
            prepared.masks[path] = keep
    student = prepared.student
    with on_grid(linears, [quantized[p] for p in paths], mode) as (params, masks):
        old = list(zip(student.params, student.masks, strict=True))
        pairs = [(params[index[id(p)]], masks[index[id(p)]]) if id(p) in index else (p, m) for p, m in old]
        student.params[:], student.masks[:] = [p for p, _ in pairs], [m for _, m in pairs]
        try:
            yield
        finally:
            student.params[:], student.masks[:] = [p for p, _ in old], [m for _, m in old]
