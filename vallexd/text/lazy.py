"""Load a heavy resource once per process, on first use, from any thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Lazy(Generic[T]):
    """A value built by `factory` on the first `get()`; later calls return it without locking.

    Double-checked locking: the daemon's worker thread and the event loop may both
    reach a resource first, and the second must wait for (not repeat) the load.
    A failed load is not cached, so a later call retries it.
    """

    def __init__(self, name: str, factory: Callable[[], T]) -> None:
        self.name = name
        self._factory = factory
        self._lock = threading.Lock()
        self._value: T | None = None
        self._loaded = False
        #: seconds the load took (None until loaded); reported by the benchmark
        self.load_seconds: float | None = None
        #: how many times the factory ran (1 after a successful load; tests check it stays 1)
        self.load_count = 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    def get(self) -> T:
        if self._loaded:
            return self._value  # type: ignore[return-value]
        with self._lock:
            if not self._loaded:
                start = time.perf_counter()
                self.load_count += 1
                self._value = self._factory()
                self.load_seconds = time.perf_counter() - start
                self._loaded = True
        return self._value  # type: ignore[return-value]
