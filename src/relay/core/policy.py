"""Server-authoritative session policy: what a client may change, send and see.

The relay's ``session.update`` comes first; after that a client may still send its
own, and :class:`Policy` decides about each client event before it goes upstream:

* **locked** fields (``instructions``, ``tools`` and ``model`` by default) may not be
  set by a client, neither in ``session.update`` nor as ``response.create`` overrides.
  ``session.model`` naming the model the session already runs passes (SDKs send it
  with every update); a locked model cannot be changed, an unlocked one only to one
  of the relay's models (``RELAY_MODELS``, or the one a client's token allows);
* **allowed values** (voices) and **clamps** (``max_output_tokens``);
* event types a client may not send, and upstream events a client never sees: deny
  lists, and allow lists (empty: every type) for when only a known set may pass.

A refused event gets an ``error`` event in the Realtime API's shape (with the
client's ``event_id``) and the session goes on. Toward the client, the values of
server-only fields are removed from ``session.created``/``session.updated``, so a
client never sees the operator's instructions.

Audio appends, the bulk of the traffic, are recognised from their first bytes
and pass untouched.

The screens (:meth:`Policy.screen_client`, :meth:`Policy.screen_upstream`) run inside the
bridge's steps, so they follow the rules of a step (:mod:`relay.core.bridge`): no waiting, no
task context or contextvars, and no raising (a refused event is an ``error`` event returned,
not an exception), for the pump runs them where no Trio task runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .events import dumps, error_event, event_type, finder, parse_event

_APPEND_TYPE = "input_audio_buffer.append"
#: How an audio append and an audio delta start, as the SDKs and the API write them.
APPEND = '{"type":"input_audio_buffer.append"'
_DELTA_TYPE = "response.output_audio.delta"
DELTA = '{"type":"response.output_audio.delta"'

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


#: The keys of a ``[policy]`` table.
TABLE_KEYS = frozenset(
    {
        "locked",
        "voices",
        "max_output_tokens",
        "client_events_allowed",
        "client_events_denied",
        "upstream_events_allowed",
        "upstream_events_denied",
        "redacted",
    }
)


@dataclass(frozen=True, slots=True)  # (slots: read for every message, often cold in cache)
class Policy:
    locked: frozenset[str] = frozenset({"instructions", "tools", "model"})
    voices: frozenset[str] = frozenset()  # empty: any voice
    max_output_tokens: int | None = None
    client_events_allowed: frozenset[str] = frozenset()  # empty: every type not denied
    client_events_denied: frozenset[str] = frozenset()
    upstream_events_allowed: frozenset[str] = frozenset()  # empty: every type not denied
    upstream_events_denied: frozenset[str] = frozenset()
    redacted: frozenset[str] = frozenset({"instructions"})
    #: Models a client may switch ``session.model`` to when it is not locked (empty: any).
    #: Not a ``[policy]`` key: the relay's models (RELAY_MODELS) are filled in.
    models: frozenset[str] = frozenset()
    #: The model this session runs (see :meth:`for_session`); None outside a session.
    session_model: str | None = None
    #: Whether audio appends and audio deltas pass (worked out once: they are the bulk).
    appends_pass: bool = field(init=False, repr=False, compare=False)
    deltas_pass: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "appends_pass", self.client_may_send(_APPEND_TYPE))
        object.__setattr__(self, "deltas_pass", self.client_may_see(_DELTA_TYPE))

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Policy:
        """Build from the ``[policy]`` table of the config file; raises ValueError on a bad key."""
        unknown = set(table) - TABLE_KEYS
        if unknown:
            raise ValueError(
                f"unknown [policy] keys {sorted(unknown)}; known: {sorted(TABLE_KEYS)}"
            )
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
            client_events_allowed=_names(table.get("client_events_allowed"), frozenset()),
            client_events_denied=_names(table.get("client_events_denied"), frozenset()),
            upstream_events_allowed=_names(table.get("upstream_events_allowed"), frozenset()),
            upstream_events_denied=_names(table.get("upstream_events_denied"), frozenset()),
            redacted=_names(table.get("redacted"), defaults.redacted),
        )

    def for_session(self, model: str, only_model: str | None = None) -> Policy:
        """This policy for one session running ``model``; ``only_model`` (a token's ``model``
        claim) is then the one model ``session.model`` may name, even when unlocked."""
        models = frozenset({only_model}) if only_model is not None else self.models
        return replace(self, session_model=model, models=models)

    def client_may_send(self, kind: str | None) -> bool:
        """Whether the event type passes the client allow and deny lists."""
        if kind in self.client_events_denied:
            return False
        return not self.client_events_allowed or kind in self.client_events_allowed

    def client_may_see(self, kind: str | None) -> bool:
        """Whether the upstream event type passes the upstream allow and deny lists."""
        if kind in self.upstream_events_denied:
            return False
        return not self.upstream_events_allowed or kind in self.upstream_events_allowed

    # -- client → upstream ------------------------------------------------------

    def screen_client(self, text: str) -> tuple[str | None, str | None]:
        """``(text to send upstream or None, error event for the client or None)``."""
        if self.appends_pass and text.startswith(APPEND):
            return text, None
        kind = event_type(text)
        if not self.client_may_send(kind):
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
        if which == 0 and "model" in inner:
            refusal = self._screen_model(text, inner["model"])
            if refusal is not None:
                return None, refusal
        for name in sorted(self.locked):
            path = FIELD_PATHS[name][which]
            if which == 0 and name == "model":
                continue  # screened above: naming the session's own model is fine
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

    def _screen_model(self, text: str, model: object) -> str | None:
        """The refusal of a ``session.update`` that names ``model``, if it is refused."""
        if model == self.session_model:
            return None  # no change
        running = f"This session runs {self.session_model!r}. " if self.session_model else ""
        if "model" in self.locked:
            message = (
                f"{running}The relay sets session.model; clients may not change it. Pick the"
                " model when connecting (?model=)."
            )
            return self._refuse(text, "relay_field_locked", message, "session.model")
        if self.models and model not in self.models:
            allowed = ", ".join(sorted(self.models))
            message = f"{running}Model {model!r} is not available here; allowed: {allowed}."
            return self._refuse(text, "relay_value_not_allowed", message, "session.model")
        return None

    @staticmethod
    def _refuse(text: str, code: str, message: str, param: str) -> str:
        event = parse_event(text)
        client_id = event.get("event_id") if event else None
        client_id = client_id if isinstance(client_id, str) else None
        return error_event(code, message, param=param, client_event_id=client_id)

    # -- upstream → client ------------------------------------------------------

    def screen_upstream(self, text: str) -> str | None:
        """What the client may see of an upstream event (None: nothing)."""
        if (
            not self.upstream_events_denied
            and not self.upstream_events_allowed
            and not self.redacted
        ):
            return text
        if text.startswith(DELTA):
            return text if self.deltas_pass else None
        if (
            not self.upstream_events_denied
            and not self.upstream_events_allowed
            and not _may_be_session(text)
        ):
            return text  # only session events are redacted, and this cannot be one
        kind = event_type(text)
        if not self.client_may_see(kind):
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


_has_session_dot = finder("session.")


def _may_be_session(text: str) -> bool:
    """Whether a parser could read ``session.…`` anywhere in ``text``: only if it is there
    as such, or written with escapes (a backslash). Two ``memchr`` scans of an audio event,
    where reading its type walks all of it in Python."""
    return "\\" in text or _has_session_dot(text)


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
