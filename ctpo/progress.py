"""Progress lines for job logs: `step k/N`, elapsed time and ETA from this process's own pace.

A resumed job starts counting at the step it resumed from, so its ETA is not skewed by steps that an
earlier job did. The clock is injectable so tests can assert exact strings.
"""
from __future__ import annotations

import time
from typing import Callable


def format_seconds(s: float) -> str:
    """73 -> '1m13s', 3725 -> '1h02m05s', 5 -> '5s'."""
    s = int(round(max(s, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """Counts `done` of `total` units; `line(k)` after unit k finished says where the job is.

    `start` is the number of units already done before this process began (a resume)."""

    def __init__(self, total: int, start: int = 0, unit: str = "step",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.start, self.unit, self.clock = total, start, unit, clock
        self.t0 = clock()

    def line(self, done: int) -> str:
        elapsed = self.clock() - self.t0
        here = done - self.start
        if here > 0 and done < self.total:
            eta = format_seconds(elapsed / here * (self.total - done))
        else:
            eta = "0s" if done >= self.total else "?"
        return f"{self.unit} {done}/{self.total} elapsed {format_seconds(elapsed)} eta {eta}"
