"""Worker processes that survive one of them dying: the image cache's chunks decoded in parallel.

A worker process can end without a word: the system kills it when memory runs out, or a decoder's C code crashes
on a damaged file (a JPEG 2000 or JPEG-LS codestream, say). ``multiprocessing.Pool`` then waits for the lost result
for ever, and ``concurrent.futures`` fails every job in flight. Here each worker holds one job at a time, so the
parent knows which job a dead worker held. That job is split into its images, each a job of its own, so the image
that ends its worker is found; an image that ends a worker twice is given up with the reason (the signal), and the
other images of its chunk are kept. A fresh worker takes the dead one's place.

Jobs are dataclasses with ``index`` (the chunk) and ``items`` (``(row, path)`` pairs); ``fn(job)`` returns
``(index, results)``, one result per item whose first element is its row.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

_ATTEMPTS = 2  # an image alone in a worker that ends it this many times is given up


def process_context() -> mp.context.BaseContext:
    """fork where it exists (workers start at once, a replacement for a dead one too; they run no code that shares
    a lock with the parent's threads, such as a progress bar's), else spawn."""
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")


def exit_text(exitcode: int | None) -> str:
    """How a worker process ended, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"killed by {name}: most often the system running out of memory"
        return f"crashed with {name}"
    return f"exited with code {exitcode}"


def _orphan_watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)  # the parent is gone (killed outright): its job's result has nowhere to go


def _serve(conn: Connection, parent: int, fn: Callable[[Any], Any]) -> None:
    """A worker: run each job the parent sends, until it sends None. A thread ends the worker within a second of
    the parent's death, also in the middle of a job."""
    threading.Thread(target=_orphan_watch, args=(parent,), daemon=True).start()
    try:
        while (job := conn.recv()) is not None:
            try:
                out = fn(job)
            except Exception:  # an error, not a death: the parent raises it
                out = _Failed(traceback.format_exc())
            conn.send(out)
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return  # Ctrl-C reaches the workers too; the parent reports it


@dataclasses.dataclass(frozen=True)
class _Failed:
    traceback: str


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, fn: Callable[[Any], Any]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, os.getpid(), fn), daemon=True)
        self.proc.start()
        child.close()
        self.job: Any = None

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        self.conn.close()


def _send(w: _Worker) -> None:
    try:
        w.conn.send(w.job)
    except (BrokenPipeError, OSError):
        pass  # it died meanwhile: the wait below sees it, and its job goes back in the queue


class WorkerPool:
    """``workers`` processes running ``fn`` on jobs, kept between :meth:`run` calls; a context manager."""

    def __init__(self, fn: Callable[[Any], tuple[int, list]], workers: int, ctx: mp.context.BaseContext):
        self.fn, self.workers, self.ctx = fn, max(1, workers), ctx
        self.pool: list[_Worker] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self.pool:
            w.stop()
        self.pool = []

    def run(self, jobs: Sequence[Any], finish: Callable[[int, list, dict[int, str]], None]) -> None:
        """Run ``jobs``; ``finish(index, results, ended)`` for each whole job, in the order they complete.
        ``ended`` maps the rows given up (each ended its worker twice, alone) to how the worker ended;
        ``results`` holds only the other rows, in row order. An error raised by ``fn`` is raised here."""
        queue: deque = deque(jobs)
        parts: dict[int, dict[int, Any]] = {}  # split jobs: row -> result so far
        sizes: dict[int, int] = {}
        ended: dict[int, dict[int, str]] = {}
        deaths: Counter = Counter()  # (job, row) -> how often that item, alone, ended its worker
        slots = max(1, min(self.workers, len(queue)))
        pool = self.pool
        try:
            while queue or any(w.job is not None for w in pool):
                for w in [w for w in pool if w.job is None and not w.proc.is_alive()]:
                    pool.remove(w)  # died idle (after sending its last result)
                    w.stop()
                for w in pool:
                    if w.job is None and queue:
                        w.job = queue.popleft()
                        _send(w)
                while len(pool) < slots and queue:
                    w = _Worker(self.ctx, self.fn)
                    w.job = queue.popleft()
                    _send(w)
                    pool.append(w)
                busy = [w for w in pool if w.job is not None]
                wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
                for w in busy:
                    result = None
                    if w.conn.poll():
                        try:
                            result = w.conn.recv()
                        except (EOFError, OSError):
                            result = None
                    if result is None and w.proc.is_alive():
                        continue  # still working
                    job, w.job = w.job, None
                    if isinstance(result, _Failed):
                        raise RuntimeError(f"a worker process failed:\n{result.traceback}")
                    if result is not None:
                        k, results = result
                        if k not in sizes:
                            finish(k, results, {})
                            continue
                        parts[k].update((r[0], r) for r in results)
                    else:  # the worker died holding ``job``
                        w.proc.join()
                        how = exit_text(w.proc.exitcode)
                        pool.remove(w)
                        w.conn.close()
                        k = job.index
                        if k not in sizes:  # a job: its items one by one, to find the one that ends a worker
                            sizes[k], parts[k], ended[k] = len(job.items), {}, {}
                            queue.extendleft(
                                dataclasses.replace(job, items=(item,)) for item in reversed(job.items)
                            )
                            continue
                        row = job.items[0][0]
                        deaths[k, row] += 1
                        if deaths[k, row] < _ATTEMPTS:
                            queue.appendleft(job)
                            continue
                        ended[k][row] = how
                    if len(parts[k]) + len(ended[k]) == sizes[k]:
                        finish(k, [parts[k][r] for r in sorted(parts[k])], ended.pop(k))
                        del parts[k], sizes[k]
        except BaseException:
            self.close()  # interrupted or failed: no worker is left holding a job
            raise


def run_jobs(
    jobs: Sequence[Any],
    fn: Callable[[Any], tuple[int, list]],
    workers: int,
    ctx: mp.context.BaseContext,
    finish: Callable[[int, list, dict[int, str]], None],
) -> None:
    """``jobs`` on a :class:`WorkerPool` of ``workers`` processes, closed at the end (see :meth:`WorkerPool.run`)."""
    with WorkerPool(fn, workers, ctx) as pool:
        pool.run(jobs, finish)
