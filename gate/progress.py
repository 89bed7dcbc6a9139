"""Progress on stderr while a run works: a live line on a terminal, one line per finished class otherwise.

The scan engine and the synthesis emit typed events (:class:`ScanStarted`, :class:`ClassFinished`,
:class:`RoundFinished`, :class:`Message`), the pipeline :class:`ScanFinished`; :class:`Progress` only
renders them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ScanStarted:
    classes: int
    max_steps: int


@dataclass(frozen=True)
class ClassFinished:
    label: int
    step: int
    success: float  # the current trigger's attack success at its last step
    l1: float  # the trigger's L1; a blend search's: its amplitude
    queries: int
    status: str
    mode: str = "patch"  # patch | blend


@dataclass(frozen=True)
class RoundFinished:
    step: int
    queries: int
    smallest: ClassFinished | None  # the running class with the smallest trigger so far (status "running")


@dataclass(frozen=True)
class ScanFinished:
    flagged: list[int]
    outcome: str


@dataclass(frozen=True)
class Message:
    text: str


class Progress:
    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.classes = 0
        self.finished = 0

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def _line(self, text: str) -> None:
        self._write(("\r\033[K" if self.live else "") + text + "\n")

    def emit(self, event) -> None:
        if isinstance(event, ScanStarted):
            self.classes, self.t0, self.finished = event.classes, time.perf_counter(), 0
            self._write(f"scanning {event.classes} classes (up to {event.max_steps} steps each)\n")
        elif isinstance(event, ClassFinished):
            if event.mode == "blend":  # counted with its class's patch search
                self._line(f"class {event.label:>3}  step {event.step:>4}  ASR {event.success:4.2f}  blend a "
                           f"{event.l1:6.3f}  queries {event.queries:>9,}  {event.status}")
                return
            self.finished += 1
            self._line(f"class {event.label:>3}  step {event.step:>4}  ASR {event.success:4.2f}  L1 {event.l1:8.2f}  "
                       f"queries {event.queries:>9,}  {event.status}")
        elif isinstance(event, RoundFinished):
            if self.live and event.smallest is not None:
                s = event.smallest
                self._write(f"\r\033[Kstep {event.step:>4}  done {self.finished}/{self.classes}  queries "
                            f"{event.queries:,}  smallest running: class {s.label} L1 {s.l1:.1f} ASR {s.success:.2f}  "
                            f"{time.perf_counter() - self.t0:5.0f}s")
        elif isinstance(event, ScanFinished):
            self._line(f"scan finished in {time.perf_counter() - self.t0:.1f}s: flagged {event.flagged or 'none'}"
                       f" -> {event.outcome}")
        elif isinstance(event, Message):
            self._line(event.text)
        else:
            raise TypeError(f"not a progress event: {event!r}")
