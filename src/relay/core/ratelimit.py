"""A client's inbound rate limit, as data: a token bucket over the sizes of its messages.

One abusive client sending audio appends as fast as its connection takes them (hundreds of MB/s
on loopback) costs the relay more than hundreds of real callers, who send about 66 kB/s each
(24 kHz PCM16 as base64 JSON). The limit is generous (``RELAY_CLIENT_MAX_RATE``, by default
about ten times real-time audio), and a client may run ahead of it by :data:`BURST_SECONDS` of
its allowance, so a recorded file sent at once, or a client catching up after a stall, passes;
a flood does not. The shell feeds it each message's size and the time; it does arithmetic only.
"""

from __future__ import annotations

#: How far (seconds of its allowance) a client may run ahead of its rate.
BURST_SECONDS = 10.0


class InboundRate:
    """``rate`` bytes a second, ``rate * BURST_SECONDS`` at once; full at ``now``."""

    # (checked for every client message, often cold in cache: slots, and one method)
    __slots__ = ("rate", "_burst", "_level", "_at")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._burst = rate * BURST_SECONDS
        self._level = self._burst
        self._at = now

    def take(self, size: int, now: float) -> bool:
        """Count a message of ``size`` bytes that arrived at ``now``; False: over the limit."""
        level = self._level + (now - self._at) * self.rate
        if level > self._burst:
            level = self._burst
        self._level = level = level - size
        self._at = now
        return level >= 0
