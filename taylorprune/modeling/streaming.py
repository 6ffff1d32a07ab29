"""How decoder blocks (or any module) visit the compute device while their weights live in CPU memory.

``Streamer`` moves a module's tensors to the device for the duration of a use and puts the CPU tensors back
afterwards (copying results back only where the caller changed the weights). On CUDA the next block is copied
while the current one computes: a worker thread pins its CPU tensors (once: the pinned copy becomes the
block's CPU tensor) and issues non-blocking copies on a side stream; the compute stream waits on an event
before using them. Every tensor identity stays: parameters keep their ``nn.Parameter`` objects (hooks,
``requires_grad`` and optimizers see the same objects), only their ``.data`` is swapped, as ``Module.to`` does.
``moved`` is the simple form: a module on a device / in a dtype for the duration, then back as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune.modeling.placement import normalized


@contextlib.contextmanager
def kept_buffers(module: nn.Module) -> Iterator[None]:
    """Put every buffer back as it was when the block exits. ``module.to(float32)`` then ``.to(bfloat16)``
    restores half-precision weights exactly but rounds buffers that were fp32 all along (rotary ``inv_freq``),
    which would change every later forward."""
    saved = [(sub, name, b) for sub in module.modules() for name, b in sub._buffers.items() if b is not None]
    try:
        yield
    finally:
        for sub, name, b in saved:
            if sub._buffers.get(name) is not b:
                sub._buffers[name] = b.to(sub._buffers[name].device) if sub._buffers.get(name) is not None else b


@contextlib.contextmanager
def moved(module: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Iterator[None]:
    """``module`` on ``device`` and in ``dtype`` for the duration (None: unchanged), then back where and as it was:
    half-precision weights come back exactly from fp32, buffers are restored as they were (``kept_buffers``)."""
    first = next(module.parameters())
    home, home_dtype = first.device, first.dtype
    with kept_buffers(module):
        try:
            if device is not None:
                module.to(device)
            if dtype is not None:
                module.to(dtype)
            yield
        finally:
            if dtype is not None:
                module.to(home_dtype)
            if device is not None:
                module.to(home)


# ------------------------------------------------------------------------------------------------ streaming
@dataclass(frozen=True)
class _Slot:
    """One tensor entry of a module: a parameter (swapped through ``.data``) or a buffer (swapped in place)."""

    owner: nn.Module
    name: str
    param: bool

    def get(self) -> torch.Tensor:
        return self.owner._parameters[self.name].data if self.param else self.owner._buffers[self.name]

    def set(self, value: torch.Tensor) -> None:
        if self.param:
            self.owner._parameters[self.name].data = value
        else:
            self.owner._buffers[self.name] = value


def _slots(module: nn.Module) -> list[_Slot]:
    out, params = [], set()
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and id(p) not in params and not p.is_meta:
                params.add(id(p))
                out.append(_Slot(sub, name, True))
        out.extend(_Slot(sub, name, False) for name, b in sub._buffers.items() if b is not None and not b.is_meta)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of a CPU tensor (what makes host-to-device copies asynchronous), or ``t`` itself when
    pinning is impossible (no CUDA, page-lock limit)."""
    try:
        return t.pin_memory()
    except RuntimeError:
        return t


@dataclass
class _Staged:
    """Device copies of a module's tensors: {home storage pointer: (source, copy)}, and when they are ready."""

    dtype: torch.dtype | None
    copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]]
    event: object = None


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape))


