"""Fair-share limits of the socket server: connection slots per peer uid, bytes of request frames
in memory at once, and log lines per connection (issue 12, fault 9).

- One local user must not lock everyone out: each uid may hold at most `per_uid` of the
  connection slots (default half of them, as dbus-daemon limits connections per user); root
  and the daemon's own uid are exempt (the admin and the daemon's own tools).
- Big frames add up: every frame over `SMALL_FRAME` bytes takes its declared length from one
  global budget from its header until its request has been handled; a frame that does not fit
  is answered BUSY without reading its body. Small frames (pings, ordinary requests) are never
  refused this way, so a flood of big uploads cannot make a ping BUSY.
- Log volume from bad input is bounded: a connection gets `burst` (20) error lines, then one
  per `interval_s` (1 s), and a count of what was left out (INTERNAL errors are always logged).
"""

from __future__ import annotations

import os
import time
from collections import Counter

#: Frames up to this size do not count against the frame budget (a ping is ~40 bytes).
SMALL_FRAME = 64 * 1024


class ConnectionShares:
    """Open connections per peer uid, with a cap per uid (exempt: root and the daemon's uid)."""

    def __init__(self, per_uid: int, exempt_uids: frozenset[int] | None = None) -> None:
        self.per_uid = max(1, per_uid)
        self.exempt_uids = frozenset({0, os.getuid()}) if exempt_uids is None else exempt_uids
        self._open: Counter[int | None] = Counter()

    def try_open(self, uid: int | None) -> bool:
        """Count a new connection of `uid`; False (nothing counted) when its share is used up."""
        if uid not in self.exempt_uids and self._open[uid] >= self.per_uid:
            return False
        self._open[uid] += 1
        return True

    def close(self, uid: int | None) -> None:
        self._open[uid] -= 1
        if self._open[uid] <= 0:
            del self._open[uid]

    def count(self, uid: int | None) -> int:
        return self._open[uid]


class FrameBudget:
    """Bytes of big request frames being read or waiting to be handled, across all connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def try_take(self, length: int) -> bool:
        if length <= SMALL_FRAME:
            return True
        if self.used + length > self.limit:
            return False
        self.used += length
        return True

    def give_back(self, length: int) -> None:
        if length > SMALL_FRAME:
            self.used -= length


class LogLimiter:
    """At most `burst` lines at once, then one per `interval_s`; counts what it held back."""

    def __init__(self, burst: int = 20, interval_s: float = 1.0) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self._tokens = float(burst)
        self._last = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) / self.interval_s)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """How many lines were held back since the last call (and reset the count)."""
        n, self.suppressed = self.suppressed, 0
        return n
