"""Fault injection options for the fake server.

Faults are set per server (``MockConfig.faults``, CLI flags) and can be overridden
per connection with the request header ``x-mock-faults``: comma-separated
``name=value`` pairs using the field names below, e.g.::

    x-mock-faults: drop_after_events=3, send_delay=0.01
    x-mock-faults: close_after_open=4001:going away
    x-mock-faults: stall
    x-mock-faults: refuse_status=none

Booleans accept ``true/false/1/0/yes/no`` (a bare name means true), ``none`` resets an
optional field, and ``close_after_open`` takes ``CODE:REASON`` (the reason cannot
contain a comma). A malformed header is answered with HTTP 400 and a JSON error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Final

FAULTS_HEADER: Final = "x-mock-faults"


@dataclass(frozen=True)
class Faults:
    """Misbehaviours applied to every connection (all off by default).

    - ``handshake_delay``: seconds to wait before answering the upgrade (``trio.sleep``).
    - ``refuse_status``: answer the upgrade with this HTTP status and a JSON error body.
    - ``close_after_open``: accept, send ``session.created``, then close with (code, reason).
    - ``drop_after_events``: after sending N server events, drop the TCP connection
      without a close frame (the client sees 1006).
    - ``stall``: accept and send ``session.created``, then never read the socket again
      (no pongs, no close handshake) and send nothing more.
    - ``send_delay``: seconds to wait before each server event (a slow sender).
    - ``inject_error_after``: after the Nth client message, send one ``error`` event of
      type ``server_error`` (the connection stays open).
    - ``transcription_failure``: every input audio transcription ends with
      ``conversation.item.input_audio_transcription.failed`` instead of a transcript.
    - ``kill_mid_response``: the server's Nth response (counted over all its connections,
      from 1) is cut in the middle: right after its first ``*.delta`` event the TCP
      connection drops without a close frame (1006), once. The dial that follows (a relay's
      failover) is served normally.
    - ``deaf_after_response``: once the server's Nth response (counted like
      ``kill_mid_response``) is done, its connection goes silent for good, once: it reads
      nothing more (no pongs, no close handshake) and sends nothing more, and TCP stays up,
      as a peer that hangs does. The dial that follows is served normally.
    """

    handshake_delay: float = 0.0
    refuse_status: int | None = None
    close_after_open: tuple[int, str] | None = None
    drop_after_events: int | None = None
    stall: bool = False
    send_delay: float = 0.0
    inject_error_after: int | None = None
    transcription_failure: bool = False
    kill_mid_response: int | None = None
    deaf_after_response: int | None = None

    def __post_init__(self) -> None:
        for name in ("handshake_delay", "send_delay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.refuse_status is not None and not 400 <= self.refuse_status <= 599:
            raise ValueError(
                f"refuse_status must be an HTTP error status (400-599), got {self.refuse_status!r}"
            )
        if self.close_after_open is not None:
            code, reason = self.close_after_open
            if not (code in (1000, 1001, 1008, 1011) or 3000 <= code <= 4999):
                raise ValueError(
                    f"close_after_open code {code} cannot be sent in a close frame; "
                    "use 1000, 1001, 1008, 1011 or 3000-4999"
                )
            if len(reason.encode()) > 123:
                raise ValueError("close_after_open reason must be at most 123 bytes of UTF-8")
        for name in ("drop_after_events", "inject_error_after", "kill_mid_response"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def any(self) -> bool:
        """True if any fault is switched on."""
        return self != Faults()


_TRUE: Final = ("true", "1", "yes", "on")
_FALSE: Final = ("false", "0", "no", "off")


def _parse_value(name: str, text: str, field_type: Any) -> Any:
    kind = str(field_type)
    if text.lower() == "none" and "None" in kind:
        return None
    try:
        if name == "close_after_open":
            code, sep, reason = text.partition(":")
            if not sep:
                raise ValueError
            return (int(code), reason)
        if kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kind.startswith("int"):
            return int(text)
        return float(text)
    except ValueError:
        raise ValueError(f"bad value {text!r} for fault {name!r}") from None


def parse_faults(text: str, base: Faults | None = None) -> Faults:
    """Parse an ``x-mock-faults`` header value on top of ``base``; raises ``ValueError``."""
    base = base or Faults()
    fields = {f.name: f.type for f in dataclasses.fields(Faults)}
    changes: dict[str, Any] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if name not in fields:
            known = ", ".join(fields)
            raise ValueError(f"unknown fault {name!r}; known faults: {known}")
        if not sep:
            if fields[name] != "bool":
                raise ValueError(f"fault {name!r} needs a value ({name}=...)")
            value = "true"
        changes[name] = _parse_value(name, value.strip(), fields[name])
    return dataclasses.replace(base, **changes)
