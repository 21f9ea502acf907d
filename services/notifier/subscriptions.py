"""What clients of the notifier may hold open (``StreamLimits``), and the count of what they hold: watched
tasks per connection and per tenant (``SubscriptionCounts``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from aimesh.errors import AimeshError
from aimesh.settings import NotifierSettings

from .buffers import BufferLimits


def _setting(name: str) -> Any:
    """The default of a notifier setting: the one place it is written."""
    return NotifierSettings.model_fields[name].default


def _buffer_setting() -> BufferLimits:
    return BufferLimits(_setting("max_stream_buffer_bytes"), _setting("max_stream_buffer_updates"))


@dataclass(frozen=True)
class StreamLimits:
    """What clients may hold open: subscriptions (a WatchTask stream, or one task of a WatchTasks stream) per
    tenant and per connection of a tenant; how long a stream may go without an update (``idle_timeout_s``)
    and its client without taking one (``send_timeout_s``); what one stream may hold unsent (``buffer``) and
    all streams together (``max_total_buffer_bytes``). The defaults are ``NotifierSettings``'."""

    max_per_connection: int = _setting("max_subscriptions_per_connection")
    max_per_tenant: int = _setting("max_subscriptions_per_tenant")
    idle_timeout_s: float = _setting("stream_idle_timeout_s")
    send_timeout_s: float = _setting("stream_send_timeout_s")
    buffer: BufferLimits = field(default_factory=_buffer_setting)
    max_total_buffer_bytes: int = _setting("max_subscription_buffer_bytes")

    @classmethod
    def of(cls, settings: NotifierSettings) -> StreamLimits:
        return cls(
            max_per_connection=settings.max_subscriptions_per_connection,
            max_per_tenant=settings.max_subscriptions_per_tenant,
            idle_timeout_s=settings.stream_idle_timeout_s,
            send_timeout_s=settings.stream_send_timeout_s,
            buffer=BufferLimits(settings.max_stream_buffer_bytes, settings.max_stream_buffer_updates),
            max_total_buffer_bytes=settings.max_subscription_buffer_bytes,
        )


class TooManySubscriptions(AimeshError):
    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(
            f"too many watched tasks (open WatchTask streams and tasks of WatchTasks streams) for this {scope} "
            f"(the limit is {limit}); close one first"
        )
        self.scope = scope
        self.limit = limit


class SubscriptionCounts:
    """The subscriptions held per connection and per tenant, within ``limits``."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits
        self._by_connection: Counter[Hashable] = Counter()
        self._by_tenant: Counter[str] = Counter()

    def open(self, connection: Hashable | None, tenant: str, count: int) -> None:
        """Count ``count`` more subscriptions of ``connection`` (None: of no connection) and ``tenant``, or
        raise TooManySubscriptions (counting nothing) if either would pass its limit."""
        if connection is not None and self._by_connection[connection] + count > self._limits.max_per_connection:
            raise TooManySubscriptions("connection", self._limits.max_per_connection)
        if self._by_tenant[tenant] + count > self._limits.max_per_tenant:
            raise TooManySubscriptions("tenant", self._limits.max_per_tenant)
        if connection is not None:
            self._by_connection[connection] += count
        self._by_tenant[tenant] += count

    def close(self, connection: Hashable | None, tenant: str, count: int) -> None:
        counters: list[tuple[Counter[Any], Hashable]] = [(self._by_tenant, tenant)]
        if connection is not None:
            counters.append((self._by_connection, connection))
        for counter, key in counters:
            counter[key] -= count
            if counter[key] <= 0:
                del counter[key]
