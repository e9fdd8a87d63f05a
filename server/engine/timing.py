"""How long engine steps take, without making the host wait for the device.

On CUDA a step's kernels run after `Runner.step` returns, so a wall clock around the call times
only the launches. CUDA events bracket each step instead, and are read once the device has
passed them (a query, never a wait): timing adds no host-device sync. A step counts as the
longer of its launch time and its device time, since the engine goes at the pace of the slower
side. On a CPU the wall clock is the step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepStart:
    host: float
    device: torch.cuda.Event | None


@dataclass(frozen=True)
class TimedStep:
    batch_size: int
    host_s: float
    began: torch.cuda.Event
    ended: torch.cuda.Event

    def seconds(self) -> float:
        return max(self.host_s, self.began.elapsed_time(self.ended) / 1000.0)


class StepTimer:
    def __init__(self, device: torch.device):
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._in_flight: deque[TimedStep] = deque()  # CUDA: recorded, not yet passed by the device
        self._finished: list[tuple[int, float]] = []

    def start(self) -> StepStart:
        return StepStart(time.perf_counter(), self._record())

    def stop(self, start: StepStart, batch_size: int) -> None:
        host_s = time.perf_counter() - start.host
        if start.device is None:
            self._finished.append((batch_size, host_s))
        else:
            self._in_flight.append(TimedStep(batch_size, host_s, start.device, self._record()))

    def finished(self) -> list[tuple[int, float]]:
        """(batch size, seconds) of each step completed since the last call, in order."""
        while self._in_flight and self._in_flight[0].ended.query():
            step = self._in_flight.popleft()
            self._finished.append((step.batch_size, step.seconds()))
        finished, self._finished = self._finished, []
        return finished

    def _record(self) -> torch.cuda.Event | None:
        if self._stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event
