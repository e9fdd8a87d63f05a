"""A request's mailbox between the thread that produces its events and the one consumer on the
asyncio loop, and the RequestHandle around it (torch-free: any engine, and the job store, use it).

The channel lives on the asyncio loop: the engine thread never touches it directly, it posts
with loop.call_soon_threadsafe, so publishing never blocks the engine. Frames are droppable:
the channel keeps only the latest undelivered frame per (image index, kind), so a slow
consumer skips stale previews instead of growing a backlog. Every other event is kept, and
events come out in the order they were put.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable

from .errors import GenerationFailed
from .events import Done, Event, Failed, Frame
from .spec import ValidSpec

TERMINAL = (Done, Failed)


class EventChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._events: deque[tuple[int, Event]] = deque()
        self._frames: dict[tuple[int, str], tuple[int, Frame]] = {}
        self._order = itertools.count()
        self._wakeup = asyncio.Event()
        self._consumed = False
        self.outcome: asyncio.Future[Done | Failed] = loop.create_future()

    @property
    def closed(self) -> bool:
        return self.outcome.done()

    def put(self, event: Event) -> None:
        """Call on the loop thread. Anything after the terminal event is ignored."""
        if self.closed:
            return
        if isinstance(event, Frame):
            self._frames[(event.index, event.kind)] = (next(self._order), event)
        else:
            self._events.append((next(self._order), event))
            if isinstance(event, TERMINAL):
                self.outcome.set_result(event)
        self._wakeup.set()

    async def stream(self) -> AsyncIterator[Event]:
        if self._consumed:
            raise RuntimeError("a request's events can be consumed only once")
        self._consumed = True
        while True:
            event = self._pop()
            if event is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            yield event
            if isinstance(event, TERMINAL):
                return

    def _pop(self) -> Event | None:
        """The oldest pending event, frames included."""
        oldest_frame = min(self._frames.items(), key=lambda item: item[1][0], default=None)
        if self._events and (oldest_frame is None or self._events[0][0] < oldest_frame[1][0]):
            return self._events.popleft()[1]
        if oldest_frame is not None:
            del self._frames[oldest_frame[0]]
            return oldest_frame[1][1]
        return None


class ChannelHandle:
    """A RequestHandle over an EventChannel: what `Engine.submit` returns."""

    def __init__(self, request_id: str, seed: int, spec: ValidSpec, channel: EventChannel,
                 cancel: Callable[[str], bool]):
        self.id = request_id
        self.seed = seed
        self.spec = spec
        self._channel = channel
        self._cancel = cancel

    def events(self) -> AsyncIterator[Event]:
        """Queued, Started, Progress, Frame..., then Done or Failed. Only one consumer."""
        return self._channel.stream()

    async def result(self) -> Done:
        """Waits for the end; raises GenerationFailed on failure, cancellation or timeout."""
        outcome = await asyncio.shield(self._channel.outcome)
        if isinstance(outcome, Failed):
            raise GenerationFailed(outcome)
        return outcome

    def cancel(self) -> bool:
        return self._cancel(self.id)

    def __repr__(self) -> str:
        return f"ChannelHandle(id={self.id!r}, seed={self.seed}, spec={self.spec!r})"
