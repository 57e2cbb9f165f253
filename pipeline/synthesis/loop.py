"""A private event loop on a daemon thread, so async teacher clients work from any caller.

A teacher stage owns one: ``run`` then behaves the same from plain code, from a thread pool and
from inside a running event loop (a Prefect task, a notebook), and HTTP connections bound to the
loop survive across batches.
"""

from __future__ import annotations

import asyncio
import threading


class LoopThread:
    """A private event loop on a daemon thread; ``run(coro)`` blocks until the result."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
