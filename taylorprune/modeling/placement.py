"""Where the weights live while a pass runs, decided once per run after loading (``choose_placement``).

- ``resident``: the whole model moves to the compute device and stays there (the fast path). Chosen when the
  weights plus the run's working set fit in 90% of the device's budget: its free memory (plus what PyTorch's
  own allocator holds but does not use), or ``--max-gpu-memory`` when that is lower. On the CPU the model is
  already where it computes, so it is resident unless a cap or ``--stream`` says otherwise;
- ``stream``: the model stays in CPU memory and one decoder block at a time visits the device (``--stream``
  forces it on any device, the CPU included, so that every block-by-block code path can be run and tested);
- ``device_map``: accelerate placed the model (``--device-map``); passes run on it as placed.

The working-set estimates of the passes (what each needs beside the weights) live here too, so every decision
about device memory reads from one place. They are heuristics for placement decisions only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
USABLE = 0.9  # fraction of the device budget a resident model and its working set may take


@dataclass(frozen=True)
class Placement:
    """Where the weights live for a run: ``resident`` on the device, ``stream`` from the CPU, or ``device_map``."""

    mode: str
    device: torch.device
    reason: str
    model_bytes: int
    budget_bytes: int | None = None

    @property
    def stream(self) -> bool:
        return self.mode == "stream"

    def fits(self, extra_bytes: int) -> bool:
        """Whether a pass holding the whole model plus ``extra_bytes`` on the device fits this placement."""
        if self.mode == "device_map":
            return True
        if self.mode == "stream":
            return False
        return self.budget_bytes is None or self.model_bytes + extra_bytes <= USABLE * self.budget_bytes

    def describe(self) -> dict:
        """The report's record of the decision."""
        budget = None if self.budget_bytes is None else round(self.budget_bytes / GIB, 3)
        return {"mode": self.mode, "device": str(self.device), "reason": self.reason,
                "model_gib": round(self.model_bytes / GIB, 3), "budget_gib": budget}


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once, meta tensors not at all)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def normalized(device: torch.device | str) -> torch.device:
    """``cuda`` as ``cuda:<current>``, so it compares equal to the device of the tensors placed there."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_budget(device: torch.device, max_gpu_memory: float | None = None) -> int | None:
    """Bytes this process may use on ``device``: free memory (CUDA; plus memory PyTorch's allocator holds
    unused), capped by ``max_gpu_memory`` GiB; None when unlimited (the CPU without a cap)."""
    limits = [] if max_gpu_memory is None else [int(max_gpu_memory * GIB)]
    if device.type == "cuda":
        device = normalized(device)
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        limits.append(free)
    return min(limits) if limits else None


def choose_placement(model: nn.Module, device: torch.device, stream: bool = False,
                     max_gpu_memory: float | None = None, working_bytes: int = 0) -> Placement:
    """Resident when the model and ``working_bytes`` fit the device budget with headroom, else streamed."""
    device = torch.device(device)
    size = model_bytes(model)
    if getattr(model, "hf_device_map", None):
        return Placement("device_map", device, "placed by accelerate (--device-map)", size)
    budget = device_budget(device, max_gpu_memory)
    if stream:
        return Placement("stream", device, "--stream", size, budget)
    target = normalized(device)
    if device.type != "cpu" and all(p.device == target for p in model.parameters()):
        return Placement("resident", device, "already on the device", size)
    if budget is None:
        return Placement("resident", device, "the compute device is the CPU, where the model is loaded", size)
    words = f"{size / GIB:.2f} GiB of weights + {working_bytes / GIB:.2f} GiB working set"
    limit = f"{USABLE:.0%} of {budget / GIB:.2f} GiB" + (" (--max-gpu-memory)" if max_gpu_memory is not None else "")
    if size + working_bytes <= USABLE * budget:
        return Placement("resident", device, f"{words} fit in {limit}", size, budget)
    return Placement("stream", device, f"{words} exceed {limit}", size, budget)


def activation_bytes(config, seqlen: int, element_size: int, windows: int = 1) -> int:
    """Rough autograd working set of ``windows`` windows through the whole model (saved activations of every
    block plus the fp32 logits and their gradient). A heuristic for placement decisions only."""
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = config.num_hidden_layers
    per_token = layers * (12 * hidden + 5 * inter) * element_size + config.vocab_size * (element_size + 8)
    return windows * seqlen * per_token


@contextlib.contextmanager
def memory_cap(device: torch.device, max_gpu_memory: float | None) -> Iterator[None]:
    """Cap PyTorch's CUDA allocator at ``max_gpu_memory`` GiB for the duration (a no-op elsewhere): a cap smaller
    than the model then really holds, and exceeding it is an out-of-memory error instead of a silent overrun."""
    if max_gpu_memory is None or torch.device(device).type != "cuda":
        yield
        return
    device = normalized(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_gpu_memory * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# ------------------------------------------------------------------------------------------ working sets
def logits_bytes(config, seqlen: int) -> int:
    """One window's fp32 logits and their softmax (the evaluation's working set beside the weights)."""
    return 2 * seqlen * config.vocab_size * 4


def engine_bytes(config, windows: int, seqlen: int, element_size: int, widest: int, eval_seqlen: int | None) -> int:
    """The layer-by-layer engine beside the weights: block inputs and outputs of every calibration window, one
    linear's fp32 Hessian and its factor, and (when evaluating) one window's logits."""
    hidden = 2 * windows * seqlen * config.hidden_size * element_size
    logits = logits_bytes(config, eval_seqlen) if eval_seqlen else 0
    return hidden + 3 * 4 * widest**2 + logits


def gradient_bytes(config, target_numel: int, sums: int, seqlen: int, element_size: int,
                   checkpointing: bool) -> int:
    """The in-memory gradient pass beside the weights: ``sums`` fp32 reductions of every target weight and the
    autograd activations of one window (with checkpointing: block inputs plus one block's)."""
    activations = activation_bytes(config, seqlen, element_size)
    if checkpointing:
        layers = max(1, config.num_hidden_layers)
        activations = activations // layers + layers * seqlen * config.hidden_size * element_size
    return 4 * sums * target_numel + activations


def hvp_bytes(config, target_numel: int, sums: int, seqlen: int, upcast_bytes: int) -> int:
    """The in-memory HVP pass beside the weights: the fp32 copy of a half-precision model (``upcast_bytes``),
    fp32 sums per target weight, one window's block inputs and tangents, one block's second-order graph and the
    logits' (fp32)."""
    layers = max(1, config.num_hidden_layers)
    states = 2 * layers * seqlen * config.hidden_size * 4
    graphs = 3 * activation_bytes(config, seqlen, 4) // layers + 3 * seqlen * config.vocab_size * 4
    return upcast_bytes + 4 * sums * target_numel + states + graphs


def training_bytes(config, model_bytes_fp32: int, trained_numel: int, batch: int, seqlen: int,
                   checkpointing: bool, teacher_bytes: int = 0, loss_chunk: int = 128) -> int:
    """Recovery on the device: the student in fp32, a gradient and two AdamW moments per trained parameter, the
    autograd activations of one batch (with checkpointing: block inputs plus one block's), the teacher's fp32
    logits of one batch and a few chunks' worth of the student's (the loss is made ``loss_chunk`` positions at a
    time, ``recover.head_kl``; the whole-logits fallback, for a head it cannot reproduce, needs two batches'
    more), and the teacher when it sits on the device too. The held-out targets wait in CPU memory."""
    activations = activation_bytes(config, seqlen, 4, batch)
    if checkpointing:
        layers = max(1, config.num_hidden_layers)
        activations = activations // layers + batch * layers * seqlen * config.hidden_size * 4
    logits = (batch * seqlen + 4 * loss_chunk) * config.vocab_size * 4
    return model_bytes_fp32 + 12 * trained_numel + activations + logits + teacher_bytes
