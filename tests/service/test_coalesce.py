"""The Coalescer on its own: one run per key, shared results and errors, audio replay for late
joiners, and a run that stops only when its last caller has gone (plain asyncio, no model)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from vallexd.errors import NotFound, Timeout
from vallexd.service.coalesce import Coalescer, Run


class Producer:
    """A run that emits two audio pieces around a gate the test opens, and records what it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.stopped: list[bool] = []

    async def __call__(self, run: Run) -> bytes:
        self.calls += 1
        run.emit_audio(np.array([1.0], dtype=np.float32))
        run.emit_progress(1, 2)
        waiter = asyncio.ensure_future(run.cancelled.wait())
        gate = asyncio.ensure_future(self.gate.wait())
        await asyncio.wait({waiter, gate}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        gate.cancel()
        self.stopped.append(run.cancelled.is_set())
        if run.cancelled.is_set():
            raise Timeout("stopped", reason="CANCELLED")
        run.emit_audio(np.array([2.0], dtype=np.float32))
        return b"result-%d" % self.calls


async def test_concurrent_callers_share_one_run_and_all_audio() -> None:
    co: Coalescer[bytes] = Coalescer()
    produce = Producer()
    heard: list[list[float]] = [[] for _ in range(3)]
    tasks = []
    for i in range(3):
        tasks.append(asyncio.ensure_future(co.run("k", produce, on_audio=lambda a, i=i: heard[i].extend(a))))
        await asyncio.sleep(0)  # the later ones join after the first piece was made
    await asyncio.sleep(0.01)
    produce.gate.set()
    assert await asyncio.gather(*tasks) == [b"result-1"] * 3
    assert produce.calls == 1 and co.joined == 2
    assert heard == [[1.0, 2.0]] * 3  # late joiners got the first piece replayed, in order
    assert co.running == 0


async def test_errors_are_shared() -> None:
    co: Coalescer[bytes] = Coalescer()

    async def fail(run: Run) -> bytes:
        await asyncio.sleep(0.01)
        raise NotFound("no such voice", reason="UNKNOWN_PRESET")

    results = await asyncio.gather(co.run("k", fail), co.run("k", fail), return_exceptions=True)
    assert all(isinstance(r, NotFound) for r in results)


async def test_run_stops_only_when_every_caller_is_gone() -> None:
    co: Coalescer[bytes] = Coalescer()
    produce = Producer()
    gone = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.ensure_future(co.run("k", produce, cancelled=ev)) for ev in gone]
    await asyncio.sleep(0.01)
    gone[0].set()  # the first caller leaves: the run goes on for the others
    with pytest.raises(Timeout) as first:
        await tasks[0]
    assert first.value.reason == "CANCELLED" and produce.stopped == []
    tasks[1].cancel()  # a task cancelled outright only leaves, too
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    produce.gate.set()
    assert await tasks[2] == b"result-1"
    assert produce.stopped == [False]


async def test_last_caller_leaving_stops_the_run_and_a_newcomer_starts_afresh() -> None:
    co: Coalescer[bytes] = Coalescer()
    produce = Producer()
    gone = asyncio.Event()
    task = asyncio.ensure_future(co.run("k", produce, cancelled=gone))
    await asyncio.sleep(0.01)
    gone.set()
    with pytest.raises(Timeout):
        await task
    assert produce.stopped == [True]  # the run saw the stop before the caller was answered
    produce.gate.set()
    assert await co.run("k", produce) == b"result-2"  # a new run, not the dying one
    assert produce.calls == 2
