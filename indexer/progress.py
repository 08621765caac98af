"""Build progress: a tqdm bar (items/s, ETA) on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

logger = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts items towards ``total``; ``initial`` items were done by an earlier (resumed) run.

    Rates and ETA count only the items of this run. Without a terminal on ``stream`` a log
    line is written at most every ``interval_s`` seconds, plus one at the end.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        initial: int = 0,
        interval_s: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self.total = total
        self.description = description
        self.done = initial
        self._initial = initial
        self._interval_s = interval_s
        self._started = time.perf_counter()
        self._last_log = self._started
        self._bar = None
        if stream.isatty():
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=description,
                unit="item",
                file=stream,
                dynamic_ncols=True,
                smoothing=0.05,
            )

    @property
    def rate(self) -> float:
        """Items per second in this run."""
        elapsed = time.perf_counter() - self._started
        return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_log >= self._interval_s:
            self._last_log = now
            self._log()

    def _log(self) -> None:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        logger.info(
            "%s: %d/%d (%.0f%%), %.1f items/s, ETA %s",
            self.description,
            self.done,
            self.total,
            100.0 * self.done / max(self.total, 1),
            rate,
            _duration(eta) if eta == eta else "?",
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done > self._initial:
            self._log()
