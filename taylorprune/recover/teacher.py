"""The teacher's side of distillation: its targets for a batch of windows, with the final hidden states of the
training windows kept, so that a window's second visit costs the teacher only its LM head.

Recovery passes over its windows up to twice (the issue's cap), and on a window's second visit the teacher's
decoder would compute what it computed on the first. ``TargetCache`` keeps each training window's final hidden
states (after the final norm) in CPU memory, in the teacher's dtype, while they fit in ``CACHE_BYTES``, and makes
the logits again from them through the teacher's head (the LM head, then any final soft-capping), a chunk of
positions at a time as the loss asks for them (``head_kl.Targets``): on SmolLM2-135M
the decoder is ~80% of the teacher's forward. The cache checks itself on its first batch: if the head applied to
the final hidden states does not give the model's own logits (an architecture that scales or caps them in a way
``head`` does not know), it switches itself off and every batch runs the whole teacher. Only a resident teacher
offers ``last`` and ``head`` (a streamed one recomputes every batch), and the hidden-state term
(``--recover-hidden``) always runs the whole teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune.recover.head_kl import Targets, lm_head

CACHE_BYTES = 4 * 2**30
CHECK = 64  # positions the cache's head is checked on
Outputs = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # ids -> (logits, last hidden or None)


@dataclass
class Teacher:
    """The dense model as distillation sees it: its outputs for windows, and optionally its final hidden states and
    the head that turns them into logits (both or neither)."""

    outputs: Outputs
    last: Callable[[torch.Tensor], torch.Tensor] | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    model: nn.Module | None = None  # a resident teacher's model (its attention implementation can be switched)


def pair(out, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, last hidden states or None) of a causal LM's output: what the KL and the hidden term compare."""
    return out.logits, (out.hidden_states[-1] if hidden else None)


def model_outputs(model: nn.Module, ids: torch.Tensor, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of a whole model (teacher or student) as ``pair``."""
    return pair(model(input_ids=ids, use_cache=False, output_hidden_states=hidden), hidden)


def resident(model: nn.Module, hidden: bool) -> Teacher:
    """A teacher held whole on the device: one forward for the outputs; the decoder and the head apart for the
    cache."""

    def outputs(ids: torch.Tensor):
        return model_outputs(model, ids, hidden)

    def last(ids: torch.Tensor) -> torch.Tensor:
        return model.base_model(input_ids=ids, use_cache=False).last_hidden_state

    return Teacher(outputs, last, lm_head(model), model)


class TargetCache:
    """The teacher's targets for training windows, by window index; see the module docstring."""

    def __init__(self, teacher: Teacher, windows: int, window_bytes: int, hidden: bool) -> None:
        self.teacher = teacher
        self.on = (not hidden and teacher.last is not None and teacher.head is not None
                   and windows * window_bytes <= CACHE_BYTES)
        self.store: dict[int, torch.Tensor] = {}
        self.hits, self.checked = 0, False

    def __call__(self, ids: torch.Tensor, keys: list[int]) -> tuple[Targets, torch.Tensor | None]:
        if not self.on:
            logits, last = self.teacher.outputs(ids)
            return Targets(logits), last
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            states = self.teacher.last(ids[missing]).to("cpu", copy=True)  # one copy (one sync on a GPU)
            for i, row in zip(missing, states.unbind(), strict=True):
                self.store[keys[i]] = row
        self.hits += len(keys) - len(missing)
        targets = Targets(torch.stack([self.store[k] for k in keys]).to(ids.device), self.teacher.head)
        if not self.checked:
            self.checked = True
            if not self._head_is_the_models(ids, targets.source):
                self.on, self.store = False, {}
                return Targets(self.teacher.outputs(ids)[0]), None
        return targets, None

    def _head_is_the_models(self, ids: torch.Tensor, states: torch.Tensor) -> bool:
        """Whether the head on the kept states gives the teacher's own logits: checked on the first ``CHECK``
        positions of one window (a causal model's prefix is computed alike), not a whole batch's teacher run."""
        short = min(CHECK, ids.shape[1])
        whole = self.teacher.outputs(ids[:1, :short])[0]
        return bool((whole - self.teacher.head(states[:1, :short])).abs().max() <= 0.01 * whole.abs().max())

    def record(self) -> dict | None:
        """What the report says: windows kept and batches' windows served from them (None: the cache was off)."""
        return {"windows": len(self.store), "hits": self.hits} if self.on else None
