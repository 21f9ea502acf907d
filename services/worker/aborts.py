"""What the publisher thread does after an aborted transaction: how long it waits, and how it publishes next.

- An abort that named refused records changed what it carried (each owning outcome was replaced by a smaller one,
  see ``Outcome.smaller``): publish again at once. Each outcome can only shrink twice, so this never loops.
- An abort that named no record (a broker or group coordinator error, a timeout): wait ``ABORT_BACKOFF_S``. After
  ``ISOLATE_AFTER_ABORTS`` of them in a row, each partition is published in its own transaction, so a partition
  whose head keeps failing holds back no other; one transaction for all again once a round commits everything.
- Blocked: a topic refuses every record (the results topic missing or not authorized, or refusing even a minimal
  result). That is not one input's fault, and nothing can be published: wait, doubling from ``ABORT_BACKOFF_S`` up
  to ``BLOCKED_BACKOFF_MAX_S``, and report it (``on_blocked``) until a transaction commits again.

Not thread-safe: used under the worker's transaction lock.
"""

from __future__ import annotations

from collections.abc import Callable

ABORT_BACKOFF_S = 0.1
ISOLATE_AFTER_ABORTS = 2
BLOCKED_BACKOFF_MAX_S = 5.0


class AbortPolicy:
    def __init__(self, on_blocked: Callable[[bool], None] = lambda blocked: None) -> None:
        self._on_blocked = on_blocked
        self._unnamed = 0  # aborts in a row that named no record
        self._blocked = 0  # tries in a row that found a topic refusing every record
        self._changed = False  # the last abort replaced outcomes: try again at once

    @property
    def isolate(self) -> bool:
        """Publish each partition in its own transaction."""
        return self._unnamed >= ISOLATE_AFTER_ABORTS

    @property
    def blocked(self) -> bool:
        return self._blocked > 0

    def committed(self, *, everything: bool) -> None:
        """A transaction committed; ``everything``: all that was ready is published (back to one transaction)."""
        if everything:
            self._unnamed = 0
        if self._blocked:
            self._blocked = 0
            self._on_blocked(False)

    def aborted(self, *, named: bool, changed: bool, blocked: bool) -> None:
        """A transaction aborted; ``named``: it named refused records; ``changed``: outcomes were replaced because of
        them; ``blocked``: a topic refuses every record."""
        if not named:
            self._unnamed += 1
        self._changed = changed
        if blocked:
            self._blocked += 1
            if self._blocked == 1:
                self._on_blocked(True)

    def wait_s(self) -> float:
        """How long to wait before the next try."""
        if self._blocked:
            return min(BLOCKED_BACKOFF_MAX_S, ABORT_BACKOFF_S * 2.0 ** min(self._blocked - 1, 16))
        return 0.0 if self._changed else ABORT_BACKOFF_S
