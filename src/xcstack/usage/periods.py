"""Calendar periods in the configured time zone: a day or a month, its tag and when it resets.

Computed once per period and cached until it ends (`datetime.now(tz)` per request would cost more than
the rest of the quota check)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo


class Calendar:
    def __init__(self, timezone: str) -> None:
        self.tz = ZoneInfo(timezone)
        self._cache: dict[str, tuple[str, float]] = {}

    def current(self, period: str, now: float | None = None) -> tuple[str, float]:
        """(tag, reset epoch) of the period that holds `now` (default: the wall clock)."""
        t = time.time() if now is None else now
        hit = self._cache.get(period)
        if hit is not None and now is None and t < hit[1] and t >= hit[1] - 32 * 86400:
            return hit
        out = self.at(period, t)
        if now is None:
            self._cache[period] = out
        return out

    def at(self, period: str, t: float) -> tuple[str, float]:
        local = datetime.fromtimestamp(t, self.tz)
        if period == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            nxt = (start + timedelta(days=1, hours=2)).replace(hour=0)
            return f"d{start:%Y%m%d}", nxt.timestamp()
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=32)).replace(day=1)
        return f"m{start:%Y%m}", nxt.timestamp()

    def day(self, t: float) -> str:
        """The local calendar day of `t` (`YYYY-MM-DD`): the key of the daily roll-up."""
        return datetime.fromtimestamp(t, self.tz).strftime("%Y-%m-%d")

    def iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, self.tz).isoformat(timespec="seconds")
