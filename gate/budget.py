"""The query and time budget of one scan: checked before every model call, never exceeded."""

from __future__ import annotations

import math
import time

from gate.errors import QueryBudgetExceeded
from gate.oracle import Oracle


class QueryBudget:
    """Queries and seconds left to a scan that started at ``oracle.queries`` now.

    Two limits apply: the scan's own (``max_queries``, ``max_seconds``) and the oracle's hard budget.
    """

    def __init__(self, oracle: Oracle, max_queries: int | None = None, max_seconds: float | None = None) -> None:
        self.oracle = oracle
        self.max_queries = max_queries
        self.max_seconds = max_seconds
        self.q_start = oracle.queries
        self.t_start = time.perf_counter()

    @property
    def spent(self) -> int:
        return self.oracle.queries - self.q_start

    def left(self) -> float:
        lefts = [math.inf]
        if self.max_queries is not None:
            lefts.append(self.max_queries - self.spent)
        if self.oracle.remaining is not None:
            lefts.append(self.oracle.remaining)
        return min(lefts)

    def blocks(self, n: int) -> str | None:
        """Why ``n`` more queries cannot be sent now, or None."""
        if n > self.left():
            return f"query budget reached ({self.spent} queries sent)"
        if self.max_seconds is not None and time.perf_counter() - self.t_start > self.max_seconds:
            return f"time budget of {self.max_seconds:g} s reached"
        return None

    def require(self, n: int, what: str) -> None:
        """Raise :class:`QueryBudgetExceeded` unless ``n`` more queries fit."""
        if n > self.left():
            raise QueryBudgetExceeded(f"query budget too small: {what} needs {n} queries, {self.left():.0f} left")
