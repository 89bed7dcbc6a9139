"""Progress on stderr while a run works: a live bar on a terminal, timestamped lines and heartbeats elsewhere.

The scan engine and the synthesis emit typed events (:class:`ScanStarted`, :class:`ClassFinished`,
:class:`RoundFinished`, :class:`Message`), the pipeline :class:`ScanFinished`; :class:`Progress` only
renders them:

* on a terminal, a tqdm bar of the classes done, with the step, the queries, queries per second, an ETA
  and the smallest trigger still searched; each finished class is a line above it;
* otherwise (CI logs, a pipe) every line starts with a UTC timestamp, and a heartbeat line every
  ``heartbeat`` seconds (``--progress-every``; 0: none) says what the run is doing, so a log never goes quiet.

The ETA is an upper bound: every running class may search up to ``max_steps`` steps, at the rate
(class-steps per second) measured so far; classes that stop early make it come sooner.

Progress never stops a run: if the stream breaks (a closed pipe, a reader that went away), progress goes
quiet and, for the process's own stderr, what is still written there goes to /dev/null.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone


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


HEARTBEAT_SECONDS = 10.0


def duration(seconds: float) -> str:
    """Seconds as a person reads them.

    >>> duration(42.4), duration(100), duration(3725)
    ('42s', '1m40s', '1h02m')
    """
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ScanCounters:
    """What the events have told so far about one scan, and the numbers shown from it."""

    def __init__(self, classes: int = 0, max_steps: int = 0, now: float = 0.0) -> None:
        self.classes, self.max_steps, self.t0 = classes, max_steps, now
        self.finished = 0
        self.finished_steps = 0  # steps the finished classes took, together
        self.step = 0
        self.queries = 0
        self.smallest: ClassFinished | None = None

    def eta(self, now: float) -> float | None:
        """Seconds left at most (every running class to max_steps, at the class-steps rate so far), or None."""
        running = self.classes - self.finished
        if running <= 0:
            return 0.0
        done = self.finished_steps + running * self.step
        elapsed = now - self.t0
        if done <= 0 or elapsed <= 0:
            return None
        return running * max(0, self.max_steps - self.step) / (done / elapsed)

    def rate(self, now: float) -> float:
        elapsed = now - self.t0
        return self.queries / elapsed if elapsed > 0 else 0.0

    def summary(self, now: float) -> str:
        eta = self.eta(now)
        text = (f"step {self.step}/{self.max_steps}, {self.queries:,} queries ({self.rate(now):,.0f}/s), "
                f"ETA {'?' if eta is None else 'at most ' + duration(eta)}, {duration(now - self.t0)} elapsed")
        if self.smallest is not None:
            text += f", smallest running: class {self.smallest.label} L1 {self.smallest.l1:.1f}"
        return text


class Progress:
    """Renders progress events on ``stream`` (stderr). ``live``: a bar (default: when the stream is a
    terminal); ``heartbeat``: seconds between heartbeat lines when not live (0: none); ``clock``: wall time for
    the timestamps."""

    def __init__(self, enabled: bool = True, stream=None, *, live: bool | None = None,
                 heartbeat: float = HEARTBEAT_SECONDS, clock=time.time) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        if live is None:
            live = _isatty(self.stream)
        self.live = enabled and live
        self.heartbeat = heartbeat
        self.clock = clock
        self.counters: ScanCounters | None = None
        self.doing = "starting"  # what the heartbeat says before a scan has started
        self.t_start = time.perf_counter()
        self._bar = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the heartbeat and leave the bar as it is."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            self._close_bar()

    # ------------------------------------------------------------------ events
    def emit(self, event) -> None:
        if not self.enabled:
            if not isinstance(event, (ScanStarted, ClassFinished, RoundFinished, ScanFinished, Message)):
                raise TypeError(f"not a progress event: {event!r}")
            return
        with self._lock:
            self._start_heartbeat()
            now = time.perf_counter()
            c = self.counters
            if isinstance(event, ScanStarted):
                self.counters = ScanCounters(event.classes, event.max_steps, now)
                self.doing = "scanning"
                self._line(f"scanning {event.classes} classes (up to {event.max_steps} steps each)")
                self._open_bar(event.classes)
            elif isinstance(event, ClassFinished):
                if event.mode == "blend":  # counted with its class's patch search
                    self._line(f"class {event.label:>3}  step {event.step:>4}  ASR {event.success:4.2f}  blend a "
                               f"{event.l1:6.3f}  queries {event.queries:>9,}  {event.status}")
                    return
                if c is not None:
                    c.finished += 1
                    c.finished_steps += event.step
                self._line(f"class {event.label:>3}  step {event.step:>4}  ASR {event.success:4.2f}  "
                           f"L1 {event.l1:8.2f}  queries {event.queries:>9,}  {event.status}")
                self._bar_call("update", 1)
            elif isinstance(event, RoundFinished):
                if c is not None:
                    c.step, c.queries, c.smallest = event.step, event.queries, event.smallest
                    self._bar_call("set_description_str", c.summary(now), refresh=False)
                    self._bar_call("refresh")
            elif isinstance(event, ScanFinished):
                self._close_bar()
                t0 = c.t0 if c is not None else self.t_start
                self.doing = "writing the reports"
                self._line(f"scan finished in {now - t0:.1f}s: flagged {event.flagged or 'none'} -> {event.outcome}")
            elif isinstance(event, Message):
                self.doing = event.text
                self._line(event.text)
            else:
                raise TypeError(f"not a progress event: {event!r}")

    def heartbeat_line(self) -> str:
        """What the run is doing now, in one line (the heartbeat's text, without the timestamp)."""
        now = time.perf_counter()
        with self._lock:
            c = self.counters
            if c is not None and self.doing == "scanning":
                return f"heartbeat: {c.finished}/{c.classes} classes done, {c.summary(now)}"
            return f"heartbeat: {self.doing}, {duration(now - self.t_start)} elapsed"

    # ------------------------------------------------------------------ rendering
    def _stamp(self) -> str:
        return datetime.fromtimestamp(self.clock(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar_call("write", text, file=self.stream)
        elif self.live:
            self._write(text + "\n")
        else:
            self._write(f"{self._stamp()} {text}\n")

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe or file: progress must not end the run
            self._broken()

    def _broken(self) -> None:
        self.enabled = False
        self._stop.set()
        self._bar = None
        silence(self.stream)

    def _open_bar(self, classes: int) -> None:
        if not self.live:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=classes, file=self.stream, unit="class", dynamic_ncols=True, mininterval=0.2,
                             bar_format="classes {n_fmt}/{total_fmt} |{bar}| {desc}", leave=True)
        except (OSError, ValueError):
            self._broken()

    def _close_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            try:
                bar.close()
            except (OSError, ValueError):
                self._broken()

    def _bar_call(self, name: str, *args, **kwargs) -> None:
        if self._bar is None:
            return
        try:
            getattr(self._bar, name)(*args, **kwargs)
        except (OSError, ValueError):
            self._broken()

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        if self._thread is not None or self.live or not self.heartbeat or self.heartbeat <= 0:
            return
        self._thread = threading.Thread(target=self._beat, name="gate-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                if not self.enabled:
                    return
                self._line(self.heartbeat_line())


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def silence(stream) -> None:
    """After a write to the process's own stderr (or stdout) failed, send that descriptor to /dev/null, so
    later writes and the flush at exit do not fail again (what the Python docs advise for a closed pipe)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    if fd not in (1, 2):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass


def say(text: str, stream=None) -> None:
    """One line on stderr that cannot end the run: a broken stderr is silenced instead."""
    stream = stream or sys.stderr
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        silence(stream)