class Streamer:
    """Holds modules on the compute device for the duration of a use; prefetches the next one.

    ``hold(module, dtype, write, prefetch)``: the module's tensors on ``device`` (floating ones in ``dtype`` when
    given) inside the block; afterwards the CPU tensors come back, updated from the device copies when ``write``
    (the engine prunes in place) and untouched otherwise (read-only passes, upcasts for fp32 HVPs: casting back
    is then unnecessary, the originals are restored bit for bit). A tensor already on the device in the right
    dtype is used as is (a resident model costs nothing). ``prefetch``: a module whose copies start now, to be
    held next. ``asynchronous`` (default: on CUDA) stages copies in a worker thread; elsewhere they are made
    when needed (the same bookkeeping, so it is tested on the CPU).
    """

    def __init__(self, device: torch.device | str, asynchronous: bool | None = None, pin: bool | None = None):
        self.device = normalized(device)
        self.cuda = self.device.type == "cuda"
        self.asynchronous = self.cuda if asynchronous is None else asynchronous
        self.pin = self.cuda if pin is None else pin
        self._pool: ThreadPoolExecutor | None = None
        self._side = None
        self._staged: dict[int, Future] = {}
        self._held: set[int] = set()
        self.log: list[tuple[str, int]] = []  # ("stage"|"hold"|"release"|"discard", id(module)), for tests

    # -- copies ----------------------------------------------------------------------------------
    def _needs_copy(self, t: torch.Tensor, dtype: torch.dtype | None) -> bool:
        return t.device != self.device or (dtype is not None and t.is_floating_point() and t.dtype != dtype)

    def _stream(self):
        if not self.cuda:
            return contextlib.nullcontext()
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._side)

    def _stage(self, homes: list[torch.Tensor], dtype: torch.dtype | None) -> _Staged:
        """Device copies of ``homes`` (run in the worker thread when asynchronous)."""
        copies = {}
        with torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext(), self._stream():
            for t in homes:
                src = _pinned(t) if self.pin and t.device.type == "cpu" and not t.is_pinned() else t
                cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
                copies[_key(t)] = (src, src.to(self.device, cast, non_blocking=self.cuda))
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self._side)
        return _Staged(dtype, copies, event)

    def _submit(self, module: nn.Module, dtype: torch.dtype | None) -> Future:
        homes = [s.get() for s in _slots(module)]
        homes = [t for t in homes if self._needs_copy(t, dtype)]
        self.log.append(("stage", id(module)))
        if self.asynchronous and homes:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taylorprune-prefetch")
            return self._pool.submit(self._stage, homes, dtype)
        done: Future = Future()
        done.set_result(self._stage(homes, dtype))
        return done

    def prefetch(self, module: nn.Module, dtype: torch.dtype | None = None) -> None:
        """Start copying ``module`` to the device (nothing when it is held or already staged)."""
        if id(module) in self._held or id(module) in self._staged:
            return
        self._staged[id(module)] = self._submit(module, dtype)

    def discard(self, module: nn.Module | None = None) -> None:
        """Drop staged copies (of ``module``, or all), waiting for copies still in flight."""
        keys = list(self._staged) if module is None else [id(module)]
        for key in keys:
            future = self._staged.pop(key, None)
            if future is not None:
                future.result()
                self.log.append(("discard", key))

    def _take(self, module: nn.Module, dtype: torch.dtype | None) -> _Staged:
        future = self._staged.pop(id(module), None)
        staged = future.result() if future is not None else None
        if staged is None or staged.dtype != dtype:
            if staged is not None:
                self.log.append(("discard", id(module)))
            staged = self._submit(module, dtype).result()
        if self.cuda and staged.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.event)
            for src, copy in staged.copies.values():
                if copy.is_cuda and not _same(src, copy):
                    copy.record_stream(current)
        return staged

    # -- holding ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, module: nn.Module, dtype: torch.dtype | None = None, write: bool = True,
             prefetch: nn.Module | None = None) -> Iterator[nn.Module]:
        """``module`` on the device (in ``dtype``) for the duration; see the class docstring."""
        if id(module) in self._held:  # nested use of a held module: it is already there
            yield module
            return
        slots = _slots(module)
        staged = self._take(module, dtype)
        homes = self._swap_in(slots, staged, dtype)
        self._held.add(id(module))
        self.log.append(("hold", id(module)))
        try:
            if prefetch is not None and prefetch is not module:
                self.prefetch(prefetch, dtype)
            yield module
        finally:
            self._swap_out(slots, homes, write)
            self._held.discard(id(module))
            self.log.append(("release", id(module)))

    def _swap_in(self, slots: list[_Slot], staged: _Staged, dtype: torch.dtype | None) -> list[torch.Tensor]:
        """Put device copies in place; return each slot's CPU tensor (its pinned copy when one was made)."""
        homes = []
        for slot in slots:
            home = slot.get()
            src, copy = staged.copies.get(_key(home), (home, None))
            if copy is None and self._needs_copy(home, dtype):  # changed since it was staged: copy it now
                cast = dtype if dtype is not None and home.is_floating_point() else home.dtype
                copy = home.to(self.device, cast)
            homes.append(src)
            if copy is not None:
                slot.set(copy)
            elif src is not home:
                slot.set(src)
        return homes

    @staticmethod
    def _swap_out(slots: list[_Slot], homes: list[torch.Tensor], write: bool) -> None:
        for slot, home in zip(slots, homes, strict=True):
            current = slot.get()
            if _same(current, home):
                continue
            if write:
                with torch.no_grad():
                    home.copy_(current)
            slot.set(home)

    def close(self) -> None:
        """Wait for and drop staged copies; stop the worker thread."""
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
