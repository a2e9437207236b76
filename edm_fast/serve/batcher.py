"""An asyncio batcher: requests' seeds -> batches of one plan, run one at a time off the loop.

Fairness: jobs wait in one queue, in service order. A batch takes the plan key (steps, solver,
guidance) of the job at the head, waits until ``max_batch`` seeds of that key are pending or the
head has waited ``max_wait_ms``, then takes seeds of that key in queue order: at most
``max_batch``, and at most ``max_batch_cost`` rows x evaluations. When the batch ends, each job
with seeds left goes to the back of the queue, behind the jobs that arrived meanwhile. So a large
request is split into batches interleaved with the others, and a small one waits for the running
batch plus one batch per job ahead of it. One worker thread runs the batches (one device).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

__all__ = ["BatchFailed", "Batcher", "Busy", "Job"]

log = logging.getLogger("edm_fast.serve")


class Busy(Exception):
    """The queue cannot take the job's seeds now, or the server is shutting down: retry later."""


class BatchFailed(RuntimeError):
    """Sampling failed (the batch's jobs only), or the batcher stopped (a bug)."""


class Job:
    """One request: ``future`` gets its rows in seed order. ``cost``: rows x evaluations per
    seed; ``plan``: what ``run_batch`` receives; ``taken``: seeds handed to batches so far."""

    def __init__(self, key: tuple, seeds: list, labels: list, cost: int, plan=None):
        self.key, self.seeds, self.labels, self.cost, self.plan = key, seeds, labels, cost, plan
        self.created, self.taken, self.rows = time.monotonic(), 0, [None] * len(seeds)
        self.future = asyncio.get_running_loop().create_future()


class Batcher:
    """``run_batch(plan, seeds, labels) -> rows`` runs in one worker thread."""

    def __init__(self, run_batch, *, max_batch: int, max_wait_ms: float, max_queue: int,
                 max_batch_cost: int, on_batch=None):
        self.run_batch, self.on_batch = run_batch, on_batch or (lambda rows, seconds: None)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1e3
        self.max_queue, self.max_batch_cost = max_queue, max_batch_cost
        self.jobs: deque[Job] = deque()
        self.queued = 0  # seeds not yet in a batch
        self.failure: str | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edm-fast-batch")
        self._wake, self._stopping = asyncio.Event(), False
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, job: Job) -> None:
        if self.failure is not None:
            raise BatchFailed(f"internal error: the batcher stopped ({self.failure}); restart "
                              "the server")
        if self._stopping:
            raise Busy("the server is shutting down")
        if self.queued + len(job.seeds) > self.max_queue:
            raise Busy(f"server busy: {self.queued} images queued (limit {self.max_queue}); "
                       "retry later")
        self.jobs.append(job)
        self.queued += len(job.seeds)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """Drop the job's seeds not yet in a batch; rows of a running batch are discarded."""
        if not job.future.done():
            job.future.cancel()
        if job in self.jobs:
            self.jobs.remove(job)
            self.queued -= len(job.seeds) - job.taken

    async def stop(self) -> None:
        """Finish the running batch, fail the queued jobs (Busy), stop the worker."""
        self._stopping = True
        self._wake.set()
        await asyncio.shield(self._task)
        self._pool.shutdown(wait=True)

    async def _loop(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                if not self.jobs:
                    await self._wake.wait()
                    continue
                head = self.jobs[0]
                limit = min(self.max_batch, max(1, self.max_batch_cost // head.cost))
                left = head.created + self.max_wait - time.monotonic()
                if self._pending(head.key) < limit and left > 0:  # wait for more, then look again
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
                    continue
                await self._run(self._take(head.key, limit))
        except Exception as exc:  # a bug: say so (healthz, 500s), never hang
            log.exception("the batcher stopped")
            self.failure = f"{type(exc).__name__}: {exc}"
        self._fail(self.jobs, Busy("the server shut down before this request ran")
                   if self.failure is None else
                   BatchFailed(f"internal error: the batcher stopped ({self.failure})"))

    def _pending(self, key) -> int:
        return sum(len(j.seeds) - j.taken for j in self.jobs if j.key == key)

    def _take(self, key, limit: int) -> list[tuple[Job, int]]:
        items = []
        for job in [j for j in self.jobs if j.key == key]:
            k = min(len(job.seeds) - job.taken, limit - len(items))
            items += [(job, i) for i in range(job.taken, job.taken + k)]
            job.taken += k
            if job.taken == len(job.seeds):
                self.jobs.remove(job)
        self.queued -= len(items)
        return items

    def _fail(self, jobs, exc: Exception) -> None:
        for job in list(jobs):
            if not job.future.done():
                job.future.set_exception(exc)
            self.cancel(job)

    async def _run(self, items: list[tuple[Job, int]]) -> None:
        start, jobs = time.perf_counter(), list(dict.fromkeys(job for job, _ in items))
        try:
            rows = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.run_batch, items[0][0].plan, [j.seeds[i] for j, i in items],
                [j.labels[i] for j, i in items])
        except Exception as exc:  # a failing batch fails its jobs, not the batcher
            log.exception("sampling failed")
            return self._fail(jobs, BatchFailed(f"sampling failed: {type(exc).__name__}: {exc}"))
        self.on_batch(len(items), time.perf_counter() - start)
        for row, (job, i) in zip(rows, items):
            job.rows[i] = row
        for job in jobs:
            if job in self.jobs:  # seeds left: to the back of the queue
                self.jobs.remove(job)
                self.jobs.append(job)
            elif not job.future.done():  # all taken, and batches run one at a time: all rows
                job.future.set_result(job.rows)
