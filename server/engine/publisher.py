"""Getting events out of the engine thread: PNG encoding in a small pool, delivery to the loop.

The engine thread only hands over tensors and returns at once. Its plain events collect in an
outbox that goes to the loop in one call_soon_threadsafe per iteration (each call is a
syscall that wakes the loop; one per event cost a few percent of a small model's step).
Preview frames wait in a per-request slot where a newer frame of the same image and kind
replaces an older one not yet encoded, so a slow encoder never builds a backlog; final
images always go. Encode jobs are queued only after the outbox is flushed, so a request's
events reach its channel in the order the engine sent them.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from model.data import to_uint8
from server.contract import Done, Event, Failed, Frame, FrameKind, GeneratedImage
from server.contract.channel import EventChannel

from .request import Request

log = logging.getLogger(__name__)


def to_png(image: torch.Tensor) -> bytes:
    """[C, H, W] in [-1, 1] (clamped) -> PNG bytes: grayscale for C=1, RGB for C=3."""
    pixels = to_uint8(image.detach()).permute(1, 2, 0).cpu().numpy()
    if pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class PendingFrames:
    """Frames of one request waiting for the encoder: the latest per (image, kind)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[tuple[int, FrameKind], tuple[int, torch.Tensor]] = {}

    def add(self, frames: dict[tuple[int, FrameKind], tuple[int, torch.Tensor]]) -> bool:
        """True when the slot was empty, i.e. no encode job is queued for it yet."""
        with self._lock:
            was_empty = not self._frames
            self._frames.update(frames)
            return was_empty

    def take(self) -> dict[tuple[int, FrameKind], tuple[int, torch.Tensor]]:
        with self._lock:
            frames, self._frames = self._frames, {}
            return frames


class Publisher:
    def __init__(self, loop: asyncio.AbstractEventLoop, encoder_threads: int):
        self._loop = loop
        # One torch thread each: only the engine thread may start an OpenMP team (see Engine._run).
        self._pool = ThreadPoolExecutor(
            encoder_threads, thread_name_prefix="ddpm-png", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._pending: dict[str, PendingFrames] = {}
        self._outbox: list[tuple[EventChannel, Event]] = []

    def send(self, channel: EventChannel, event: Event) -> None:
        """Queues an event; it leaves with the next flush."""
        self._outbox.append((channel, event))

    def flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._deliver(outbox)

    def _deliver(self, events: list[tuple[EventChannel, Event]]) -> None:
        try:
            self._loop.call_soon_threadsafe(put_all, events)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    def send_frames(self, request: Request, frames: dict[tuple[int, FrameKind], tuple[int, torch.Tensor]]) -> None:
        """frames: (image index, kind) -> (step, [C, H, W] tensor)."""
        pending = self._pending.setdefault(request.id, PendingFrames())
        if pending.add(frames):
            self.flush()
            self._pool.submit(self._encode_frames, request, pending)

    def send_done(self, request: Request, timings: dict[str, float]) -> None:
        self._pending.pop(request.id, None)
        self.flush()
        self._pool.submit(self._encode_done, request, timings)

    def forget(self, request: Request) -> None:
        self._pending.pop(request.id, None)

    def close(self) -> None:
        """Waits for queued encodes, so every Done is delivered."""
        self.flush()
        self._pool.shutdown(wait=True)

    def _encode_frames(self, request: Request, pending: PendingFrames) -> None:
        channel, total = request.channel, request.total
        try:
            frames = [
                (channel, Frame(id=request.id, step=step, total=total, index=index, kind=kind, png=to_png(image)))
                for (index, kind), (step, image) in sorted(pending.take().items())
            ]
        except Exception:  # previews are best effort: the request goes on, but say why they stopped
            log.exception("encoding preview frames of request %s failed", request.id)
            return
        self._deliver(frames)

    def _encode_done(self, request: Request, timings: dict[str, float]) -> None:
        try:
            images = [
                GeneratedImage(index=index, seed=request.image_seed(index), png=to_png(request.finals[index]))
                for index in range(request.spec.n)
            ]
            outcome: Event = Done(id=request.id, seed=request.seed, images=images, timings=timings)
        except Exception as exc:  # never leave an accepted request without its end
            log.exception("encoding the images of request %s failed", request.id)
            outcome = Failed(id=request.id, code="internal", message=f"encoding the images failed: {exc!r}")
        self._deliver([(request.channel, outcome)])


def put_all(events: list[tuple[EventChannel, Event]]) -> None:
    for channel, event in events:
        channel.put(event)
