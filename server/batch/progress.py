"""Progress: a tqdm bar (results/s, ETA) on a terminal, else a plain log line every few seconds."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("sevi.batch")


class Progress:
    def __init__(self, total: int | None, mode: str = "auto", every_s: float = 10.0) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._every = every_s
        self._next = self.t0 + every_s
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="result", desc="captioning", dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, failed: int = 0, tokens: int = 0) -> None:
        self.done += n
        self.failed += failed
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(n)
            if failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
        elif self.mode == "log":
            now = time.perf_counter()
            if now >= self._next:
                self._next = now + self._every
                self._log(now)

    def _log(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        fields: dict[str, Any] = {
            "done": self.done,
            "failed": self.failed,
            "results_per_s": round(rate, 3),
            "tokens_per_s": round(self.tokens / max(now - self.t0, 1e-9), 1),
        }
        if self.total is not None:
            fields["total"] = self.total
            fields["eta_s"] = round((self.total - self.done) / rate, 1) if rate > 0 else None
        log.info("progress", extra={"fields": fields})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log":
            self._log(time.perf_counter())
