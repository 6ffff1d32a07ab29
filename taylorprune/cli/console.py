"""Console helpers of every command: one-line errors with exit codes, signals, progress bars.

Every user-fixable problem ends as one line on stderr and exit code 2 (run failures: 1, interruption:
130), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from taylorprune import distributed
from taylorprune.errors import RunError, UserError
from taylorprune.pipeline.hooks import Hooks

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int) -> None:
    world = distributed.world()
    who = escape(f"[rank {world.rank}] ") if world.rank else ""
    err.quiet = False  # other ranks of a data-parallel run are quiet, but not about their own failure
    err.print(f"{who}[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def join_world() -> None:
    """Join the data-parallel run a launcher started (one line and exit 1 when that fails); ranks other than 0
    print nothing but their own errors."""
    try:
        world = distributed.init()
    except Exception as exc:  # rendezvous refused, unreachable, timed out; before any command runs: plain exit
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            fail(f"could not join the data-parallel run (WORLD_SIZE={os.environ.get('WORLD_SIZE')}): {detail}", 1)
        except typer.Exit as done:
            raise SystemExit(done.exit_code) from None
    if not world.writer:
        out.quiet = err.quiet = True


def _sigterm(_signum, _frame) -> None:
    raise KeyboardInterrupt


class Session:
    """What a guarded command is doing: the hooks it made, whose ``current`` phase errors name."""

    def __init__(self) -> None:
        self.made: list[Hooks] = []

    def hooks(self, bar: Progress) -> Hooks:
        made = progress_hooks(bar)
        self.made.append(made)
        return made

    def remember(self, hooks: Hooks) -> Hooks:
        self.made.append(hooks)
        return hooks

    @property
    def phase(self) -> str:
        return self.made[-1].current if self.made else "starting"

    def memory_advice(self, last: str) -> str:
        hints = self.made[-1].memory_hints if self.made else []
        return f"lower --nsamples, --seqlen or --batch-size, {''.join(h + ', ' for h in hints)}or {last}"


@contextlib.contextmanager
def guarded() -> Iterator[Session]:
    """Turn known failures into one line and an exit code; SIGTERM behaves like Ctrl-C (cleanup runs)."""
    # Install both explicitly: a process started in the background inherits SIGINT as ignored.
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, _sigterm), (signal.SIGINT, signal.default_int_handler))}
    session = Session()
    try:
        yield session
    except UserError as exc:
        fail(str(exc), 2)
    except RunError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written to the output path", 130)
    except MemoryError:
        fail(f"out of memory while {session.phase}; {session.memory_advice('--dtype bfloat16')}", 1)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            fail(f"disk full while {session.phase}; nothing was written to the output path", 1)
        if os.environ.get("TAYLORPRUNE_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        user = isinstance(exc, PermissionError | IsADirectoryError | NotADirectoryError | FileNotFoundError)
        fail(f"{where}{exc.strerror or exc} while {session.phase}", 2 if user else 1)
    except Exception as exc:
        if _peer_failure(exc):
            fail(f"another process of the data-parallel run failed or stopped while {session.phase}; nothing was "
                 "written to the output path", 1)
        if type(exc).__name__ == "OutOfMemoryError":
            fail(f"CUDA out of memory while {session.phase}; {session.memory_advice('--stream')}", 1)
        if os.environ.get("TAYLORPRUNE_DEBUG"):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(f"unexpected {type(exc).__name__} while {session.phase}: {detail} (set TAYLORPRUNE_DEBUG=1 for the "
             "traceback)", 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out")


def _peer_failure(exc: Exception) -> bool:
    """Whether ``exc`` is a collective of a data-parallel run that failed because another rank is gone."""
    if not distributed.world().active:
        return False
    return type(exc).__name__.startswith("Dist") or any(s in str(exc) for s in PEER_GONE)


class Rate(ProgressColumn):
    """Units per second of a task (tokens/s while generating calibration text, steps/s while recovering)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        return Text(f"{speed:,.0f}/s" if speed >= 10 else f"{speed:.2f}/s", style="progress.data.speed")


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
        console=err, transient=True,
    )


def progress_hooks(bar: Progress) -> Hooks:
    state: dict[str, object] = {}

    def phase(name: str) -> None:
        err.print(f"[dim]•[/] {name}", highlight=False)

    def task(name: str, total: int) -> Callable[[int], None]:
        handle = bar.add_task(name, total=total)
        if err.is_terminal:
            return lambda i: bar.update(handle, completed=i + 1)
        start, every = time.perf_counter(), max(1, total // 10)

        def logged(i: int) -> None:  # no live bar off a terminal (a CI log): a line every tenth of the way
            bar.update(handle, completed=i + 1)
            if (i + 1) % every == 0 or i + 1 == total:
                err.print(f"  {name}: {i + 1}/{total} ({time.perf_counter() - start:.1f} s)", highlight=False)

        return logged

    def windows(i: int, total: int) -> None:
        if "eval" not in state:
            state["eval"] = bar.add_task("evaluating windows", total=total)
        bar.update(state["eval"], completed=i)

    return Hooks(phase=phase, task=task, windows=windows)
