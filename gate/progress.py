"""Progress on stderr while a scan runs: a live line on a terminal, one line per finished class otherwise."""

from __future__ import annotations

import sys
import time


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

    def start(self, classes: int, max_steps: int) -> None:
        self.classes, self.t0, self.finished = classes, time.perf_counter(), 0
        self._write(f"scanning {classes} classes (up to {max_steps} steps each)\n")

    def class_done(self, label: int, state, queries: int) -> None:
        self.finished += 1
        _, _, l1 = state.result_trigger()
        line = (f"class {label:>3}  step {state.step:>4}  ASR {state.last_success:4.2f}  L1 {l1:8.2f}  "
                f"queries {queries:>9,}  {state.status}")
        self._write(("\r\033[K" if self.live else "") + line + "\n")

    def step(self, step: int, runs, queries: int) -> None:
        if not self.live:
            return
        active = [r for r in runs if not r.state.done]
        if not active:
            return
        r = min(active, key=lambda r: r.state.result_trigger()[2])
        _, _, l1 = r.state.result_trigger()
        self._write(f"\r\033[Kstep {step:>4}  done {self.finished}/{self.classes}  queries {queries:,}  "
                    f"smallest running: class {r.label} L1 {l1:.1f} ASR {r.state.last_success:.2f}  "
                    f"{time.perf_counter() - self.t0:5.0f}s")

    def finish(self, flagged: list[int], verdict: str) -> None:
        self._write(("\r\033[K" if self.live else "")
                    + f"scan finished in {time.perf_counter() - self.t0:.1f}s: flagged {flagged or 'none'}"
                    f" -> {verdict}\n")

    def message(self, text: str) -> None:
        self._write(("\r\033[K" if self.live else "") + text + "\n")
