"""The relay's side of a call it does not carry, as a state machine without I/O.

On a WebRTC or SIP call the audio and the caller's events go straight between the caller
and OpenAI; the relay watches from a **sideband** WebSocket (``?call_id=``), which sees
every server event and may send client events. So the policy cannot screen the caller's
events before they arrive, as :class:`~relay.core.bridge.Bridge` does: it is kept on the
session instead. Each ``session.created``/``session.updated`` is compared with what the
policy allows, and anything out of bounds is put back with a ``session.update`` of the
sideband's own:

* **locked** fields go back to the relay's values (a field the relay's session leaves
  unset goes back to the API's default, where that is known: no tools, ``auto`` tool
  choice, no prompt, audio output);
* a **voice** outside the allowed ones goes back to the relay's;
* ``max_output_tokens`` above the clamp comes down to it.

A caller who keeps changing a field back (or an upstream that will not take the
correction) would keep the two sides trading updates for ever: after
:data:`MAX_FUTILE_CORRECTIONS` corrections in a row that did not stick, the machine gives
up and the shell hangs up the call.

It also collects each ``response.done`` for usage accounting, and counts the sideband's
traffic. What it cannot do: hold a caller's per-response overrides (``response.create``
with its own instructions goes straight to OpenAI), redact what the caller's own data
channel shows, or apply the event allow/deny lists. See docs/calls.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

from .bridge import Traffic
from .events import dumps, event_type, parse_event
from .policy import FIELD_PATHS, Policy

#: What a lockable field reads as in a session that does not set it (the API's default).
UNSET: Final[Mapping[str, Any]] = {
    "tools": [],
    "tool_choice": "auto",
    "prompt": None,
    "output_modalities": ["audio"],
}
#: Corrections in a row, with no session in bounds between them, before the call is given up.
MAX_FUTILE_CORRECTIONS: Final = 8
_SESSION_EVENTS: Final = ("session.created", "session.updated")
#: How the ``event_id`` of the sideband's own events starts (an error naming one is the
#: upstream refusing the relay's update, not the caller's mistake).
EVENT_ID_PREFIX: Final = "relay_sideband_"
_MISSING: Final = object()


class GiveUp:
    """The caller keeps the session out of the policy's bounds: hang up."""

    __slots__ = ("fields",)

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields


class Sideband:
    """Decides what the relay sends on one call's sideband (see the module docstring)."""

    def __init__(self, policy: Policy, session: Mapping[str, Any], model: str) -> None:
        self._policy = policy
        self._model = model
        #: Where each enforced field lives and the value it must have.
        self._wanted: dict[str, tuple[tuple[str, ...], Any]] = {}
        for name in sorted(policy.locked):
            path = FIELD_PATHS[name][0]
            if name == "model":
                self._wanted[name] = (path, model)
                continue
            value = _get(session, path)
            if value is _MISSING:
                value = UNSET.get(name, _MISSING)
            if value is not _MISSING:
                self._wanted[name] = (path, copy.deepcopy(value))
        voice = _get(session, FIELD_PATHS["voice"][0])
        self._voice = voice if voice is not _MISSING and _allowed_voice(policy, voice) else None
        self.traffic = Traffic()
        #: ``response.done`` events since the shell last took them (for usage and budgets).
        self.responses_done: list[dict[str, object]] = []
        #: Corrections sent in all, and in a row without the session coming back in bounds.
        self.corrections = 0
        self._futile = 0
        #: The fields put back so far (for the call's log line).
        self.corrected: set[str] = set()
        #: The upstream's ``error`` events answering the sideband's own updates (for the log).
        self.refused: list[dict[str, object]] = []
        self._sent = 0

    def opening(self) -> str:
        """The ``session.update`` sent as the sideband attaches: the locked fields as the
        relay sets them, in case the caller changed one before the relay was watching."""
        patch: dict[str, Any] = {"type": "realtime"}
        for path, value in self._wanted.values():
            _put(patch, path, value)
        if self._policy.max_output_tokens is not None:
            patch["max_output_tokens"] = self._policy.max_output_tokens
        return self._update(patch)

    def _update(self, patch: dict[str, Any]) -> str:
        """A ``session.update`` of the sideband's, with an ``event_id`` an error can name."""
        self._sent += 1
        event_id = f"{EVENT_ID_PREFIX}{self._sent}"
        return dumps({"type": "session.update", "event_id": event_id, "session": patch})

    def upstream_message(self, data: str | bytes) -> str | GiveUp | None:
        """One message on the sideband: a correcting ``session.update`` to send, a
        :class:`GiveUp`, or None."""
        traffic = self.traffic
        traffic.upstream_messages += 1
        traffic.upstream_bytes += len(data)
        if data.__class__ is not str:
            return None
        kind = event_type(data)  # type: ignore[arg-type]
        if kind == "response.done":
            event = parse_event(data)  # type: ignore[arg-type]
            if event is not None:
                self.responses_done.append(event)
            return None
        if kind == "error":
            event = parse_event(data)  # type: ignore[arg-type]
            error = event.get("error") if event else None
            if isinstance(error, dict) and str(error.get("event_id")).startswith(EVENT_ID_PREFIX):
                self.refused.append(error)
            return None
        if kind not in _SESSION_EVENTS:
            return None
        event = parse_event(data)  # type: ignore[arg-type]
        session = event.get("session") if event else None
        if not isinstance(session, dict):
            return None
        patch, fields = self.correction(session)
        if patch is None:
            self._futile = 0
            return None
        if self._futile >= MAX_FUTILE_CORRECTIONS:
            return GiveUp(fields)
        self._futile += 1
        self.corrections += 1
        self.corrected.update(fields)
        return self._update(patch)

    def correction(self, session: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        """The ``session`` of a ``session.update`` that brings ``session`` back within the
        policy, and the names of the fields it puts back; (None, []) if it is within."""
        patch: dict[str, Any] = {"type": "realtime"}
        fields: list[str] = []
        for name, (path, value) in self._wanted.items():
            if not _within(value, _get(session, path)):
                _put(patch, path, value)
                fields.append(name)
        policy = self._policy
        voice_path = FIELD_PATHS["voice"][0]
        voice = _get(session, voice_path)
        if voice is not _MISSING and not _allowed_voice(policy, voice) and self._voice is not None:
            _put(patch, voice_path, self._voice)
            fields.append("voice")
        limit = policy.max_output_tokens
        asked = session.get("max_output_tokens")
        if limit is not None and (asked == "inf" or (isinstance(asked, int) and asked > limit)):
            patch["max_output_tokens"] = limit
            fields.append("max_output_tokens")
        return (patch, fields) if fields else (None, [])


def _allowed_voice(policy: Policy, voice: object) -> bool:
    return not policy.voices or voice in policy.voices


def _within(wanted: Any, actual: Any) -> bool:
    """Whether ``actual`` (as the API renders it) has what ``wanted`` sets: every key of a
    wanted object (the API adds defaults of its own), every item of a wanted list, equal
    values otherwise. Unset and null are the same."""
    if actual is _MISSING:
        actual = None
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            _within(value, actual.get(key, _MISSING)) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(_within(w, a) for w, a in zip(wanted, actual, strict=True))
        )
    return bool(wanted == actual)


def _get(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _put(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    *parents, last = path
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = copy.deepcopy(value)
