"""Merging one call's engine requests, and aborting them when the consumer leaves early."""

from __future__ import annotations

import asyncio

from pagedserve.outputs import RequestOutput
from pagedserve.server.generation import Generation


class FakeStream:
    """Yields ``n`` one-token deltas, ``delay`` seconds apart, the last one finished."""

    def __init__(self, request_id: str, n: int, delay: float) -> None:
        self.request_id = request_id
        self.n = n
        self.delay = delay
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    async def __aiter__(self):
        for i in range(self.n):
            await asyncio.sleep(self.delay)
            yield RequestOutput(self.request_id, f"{self.request_id}{i}", [i],
                                finished=i == self.n - 1, finish_reason="length")


def test_deltas_of_all_choices_interleave_with_their_index():
    async def run():
        streams = [FakeStream("a", 3, 0.01), FakeStream("b", 3, 0.015)]
        return [(i, out.delta_text) async for i, out in Generation(streams)], streams

    got, streams = asyncio.run(run())
    assert [t for i, t in got if i == 0] == ["a0", "a1", "a2"]
    assert [t for i, t in got if i == 1] == ["b0", "b1", "b2"]
    assert [i for i, _ in got][:2] == [0, 1]  # b's first delta comes before a finishes
    assert not any(s.aborted for s in streams)  # all finished: nothing to abort


def test_leaving_early_aborts_the_unfinished():
    async def run():
        streams = [FakeStream("a", 2, 0.001), FakeStream("b", 50, 0.01)]
        generation = Generation(streams)
        async for _, out in generation:
            if out.request_id == "a" and out.finished:
                break
        await asyncio.sleep(0)
        return streams

    a, b = asyncio.run(run())
    assert not a.aborted and b.aborted


def test_cancelling_the_consumer_aborts():
    async def run():
        streams = [FakeStream("a", 100, 0.01)]

        async def consume():
            async for _ in Generation(streams):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return streams

    assert asyncio.run(run())[0].aborted
