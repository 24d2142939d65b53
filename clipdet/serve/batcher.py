"""Micro-batching: gather items from concurrent requests into model batches.

Each request awaits `MicroBatcher.submit(item)`. One collector task takes the first waiting item,
then keeps taking until the batch holds `max_batch` items or `max_wait_ms` have passed, and runs
`fn(batch)` on the model executor (one thread). While a batch runs, new items queue up and form
the next batch, so under load batches fill up on their own and the model never idles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor


class MicroBatcher:
    """Collects submitted items into batches for `fn(list) -> list` (same length, same order)."""

    def __init__(self, fn: Callable[[list], list], executor: Executor, max_batch: int = 32,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait = int(max_batch), max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="clipdet-batcher")

    async def stop(self) -> None:
        """Stop collecting; items still queued get a RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))

    async def submit(self, item):
        """Queue `item` and wait for its result."""
        if self._queue is None or self._task is None:
            raise RuntimeError("batcher not started")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def submit_many(self, items: list) -> list:
        """Queue several items at once (one request's files) and wait for all their results."""
        return list(await asyncio.gather(*(self.submit(x) for x in items)))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            batch = [await q.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if q.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(q.get(), left))
                    except asyncio.TimeoutError:
                        break
                else:
                    batch.append(q.get_nowait())
            batch = [(x, f) for x, f in batch if not f.cancelled()]  # the client went away
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [x for x, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - t0)
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)
