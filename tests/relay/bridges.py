"""Driving a sans-IO bridge to where a test needs it."""

from __future__ import annotations

from relay.core.bridge import Batch, Bridge, Limits
from relay.core.policy import Policy

#: What the upstream opens with, and its answer to the relay's session.update.
CREATED = '{"type":"session.created","event_id":"event_up1","session":{"instructions":"default"}}'
UPDATED = '{"type":"session.updated","event_id":"event_up2","session":{"instructions":"the relay"}}'


def flush_all(bridge: Bridge) -> list[str | bytes]:
    """Everything the bridge sends upstream while it flushes, in order."""
    out = []
    while (data := bridge.next_to_flush()) is not None:
        out.append(data)
    return out


def start(bridge: Bridge) -> tuple[str | bytes, ...]:
    """The upstream's session.created and its answer to the relay's update: what the client gets."""
    assert bridge.upstream_message(CREATED) is None
    batch = bridge.upstream_message(UPDATED)
    assert isinstance(batch, Batch)
    return batch.texts


def started(policy: Policy, limits: Limits = Limits(8, 1 << 20, 1 << 20)) -> Bridge:
    """A bridge past its start (upstream open and flushed, session.created delivered)."""
    bridge = Bridge(session_update='{"type":"session.update","session":{}}', limits=limits, policy=policy)
    bridge.upstream_opened()
    flush_all(bridge)
    start(bridge)
    return bridge
