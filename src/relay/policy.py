"""Server-authoritative session policy: what a client may change, send and see.

The relay's ``session.update`` comes first; after that a client may still send its
own, and :class:`Policy` decides about each client event before it goes upstream:

* **locked** fields (``instructions`` and ``tools`` by default) may not be set by a
  client, neither in ``session.update`` nor as ``response.create`` overrides;
* **allowed values** (voices) and **clamps** (``max_output_tokens``);
* event types a client may not send at all.

A refused event gets an ``error`` event in the Realtime API's shape (with the
client's ``event_id``) and the session goes on. Toward the client, the values of
server-only fields are removed from ``session.created``/``session.updated``, so a
client never sees the operator's instructions.

Audio appends, the bulk of the traffic, are recognised from their first bytes
and pass untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .events import dumps, error_event, event_type, parse_event

_APPEND = '{"type":"input_audio_buffer.append"'

#: Where each lockable field lives in a GA session object and in a response.create override.
FIELD_PATHS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instructions": (("instructions",), ("instructions",)),
    "tools": (("tools",), ("tools",)),
    "tool_choice": (("tool_choice",), ("tool_choice",)),
    "voice": (("audio", "output", "voice"), ("audio", "output", "voice")),
    "model": (("model",), ("model",)),
    "prompt": (("prompt",), ("prompt",)),
    "turn_detection": (("audio", "input", "turn_detection"), ()),
    "output_modalities": (("output_modalities",), ("output_modalities",)),
}


@dataclass(frozen=True)
class Policy:
    locked: frozenset[str] = frozenset({"instructions", "tools"})
    voices: frozenset[str] = frozenset()  # empty: any voice
    max_output_tokens: int | None = None
    client_events_denied: frozenset[str] = frozenset()
    upstream_events_denied: frozenset[str] = frozenset()
    redacted: frozenset[str] = frozenset({"instructions"})

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Policy:
        """Build from the ``[policy]`` table of the config file; raises ValueError on a bad key."""
        known = {
            "locked",
            "voices",
            "max_output_tokens",
            "client_events_denied",
            "upstream_events_denied",
            "redacted",
        }
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"unknown [policy] keys {sorted(unknown)}; known: {sorted(known)}")
        for name in ("locked", "redacted"):
            bad = set(table.get(name, ())) - set(FIELD_PATHS)
            if bad:
                raise ValueError(
                    f"[policy] {name}: unknown fields {sorted(bad)}; known: {sorted(FIELD_PATHS)}"
                )
        limit = table.get("max_output_tokens")
        if limit is not None and (not isinstance(limit, int) or not 1 <= limit <= 4096):
            raise ValueError("[policy] max_output_tokens must be an integer from 1 to 4096")
        defaults = cls()
        return cls(
            locked=_names(table.get("locked"), defaults.locked),
            voices=_names(table.get("voices"), defaults.voices),
            max_output_tokens=limit,
            client_events_denied=_names(table.get("client_events_denied"), frozenset()),
            upstream_events_denied=_names(table.get("upstream_events_denied"), frozenset()),
            redacted=_names(table.get("redacted"), defaults.redacted),
        )

    # -- client → upstream ------------------------------------------------------

    def screen_client(self, text: str) -> tuple[str | None, str | None]:
        """``(text to send upstream or None, error event for the client or None)``."""
        if text.startswith(_APPEND) and _APPEND not in self.client_events_denied:
            return text, None
        kind = event_type(text)
        if kind in self.client_events_denied:
            message = f"This relay does not accept {kind!r} events from clients."
            return None, self._refuse(text, "relay_event_not_allowed", message, "type")
        if kind == "session.update":
            return self._screen_object(text, "session", 0)
        if kind == "response.create":
            return self._screen_object(text, "response", 1)
        return text, None

    def _screen_object(self, text: str, key: str, which: int) -> tuple[str | None, str | None]:
        event = parse_event(text)
        inner = event.get(key) if event else None
        if not isinstance(inner, dict):
            return text, None  # malformed: the upstream answers it with its own error
        for name in sorted(self.locked):
            path = FIELD_PATHS[name][which]
            if path and _has(inner, path):
                where = f"{key}.{'.'.join(path)}"
                message = f"The relay sets {where}; clients may not change it."
                return None, self._refuse(text, "relay_field_locked", message, where)
        if self.voices:
            voice = _get(inner, FIELD_PATHS["voice"][which])
            if voice is not None and voice not in self.voices:
                allowed = ", ".join(sorted(self.voices))
                message = f"Voice {voice!r} is not available here; allowed: {allowed}."
                where = f"{key}.audio.output.voice"
                return None, self._refuse(text, "relay_value_not_allowed", message, where)
        limit = self.max_output_tokens
        asked = inner.get("max_output_tokens")
        if limit is not None and (asked == "inf" or (isinstance(asked, int) and asked > limit)):
            inner["max_output_tokens"] = limit
            return dumps(event), None  # type: ignore[arg-type]
        return text, None

    @staticmethod
    def _refuse(text: str, code: str, message: str, param: str) -> str:
        event = parse_event(text)
        client_id = event.get("event_id") if event else None
        client_id = client_id if isinstance(client_id, str) else None
        return error_event(code, message, param=param, client_event_id=client_id)

    # -- upstream → client ------------------------------------------------------

    def screen_upstream(self, text: str) -> str | None:
        """What the client may see of an upstream event (None: nothing)."""
        if not self.upstream_events_denied and not self.redacted:
            return text
        if text.startswith('{"type":"response.output_audio.delta"'):
            return None if "response.output_audio.delta" in self.upstream_events_denied else text
        kind = event_type(text)
        if kind in self.upstream_events_denied:
            return None
        if kind in ("session.created", "session.updated") and self.redacted:
            event = parse_event(text)
            session = event.get("session") if event else None
            if isinstance(session, dict):
                self.redact_session(session)
                return dumps(event)  # type: ignore[arg-type]
        return text

    def redact_session(self, session: dict[str, Any]) -> None:
        """Remove the server-only fields from a session object a client will see (in place)."""
        for name in self.redacted:
            _remove(session, FIELD_PATHS[name][0])


def _names(value: Iterable[str] | None, default: frozenset[str]) -> frozenset[str]:
    return default if value is None else frozenset(str(v) for v in value)


def _get(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _has(obj: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return False
        obj = obj[part]
    return True


def _remove(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    *parents, last = path
    for part in parents:
        obj = obj.get(part)  # type: ignore[assignment]
        if not isinstance(obj, dict):
            return
    obj.pop(last, None)
