"""How fast recovery trains against a plain forward of the student, and the CPU threads it trains with.

A training step is the student's forward and backward plus, on a window's first visit, the teacher's forward:
about 4 plain forwards of the batch with blocked attention (5 with SDPA whole), so recovery's tokens/s is judged
against a plain forward's, timed in the same process on a batch of the same shape (the report's
``forward_tokens_per_s`` and their ratio).

Threads: on a CPU shared with other processes, PyTorch's intra-op threads wait for each other at every parallel
region, and a thread that lost its core stalls them all. On the 2-core machine the benchmarks run on, with other
jobs running, a forward and backward of stories260K on 4 × 512 tokens took 7.0 s with 2 threads and 0.62 s with
1 (fused AdamW alone: 120 ms against 0.2 ms). So on a CPU ``Pace`` times a plain forward of one window with
torch's thread count and with one thread, before training and again at every held-out evaluation (the load of a
shared machine changes: a run that chose 2 threads in a quiet minute fell to 0.49 steps/s when the load came
back, against 2.5 with one), and trains with one unless more are clearly faster (``MARGIN``): a single thread
loses at most the parallel speed-up when the machine is quiet, while more threads can lose far more when it is
not. An explicit ``OMP_NUM_THREADS`` is the user's choice and is kept. The weights do not depend on
the choice (1 and 2 threads trained identical weights; reductions may differ in the last bits of the reported KL).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from taylorprune.modeling.attention import implementation, using

MARGIN = 1.25  # more threads must be this much faster than one to be chosen
REPEATS = 2  # timed forwards, after one warm-up


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = REPEATS, warm: bool = True
          ) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn``, after one warm-up call (kernels, allocator, caches) if ``warm``."""
    if warm:
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """What training runs under: bf16 autocast on a GPU (fp32 master weights), nothing on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def plain_forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    """One plain forward of ``model`` on ``ids`` (``autocast`` as in training): logits, no gradient, no cache, with
    the attention ``model`` has now, even where training switches to blocked attention (``modeling.attention``):
    the baseline is the model's forward as users run it."""
    own = implementation(model)

    def run() -> object:
        with torch.no_grad(), autocast(ids.device), using(model, own):
            return model(input_ids=ids, use_cache=False).logits

    return run


class Pace:
    """Thread choices and plain-forward timings, before training and beside each held-out evaluation (``sample``:
    the threads chosen again, since a shared machine's load changes, then one forward timed; their time is not the
    training's), so the ratio compares the two under the same load."""

    def __init__(self, forward: Callable[[], object], probe: Callable[[], object], device: torch.device) -> None:
        self.forward, self.probe, self.device = forward, probe, device
        self.most = torch.get_num_threads()
        self.adapts = device.type == "cpu" and self.most > 1 and "OMP_NUM_THREADS" not in os.environ
        self.seconds: list[float] = []
        self.chosen: list[int] = []
        self.excluded = 0.0

    def choose(self) -> None:
        """One thread unless torch's count runs the probe ``MARGIN`` faster."""
        if self.adapts:
            torch.set_num_threads(self.most)
            many = min(timed(self.probe, self.device))
            torch.set_num_threads(1)
            if min(timed(self.probe, self.device)) > MARGIN * many:
                torch.set_num_threads(self.most)
        self.chosen.append(torch.get_num_threads())

    def sample(self, repeats: int = 1, warm: bool = False) -> None:
        start = time.perf_counter()
        self.choose()
        self.seconds += timed(self.forward, self.device, repeats=repeats, warm=warm)
        self.excluded += time.perf_counter() - start

    def record(self, seconds: float, steps: int, tokens: int, batch_tokens: int) -> dict:
        """The report's speed fields: recovery steps/s and tokens/s (``seconds`` less the samples' time), a plain
        forward's tokens/s (median), their ratio, and the threads chosen (the most frequent, and each choice)."""
        seconds -= self.excluded
        forward_tps = batch_tokens / statistics.median(self.seconds)
        tps = tokens / seconds
        return {"seconds": seconds, "steps_per_s": steps / seconds, "tokens_per_s": tps,
                "forward_tokens_per_s": forward_tps, "tokens_per_s_vs_forward": tps / forward_tps,
                "forward_timings": len(self.seconds), "threads": statistics.mode(self.chosen),
                "thread_choices": self.chosen}


@contextlib.contextmanager
def threads(forward: Callable[[], object], probe: Callable[[], object], device: torch.device) -> Iterator[Pace]:
    """A ``Pace`` whose thread choices hold until the context ends (torch's count restored then): ``probe`` is a
    plain forward of one window (a quarter of the batch's cost), ``forward`` one of the batch."""
    clock = Pace(forward, probe, device)
    try:
        clock.sample(repeats=REPEATS, warm=True)
        clock.excluded = 0.0  # taken before the training's clock starts
        yield clock
    finally:
        torch.set_num_threads(clock.most)
