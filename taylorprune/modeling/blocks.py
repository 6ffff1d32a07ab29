"""Run a decoder stack one block at a time on captured hidden states.

The block inputs (hidden states of block 0 and, for every block, the keyword arguments the model passes
it: attention mask, ``position_embeddings``, ``position_ids``...) are recorded by temporarily replacing each
block's ``forward`` with a pass-through recorder and running the model's own base forward. This reuses the
model's own mask and rotary code (so sliding-window / per-layer-type masks and GQA work unchanged) and
costs only the embedding. The KV cache is dropped from the recorded arguments and ``use_cache`` forced off,
so no call ever sees keys left by another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from taylorprune.modeling.layout import Layout, Target
from taylorprune.modeling.streaming import Streamer

_DROP = {"cache", "past_key_values", "past_key_value"}


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


@contextlib.contextmanager
def patched_forwards(blocks: nn.ModuleList, forwards: list) -> Iterator[None]:
    """Give each block an instance ``forward`` for the duration; whatever was there before comes back."""
    saved = [blk.__dict__.get("forward") for blk in blocks]
    for blk, forward in zip(blocks, forwards, strict=True):
        blk.forward = forward
    try:
        yield
    finally:
        for blk, old in zip(blocks, saved, strict=True):
            if old is None:
                del blk.forward
            else:
                blk.forward = old


class BlockRunner:
    """Captures block inputs for a batch of token windows and runs single blocks over them.

    ``stream``: the runner places modules itself (``Streamer``): each block visits the compute device while it
    is used (a no-op for a block already there, e.g. a resident model) and the next block's copy starts while
    the current one computes. Without it (an accelerate device map, or a caller that placed the model) nothing
    is moved. ``dtype``: the dtype streamed modules compute in (fp32 HVPs of a half-precision model stored on
    the CPU: the stored weights stay untouched).
    """

    def __init__(self, model: nn.Module, layout: Layout, device: torch.device, batch_size: int = 1,
                 stream: bool | None = None, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.layout = layout
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        # Without an accelerate device map the model lives on the CPU and blocks are streamed to the device,
        # unless the caller already placed the whole model there (stream=False).
        if stream is None:
            stream = self.device.type != "cpu" and not getattr(model, "hf_device_map", None)
        self.stream = stream
        self.dtype = dtype if stream else None
        self.streamer = Streamer(self.device) if stream else None
        self.block_kwargs: list[dict] = [{} for _ in layout.blocks]

    # -- capture ------------------------------------------------------------------------------------
    def _recorder(self, i: int, sink: list[torch.Tensor]):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                sink.append(hidden_states.detach())
            if not self.block_kwargs[i]:
                clean = {k: _detach(v) for k, v in kwargs.items() if k not in _DROP}
                clean["use_cache"] = False
                self.block_kwargs[i] = clean
            return hidden_states

        return forward

    def _recording(self, sink: list[torch.Tensor]):
        blocks = self.layout.blocks
        return patched_forwards(blocks, [self._recorder(i, sink) for i in range(len(blocks))])

    def _non_block_modules(self, head: bool = False) -> list[nn.Module]:
        """Modules outside the decoder blocks: the base model's (embeddings, rotary, final norm), and with
        ``head`` also those of the outer model (the LM head)."""
        base = self.model.base_model
        inner = [m for m in base.children() if m is not self.layout.blocks]
        if not head or base is self.model:
            return inner
        return inner + [m for m in self.model.children() if m is not base]

    @contextlib.contextmanager
    def outside_on_device(self, head: bool = False) -> Iterator[None]:
        """Everything outside the blocks (``head``: the LM head too) on the compute device, read-only."""
        if not self.stream:
            yield
            return
        with self.streamer.hold(nn.ModuleList(self._non_block_modules(head)), self.dtype, write=False):
            yield

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return block-0 inputs [n, seqlen, hidden] on the compute device; record every block's kwargs."""
        sink: list[torch.Tensor] = []
        self.block_kwargs = [{} for _ in self.layout.blocks]
        with self.outside_on_device(), self._recording(sink):
            # The first window alone: recorded masks then have batch 1 and broadcast over any batch.
            chunks = [input_ids[:1]] + list(input_ids[1:].split(self.batch_size))
            for chunk in chunks:
                if chunk.numel():
                    self.model.base_model(input_ids=chunk.to(self.input_device), use_cache=False)
        return torch.cat(sink).to(self.device)

    @property
    def input_device(self) -> torch.device:
        if self.stream:
            return self.device
        return self.model.get_input_embeddings().weight.device

    # -- running blocks ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def on_device(self, i: int, write: bool = True, prefetch: int | None = -1) -> Iterator[nn.Module]:
        """Block ``i`` on the compute device for the duration (streamed back to CPU afterwards).

        ``write``: copy the block's weights back (they were changed); ``prefetch``: the block visited next, whose
        copy starts now (default ``i + 1``; None: none).
        """
        block = self.layout.blocks[i]
        if not self.stream:
            yield block
            return
        nxt = i + 1 if prefetch == -1 else prefetch
        after = self.layout.blocks[nxt] if nxt is not None and 0 <= nxt < len(self.layout.blocks) else None
        with self.streamer.hold(block, self.dtype, write=write, prefetch=after):
            yield block

    def call(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """One forward of block ``i`` on a batch of hidden states (autograd follows the caller's mode)."""
        out = self.layout.blocks[i](hidden, **self.block_kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Outputs of block ``i`` for all windows, batched; the block must already be on its device."""
        outs = [self.call(i, chunk).to(hidden.device) for chunk in hidden.split(self.batch_size)]
        return torch.cat(outs)

    def head(self, ids: torch.Tensor, hidden: torch.Tensor, labels: bool = False, **kwargs):
        """The model's own output for windows ``ids`` whose last block returned ``hidden``: every block passes
        ``hidden`` through, so the final norm, LM head, soft-capping and loss are the model's code. Use inside
        ``outside_on_device(head=True)``; ``labels``: the output carries the causal-LM loss (labels = ids)."""
        blocks = self.layout.blocks
        ids = ids.to(self.input_device)
        extra = {"labels": ids} if labels else {}
        with patched_forwards(blocks, [lambda *a, **k: hidden] * len(blocks)):
            return self.model(input_ids=ids, use_cache=False, **extra, **kwargs)


def block_function(block: nn.Module, targets: list[Target], kwargs: dict) -> Callable[..., torch.Tensor]:
    """Block output as a function of (hidden states, *target weights), for ``torch.func`` transforms."""
    inside = {id(m): n for n, m in block.named_modules()}
    names = [f"{inside[id(t.module)]}.weight" for t in targets]

    def f(hidden: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        out = functional_call(block, dict(zip(names, weights, strict=True)), (hidden,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    return f
