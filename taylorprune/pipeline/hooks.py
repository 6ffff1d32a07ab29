"""Progress callbacks a front end (the CLI, a sweep) plugs into a run, and the phase the run is in."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Hooks:
    """Callbacks (all optional) and what the run reports back: ``current`` phase, ``events`` (cache hits...)."""

    phase: Callable[[str], None] = lambda name: None
    task: Callable[[str, int], Callable[[int], None]] = lambda name, total: (lambda i: None)
    windows: Callable[[int, int], None] | None = None
    events: list[str] = field(default_factory=list)
    current: str = "starting"  # named in out-of-memory and disk-full messages
    memory_hints: list[str] = field(default_factory=list)  # options of the run that lower peak memory

    @contextlib.contextmanager
    def timed(self, phases: dict[str, float], key: str, label: str) -> Iterator[None]:
        """Announce, time and remember a phase."""
        self.current = label
        self.phase(label)
        t0 = time.perf_counter()
        yield
        phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0
