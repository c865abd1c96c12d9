"""One daemon thread that runs every model call of the chat app in order: loading, turns, commands.

A daemon thread, so that the user can quit during a long download without waiting for it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


def warm_up_torch_threads() -> None:
    """Start torch's CPU thread pool from the calling (main) thread.

    Measured on 2 cores with the default model: when torch's first parallel op ran in a non-main
    thread, that thread then decoded about 10x slower (0.7-1.0 vs 7-8 tok/s, prompt 4 vs 85 tok/s);
    one small matmul in the main thread first avoids it (so does OMP_NUM_THREADS=1)."""
    import torch

    a = torch.ones(256, 256)
    (a @ a).sum().item()


class EngineThread:
    def __init__(self, name: str = "tqinfer-engine"):
        warm_up_torch_threads()
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run job on the engine thread after the jobs before it; jobs report their own results."""
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # jobs post their errors to the UI; the thread must outlive a bad one
                pass
