"""Requests that arrive together run together: the HTTP service's micro-batching.

Each request is one item; a forward over one item wastes most of an accelerator, so requests that
arrive within `wait_s` of the first waiting one (up to `max_batch`) are run as one batch by a single
worker thread, the pattern of inference servers (TorchServe's batch delay, Triton's dynamic
batching). Results go back to each request's own future, in its order.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class MicroBatcher:
    """Run `run(payloads) -> results` over the payloads submitted within `wait_s` of each other."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], *, max_batch: int, wait_s: float, name: str = "batcher"):
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and wait_s >= 0, got {max_batch} and {wait_s}")
        self.run, self.max_batch, self.wait_s = run, max_batch, wait_s
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name=name, daemon=True)
        self._worker.start()

    def submit(self, payload: Any) -> Future:
        future: Future = Future()
        self._queue.put((payload, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = [first], False
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if entry is None:
                    closing = True
                    break
                batch.append(entry)
            self._run(batch)
            if closing:
                return

    def _run(self, batch: list[tuple[Any, Future]]) -> None:
        """One batch; if it fails, each payload runs alone, so one bad request fails only itself."""
        try:
            results = self.run([payload for payload, _ in batch])
        except Exception as error:  # noqa: BLE001 - re-run alone below; each future gets its own outcome
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            for entry in batch:
                self._run([entry])
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)

