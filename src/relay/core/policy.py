"""Server-authoritative session policy: what a client may change, send and see.

The relay's configured session is where a session starts: its ``session.update`` goes
upstream first. A client may then send its own, and :class:`Policy` screens each client
event before it goes upstream. It shapes rather than refuses:

* **locked** fields (``model`` by default) keep the relay's value: a locked field in a
  client's ``session.update`` or ``response.create`` is dropped from the event and the
  rest of it goes through. A value equal to the relay's (its configured session; for
  ``model``, the model the session runs) is no change and passes. ``on_locked = "refuse"``
  refuses the whole event instead (``relay_field_locked``);
* **allowed values** are shaped the same way: a voice not in ``voices``, or an unlocked
  ``model`` outside the relay's models (or the one a client's token allows), is dropped;
  ``max_output_tokens`` is clamped;
* **MCP tools** (``type: "mcp"``) make OpenAI call a remote server on the operator's
  account: one whose ``server_url``/``connector_id`` is not in ``mcp_servers`` is removed
  and the client gets an ``error`` event naming it (``relay_mcp_server_not_allowed``);
* event types a client may not send, and upstream events a client never sees: deny
  lists, and allow lists (empty: every type) for when only a known set may pass.

A dropped field is not announced to the client (an ``error`` event is the only way the
protocol has, and SDKs log it as a failure or raise on it); it is logged and counted for
the operator (:attr:`Screened.fields`). A refused event gets an ``error`` event in the
Realtime API's shape, with the client's ``event_id``, and the session goes on. What the
relay cannot parse it does not forward (``invalid_json``). Toward the client, the values of
server-only fields are removed from ``session.created``/``session.updated``, so a client
never sees the operator's instructions.

Audio appends, the bulk of the traffic, are recognised from their envelope
(:func:`~relay.core.events.is_audio_append`) and pass untouched.

The screens (:meth:`Policy.screen_client`, :meth:`Policy.screen_upstream`) run inside the
bridge's steps, so they follow the rules of a step (:mod:`relay.core.bridge`): no waiting, no
task context or contextvars, and no raising (a refused event is an ``error`` event returned,
not an exception), for the pump runs them where no Trio task runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from .events import dumps, error_event, finder, is_audio_append, parse_event

_APPEND_TYPE = "input_audio_buffer.append"
#: How an audio delta starts, as the API writes it (the upstream's word is taken for its type).
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
#: What :attr:`Screened.fields` names when a client's MCP tool is removed or refused.
MCP_FIELD = "mcp_server"
ON_LOCKED = ("drop", "refuse")

#: The keys of a ``[policy]`` table.
TABLE_KEYS = frozenset(
    {
        "locked",
        "on_locked",
        "voices",
        "max_output_tokens",
        "mcp_servers",
        "client_events_allowed",
        "client_events_denied",
        "upstream_events_allowed",
        "upstream_events_denied",
        "redacted",
    }
)


#: :meth:`Policy.screen_upstream`'s ``kind`` when the caller has not read the event.
UNREAD: Final = object()


@dataclass(slots=True)  # (not frozen: a frozen one costs several times as much to make)
class Screened:
    """What :meth:`Policy.screen_client` made of a client event.

    ``text`` goes upstream (None: nothing does), ``reply`` is an ``error`` event for the
    client. ``fields`` names what the policy acted on, for the operator's log and metrics:
    the fields dropped when ``text`` is set, the field a refusal is about when it is None.
    ``kind`` is the event's type, ``detail`` a loggable word on an MCP refusal (the hosts).
    """

    text: str | None
    reply: str | None = None
    fields: tuple[str, ...] = ()
    kind: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)  # (slots: read for every message, often cold in cache)
class Policy:
    locked: frozenset[str] = frozenset({"model"})
    on_locked: str = "drop"  # or "refuse": a locked field refuses the whole event
    voices: frozenset[str] = frozenset()  # empty: any voice
    max_output_tokens: int | None = None
    #: MCP servers clients may name: exact URLs, URL prefixes ending in "/", connector ids.
    mcp_servers: tuple[str, ...] = ()
    client_events_allowed: frozenset[str] = frozenset()  # empty: every type not denied
    client_events_denied: frozenset[str] = frozenset()
    upstream_events_allowed: frozenset[str] = frozenset()  # empty: every type not denied
    upstream_events_denied: frozenset[str] = frozenset()
    redacted: frozenset[str] = frozenset({"instructions"})
    #: Models (fnmatch patterns) a client may switch ``session.model`` to when it is not
    #: locked (empty: any). Not a ``[policy]`` key: the relay's models (RELAY_MODELS).
    models: tuple[str, ...] = ()
    #: The relay's configured session, whose values are no change. Not a ``[policy]`` key.
    session: Mapping[str, Any] = field(default_factory=dict)
    #: The model this session runs (see :meth:`for_session`); None outside a session.
    session_model: str | None = None
    #: Whether audio appends and audio deltas pass (worked out once: they are the bulk).
    appends_pass: bool = field(init=False, repr=False, compare=False)
    deltas_pass: bool = field(init=False, repr=False, compare=False)
    #: Whether client or upstream event types are screened by list at all (worked out once:
    #: most relays have no lists, and every event would look them up).
    client_lists: bool = field(init=False, repr=False, compare=False)
    upstream_lists: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "appends_pass", self.client_may_send(_APPEND_TYPE))
        object.__setattr__(self, "deltas_pass", self.client_may_see(_DELTA_TYPE))
        lists = self.client_events_allowed or self.client_events_denied
        object.__setattr__(self, "client_lists", bool(lists))
        lists = self.upstream_events_allowed or self.upstream_events_denied
        object.__setattr__(self, "upstream_lists", bool(lists))

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
        on_locked = table.get("on_locked", "drop")
        if on_locked not in ON_LOCKED:
            raise ValueError(f"[policy] on_locked must be 'drop' or 'refuse', got {on_locked!r}")
        servers = table.get("mcp_servers", ())
        if isinstance(servers, str) or not all(isinstance(s, str) and s for s in servers):
            raise ValueError(
                "[policy] mcp_servers must be a list of server URLs (exact, or a prefix ending"
                ' in "/") and connector ids, e.g. ["https://mcp.example.com/", "connector_gmail"]'
            )
        defaults = cls()
        return cls(
            locked=_names(table.get("locked"), defaults.locked),
            on_locked=on_locked,
            voices=_names(table.get("voices"), defaults.voices),
            max_output_tokens=limit,
            mcp_servers=tuple(servers),
            client_events_allowed=_names(table.get("client_events_allowed"), frozenset()),
            client_events_denied=_names(table.get("client_events_denied"), frozenset()),
            upstream_events_allowed=_names(table.get("upstream_events_allowed"), frozenset()),
            upstream_events_denied=_names(table.get("upstream_events_denied"), frozenset()),
            redacted=_names(table.get("redacted"), defaults.redacted),
        )

    def for_session(self, model: str, only_model: str | None = None) -> Policy:
        """This policy for one session running ``model``; ``only_model`` (a token's ``model``
        claim) is then the one model ``session.model`` may name, even when unlocked."""
        models = (only_model,) if only_model is not None else self.models
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

    def model_allowed(self, model: object) -> bool:
        """Whether an unlocked ``session.model`` may name ``model``."""
        if not self.models:
            return True
        return isinstance(model, str) and any(fnmatchcase(model, p) for p in self.models)

    def mcp_server_allowed(self, tool: Mapping[str, Any]) -> bool:
        """Whether an MCP tool names only servers of ``mcp_servers`` (and names one)."""
        named = [tool.get(key) for key in ("server_url", "connector_id") if key in tool]
        return bool(named) and all(
            isinstance(name, str)
            and any(name == s or (s.endswith("/") and name.startswith(s)) for s in self.mcp_servers)
            for name in named
        )

    # -- client → upstream ------------------------------------------------------

    def screen_client(self, text: str, append: bool | None = None) -> Screened:
        """What of a client's event goes upstream, and what the client is told. ``append``:
        whether ``text`` is an audio append (:func:`is_audio_append`), if the caller has
        looked already (None: look)."""
        if self.appends_pass and (is_audio_append(text) if append is None else append):
            return Screened(text, None, (), _APPEND_TYPE)
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            message = (
                f"The relay could not parse this message as JSON ({exc}), so nothing of it went"
                " upstream. Send each event as one JSON object."
            )
            return Screened(None, error_event("invalid_json", message))
        if not isinstance(event, dict):
            return Screened(text) if self.client_may_send(None) else self._refuse_kind({}, None)
        kind = event.get("type")
        kind = kind if isinstance(kind, str) else None
        if self.client_lists and not self.client_may_send(kind):
            return self._refuse_kind(event, kind)
        if kind == "session.update":
            return self._screen_object(event, "session", 0)
        if kind == "response.create":
            return self._screen_object(event, "response", 1)
        return Screened(text, None, (), kind)  # (positional: made for every event, and cheaper)

    def _refuse_kind(self, event: dict[str, Any], kind: str | None) -> Screened:
        message = f"This relay does not accept {kind!r} events from clients."
        refusal = _refusal(event, "relay_event_not_allowed", message, "type")
        return Screened(None, refusal, kind=kind)

    def _screen_object(self, event: dict[str, Any], key: str, which: int) -> Screened:
        """Shape (or, with ``on_locked = "refuse"``, refuse) a session.update or response.create.

        What goes upstream is the relay's own serialisation of what it read, changed or not:
        the upstream gets exactly what was screened, whatever its parser does with oddities
        such as duplicate keys.
        """
        kind = event["type"]
        inner = event.get(key)
        if not isinstance(inner, dict):
            return Screened(dumps(event), kind=kind)  # malformed: the upstream answers it
        refuse = self.on_locked == "refuse"
        dropped: list[str] = []
        for name in sorted(self.locked | {"model", "voice"}):
            path = FIELD_PATHS[name][which]
            if not path or not _has(inner, path):
                continue
            value = _get(inner, path)
            where = f"{key}.{'.'.join(path)}"
            running = f"This session runs {self.session_model!r}. " if name == "model" else ""
            if name in self.locked:
                if self._is_relays(name, value):
                    continue  # no change
                code = "relay_field_locked"
                message = f"{running}The relay sets {where}; clients may not change it."
                if name == "model":
                    message += " Pick the model when connecting (?model=)."
            elif name == "model" and value != self.session_model and not self.model_allowed(value):
                code = "relay_value_not_allowed"
                message = (
                    f"{running}Model {value!r} is not available here; allowed:"
                    f" {', '.join(sorted(self.models))}."
                )
            elif name == "voice" and self.voices and value not in self.voices:
                code = "relay_value_not_allowed"
                message = (
                    f"Voice {value!r} is not available here; allowed:"
                    f" {', '.join(sorted(self.voices))}."
                )
            else:
                continue
            if refuse:
                return Screened(None, _refusal(event, code, message, where), (name,), kind)
            _remove(inner, path)
            dropped.append(name)
        reply = None
        detail = ""
        tools = inner.get("tools")
        if isinstance(tools, list):
            refused = [t for t in tools if _is_mcp(t) and not self.mcp_server_allowed(t)]
            if refused:
                names = ", ".join(repr(_server(t)) for t in refused)
                detail = ",".join(sorted({_host(_server(t)) for t in refused}))
                message = (
                    f"MCP server {names} is not allowed through this relay, so"
                    f" {'the event was refused' if refuse else 'that tool was removed'};"
                    " the operator lists the servers clients may use ([policy] mcp_servers)."
                )
                reply = _refusal(event, "relay_mcp_server_not_allowed", message, f"{key}.tools")
                if refuse:
                    return Screened(None, reply, (MCP_FIELD,), kind, detail)
                inner["tools"] = [t for t in tools if not any(t is r for r in refused)]
                dropped.append(MCP_FIELD)
        limit = self.max_output_tokens
        asked = inner.get("max_output_tokens")
        if limit is not None and (asked == "inf" or (isinstance(asked, int) and asked > limit)):
            inner["max_output_tokens"] = limit
        return Screened(dumps(event), reply, tuple(dropped), kind, detail)

    def _is_relays(self, name: str, value: object) -> bool:
        """Whether ``value`` is the relay's own for the field ``name`` (so no change)."""
        if name == "model":
            return value == self.session_model
        path = FIELD_PATHS[name][0]
        return _has(self.session, path) and _get(self.session, path) == value

    # -- upstream → client ------------------------------------------------------

    def screen_upstream(self, text: str, kind: object = UNREAD) -> str | None:
        """What the client may see of an upstream event (None: nothing). ``kind``: the
        ``type`` a parser reads in ``text``, if the caller has parsed it (None: it has none)."""
        lists = self.upstream_lists
        if not lists and not self.redacted:
            return text
        event = None
        if kind is UNREAD:
            if text.startswith(DELTA):
                return text if self.deltas_pass else None
            if not lists and not _may_be_session(text):
                return text  # only session events are redacted, and this cannot be one
            event = parse_event(text)
            kind = event.get("type") if event is not None else None
        if lists and not self.client_may_see(kind if isinstance(kind, str) else None):
            return None
        if (kind == "session.created" or kind == "session.updated") and self.redacted:
            event = parse_event(text) if event is None else event
            session = event.get("session")  # type: ignore[union-attr]
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


def _refusal(event: Mapping[str, Any], code: str, message: str, param: str) -> str:
    """An ``error`` event about a client's event, naming its ``event_id``."""
    client_id = event.get("event_id")
    client_id = client_id if isinstance(client_id, str) else None
    return error_event(code, message, param=param, client_event_id=client_id)


def _is_mcp(tool: object) -> bool:
    return isinstance(tool, dict) and tool.get("type") == "mcp"


def _server(tool: Mapping[str, Any]) -> str:
    """What an MCP tool names as its server (for the client's error)."""
    name = tool.get("server_url", tool.get("connector_id"))
    return name if isinstance(name, str) else "(none)"


def _host(name: str) -> str:
    """A loggable word for an MCP server: its URL's host, never its path or query, which may
    carry credentials; a connector id as it is."""
    if "://" not in name:
        return name[:64]
    try:
        return urlsplit(name).hostname or "?"
    except ValueError:
        return "?"


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
