"""The per-request mailbox: frames droppable (latest wins), everything else kept and ordered."""

import asyncio

import pytest

from server.contract import Done, Failed, Frame, Progress, Queued, Started
from server.contract.channel import EventChannel

from .conftest import run


def frame(step: int, index: int = 0, kind: str = "x_t") -> Frame:
    return Frame(id="r", step=step, total=10, index=index, kind=kind, png=b"png")


async def drain(channel: EventChannel) -> list:
    return [event async for event in channel.stream()]


def test_a_slow_consumer_gets_only_the_latest_frame_per_image_and_kind():
    async def body():
        channel = EventChannel(asyncio.get_running_loop())
        channel.put(Queued(id="r", position=0))
        channel.put(Started(id="r"))
        for step in (1, 2, 3):
            channel.put(frame(step, index=0))
            channel.put(Progress(id="r", step=step, total=10, eta_s=None))
            channel.put(frame(step, index=1))
        channel.put(Done(id="r", seed=1, images=[]))
        return await drain(channel)

    events = run(body())
    # Kept events in the order they were put; each kept frame where its latest version was.
    assert [type(e).__name__ for e in events] == [
        "Queued", "Started", "Progress", "Progress", "Frame", "Progress", "Frame", "Done"]
    assert [(e.index, e.step) for e in events if isinstance(e, Frame)] == [(0, 3), (1, 3)]


def test_events_after_the_end_are_ignored_and_the_outcome_is_set():
    async def body():
        channel = EventChannel(asyncio.get_running_loop())
        failure = Failed(id="r", code="cancelled", message="cancelled by the client")
        channel.put(failure)
        channel.put(frame(1))
        channel.put(Progress(id="r", step=1, total=10, eta_s=None))
        assert channel.outcome.result() is failure
        return await drain(channel)

    assert [type(e).__name__ for e in run(body())] == ["Failed"]


def test_the_consumer_waits_for_events_put_later():
    async def body():
        loop = asyncio.get_running_loop()
        channel = EventChannel(loop)
        loop.call_later(0.01, channel.put, Started(id="r"))
        loop.call_later(0.02, channel.put, Done(id="r", seed=1, images=[]))
        return await drain(channel)

    assert [type(e).__name__ for e in run(body())] == ["Started", "Done"]


def test_events_can_be_consumed_once():
    async def body():
        channel = EventChannel(asyncio.get_running_loop())
        channel.put(Done(id="r", seed=1, images=[]))
        await drain(channel)
        with pytest.raises(RuntimeError, match="only once"):
            await drain(channel)

    run(body())
