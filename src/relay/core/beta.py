"""The retired beta dialect of the Realtime API, translated to GA and back, without I/O.

The Realtime API stopped speaking its beta dialect (``OpenAI-Beta: realtime=v1``) in May 2026.
A client that still asks for it is served in beta by the relay, which speaks GA upstream:
:class:`BetaTranslator` turns each beta client event into its GA form and each GA server event
into its beta form. Everything the relay decides (policy, accounting, limits) is decided on the
GA side, by :class:`BetaBridge`, a :class:`~relay.core.bridge.Bridge` that translates at its
edges.

The translation is driven by tables: where each flat beta session field lives in the nested GA
session (:data:`SESSION_FIELDS`), how the overrides of ``response.create`` and the fields of a
response object move (:data:`RESPONSE_CREATE_FIELDS`, :data:`RESPONSE_FIELDS`), which server
events are renamed (:data:`SERVER_RENAMES`), and the content types of items
(:data:`CONTENT_TYPES`). Each table is read both ways, so the same rows give the GA → beta
direction the tests use to check that beta → GA → beta returns what it started from.

What has no faithful translation is refused with an ``error`` event (or, for a field the GA API
lacks, dropped with one), never dropped in silence; docs/beta.md lists it all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .bridge import Amended, Batch, Bridge, Ending, Message, Reply
from .events import dumps, error_event, event_type, is_audio_append, parse_event

#: The subprotocol a browser offers to ask for the beta dialect (headers cannot be set there).
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"

#: Retired models and the current model each one now runs on (``RELAY_MODEL_ALIASES``):
#: today's default (:data:`relay.core.models.DEFAULT`) and its mini.
DEFAULT_MODEL_ALIASES: dict[str, str] = {
    "gpt-4o-realtime-preview": "gpt-realtime-2.1",
    "gpt-4o-realtime-preview-2024-10-01": "gpt-realtime-2.1",
    "gpt-4o-realtime-preview-2024-12-17": "gpt-realtime-2.1",
    "gpt-4o-realtime-preview-2025-06-03": "gpt-realtime-2.1",
    "gpt-4o-mini-realtime-preview": "gpt-realtime-2.1-mini",
    "gpt-4o-mini-realtime-preview-2024-12-17": "gpt-realtime-2.1-mini",
}

Event = dict[str, Any]
Path = tuple[str, ...]


def asks_for_beta(headers: list[tuple[bytes, bytes]], offered: Any) -> bool:
    """Whether a handshake asks for the beta dialect (header or subprotocol)."""
    return BETA_SUBPROTOCOL in offered or any(
        name == b"openai-beta" and b"realtime=v1" in value.replace(b" ", b"")
        for name, value in headers
    )


class Untranslatable(Exception):
    """A beta event (or a value in it) that has no GA form: answered with an error event."""

    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# -- values ---------------------------------------------------------------------------------

_BETA_FORMATS: dict[str, Event] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}
_GA_FORMATS = {ga["type"]: beta for beta, ga in _BETA_FORMATS.items()}


def _same(value: Any, param: str = "") -> Any:
    return value


def _format_to_ga(value: Any, param: str) -> Any:
    if isinstance(value, str) and value in _BETA_FORMATS:
        return dict(_BETA_FORMATS[value])
    raise Untranslatable(
        "invalid_value",
        f"Invalid value: {value!r}. Supported values are: 'pcm16', 'g711_ulaw', and 'g711_alaw'.",
        param,
    )


def _format_to_beta(value: Any) -> Any:
    """A GA format object as its beta name; 24 kHz is the only PCM rate either dialect has."""
    if isinstance(value, dict) and value.get("rate", 24000) == 24000:
        return _GA_FORMATS.get(value.get("type"), value)  # type: ignore[arg-type]
    return value


def _modalities_to_ga(value: Any, param: str) -> Any:
    """Beta lists what the model may produce (audio always came with its transcript); GA names
    the one output: ``["text", "audio"]`` is ``["audio"]``."""
    if isinstance(value, list) and value and set(value) <= {"text", "audio"}:
        return ["audio"] if "audio" in value else ["text"]
    raise Untranslatable(
        "invalid_value",
        f"Invalid value for '{param}': {value!r}. Supported values are ['text'] and"
        " ['text', 'audio'].",
        param,
    )


def _modalities_to_beta(value: Any) -> Any:
    if value == ["audio"]:
        return ["text", "audio"]
    return value


def _turn_detection_to_beta(value: Any) -> Any:
    """GA writes ``idle_timeout_ms: null``; beta had no such field unless it was set."""
    if isinstance(value, dict) and "idle_timeout_ms" in value and value["idle_timeout_ms"] is None:
        value = {k: v for k, v in value.items() if k != "idle_timeout_ms"}
    return value


#: Content types of items that differ: beta → GA (assistant messages; the rest are the same).
CONTENT_TYPES = {"text": "output_text", "audio": "output_audio"}
_CONTENT_TYPES_BETA = {ga: beta for beta, ga in CONTENT_TYPES.items()}


def _part(part: Any, types: Mapping[str, str]) -> Any:
    if isinstance(part, dict) and part.get("type") in types:
        return {**part, "type": types[part["type"]]}
    return part


def _item(item: Any, types: Mapping[str, str]) -> Any:
    if isinstance(item, dict) and isinstance(item.get("content"), list):
        return {**item, "content": [_part(part, types) for part in item["content"]]}
    return item


def _items(items: Any, types: Mapping[str, str]) -> Any:
    return [_item(item, types) for item in items] if isinstance(items, list) else items


def _items_to_ga(items: Any, param: str) -> Any:
    return _items(items, CONTENT_TYPES)


def _items_to_beta(items: Any) -> Any:
    return _items(items, _CONTENT_TYPES_BETA)


# -- tables -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One flat beta field, where it lives in GA, and how its value changes each way."""

    beta: str
    ga: Path
    to_ga: Callable[[Any, str], Any] = _same
    to_beta: Callable[[Any], Any] = _same


_MODALITIES = Field("modalities", ("output_modalities",), _modalities_to_ga, _modalities_to_beta)
_VOICE = Field("voice", ("audio", "output", "voice"))
_OUTPUT_FORMAT = Field(
    "output_audio_format", ("audio", "output", "format"), _format_to_ga, _format_to_beta
)

#: The flat beta session and the nested GA one (``session.update``, ``session.created/updated``).
SESSION_FIELDS: tuple[Field, ...] = (
    _MODALITIES,
    _VOICE,
    Field("speed", ("audio", "output", "speed")),
    _OUTPUT_FORMAT,
    Field("input_audio_format", ("audio", "input", "format"), _format_to_ga, _format_to_beta),
    Field("input_audio_transcription", ("audio", "input", "transcription")),
    Field("input_audio_noise_reduction", ("audio", "input", "noise_reduction")),
    Field("turn_detection", ("audio", "input", "turn_detection"), _same, _turn_detection_to_beta),
    Field("max_response_output_tokens", ("max_output_tokens",)),
)

#: The overrides of a beta ``response.create`` and their GA places.
RESPONSE_CREATE_FIELDS: tuple[Field, ...] = (
    _MODALITIES,
    _VOICE,
    _OUTPUT_FORMAT,
    Field("max_response_output_tokens", ("max_output_tokens",)),
    Field("input", ("input",), _items_to_ga, _items_to_beta),
)

#: A response object (``response.created``, ``response.done``); ``max_output_tokens`` is
#: named alike in both.
RESPONSE_FIELDS: tuple[Field, ...] = (
    _MODALITIES,
    _VOICE,
    _OUTPUT_FORMAT,
    Field("output", ("output",), _items_to_ga, _items_to_beta),
)

#: Beta fields the GA API does not have, with the beta default that asks for nothing (dropped
#: quietly); any other value is dropped too, and the client gets an error event saying so.
DROPPED_FIELDS: dict[str, Any] = {"temperature": 0.8, "client_secret": None}

#: Server events that are only renamed: GA name → beta name.
SERVER_RENAMES: dict[str, str] = {
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}
#: GA announces an item twice (added, then done when complete); beta once, as created.
ITEM_ADDED = ("conversation.item.added", "conversation.item.created")
#: Not sent to beta clients: beta has no counterpart, and what it carries reaches them anyway
#: (an item is complete when added, or its final state comes in response.output_item.done).
SERVER_HIDDEN = frozenset({"conversation.item.done"})
#: Beta client events with no GA counterpart on a realtime session.
CLIENT_UNTRANSLATABLE: dict[str, str] = {
    "transcription_session.update": (
        "This relay serves realtime sessions, and a GA realtime session cannot turn into a"
        " transcription session, so transcription_session.update has no translation. Configure"
        " input transcription with session.update (input_audio_transcription) instead."
    ),
}

_PREFIX = '{"type":"'


# -- moving fields ----------------------------------------------------------------------------


def _get(obj: Any, path: Path) -> tuple[bool, Any]:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False, None
        obj = obj[key]
    return True, obj


# The functions below never change the objects they are given: they copy each object on the
# way to a field they move (not the values, which move as they are).


def _put(obj: Event, path: Path, value: Any) -> None:
    *parents, last = path
    for key in parents:
        inner = obj.get(key)
        obj[key] = inner = dict(inner) if isinstance(inner, dict) else {}
        obj = inner
    obj[last] = value


def _pop(obj: Event, path: Path) -> None:
    """Remove ``path`` and the objects it leaves empty."""
    *parents, last = path
    chain = [obj]
    for key in parents:
        chain[-1][key] = inner = dict(chain[-1][key])
        chain.append(inner)
    del chain[-1][last]
    for parent, key in zip(reversed(chain[:-1]), reversed(parents), strict=True):
        if parent[key]:
            break
        del parent[key]


def flat_to_nested(flat: Event, fields: tuple[Field, ...], param: str) -> Event:
    """A beta object in its GA shape; ``param`` names it in errors (``session``, ``response``)."""
    by_beta = {f.beta: f for f in fields}
    # Fields alike in both dialects pass as they are (a wrong one is the API's to answer).
    out: Event = {key: value for key, value in flat.items() if key not in by_beta}
    for key, value in flat.items():
        found = by_beta.get(key)
        if found is not None:
            _put(out, found.ga, found.to_ga(value, f"{param}.{key}"))
    return out


def nested_to_flat(nested: Event, fields: tuple[Field, ...]) -> Event:
    """A GA object in its beta shape (fields beta does not know stay where they are)."""
    out = dict(nested)
    for found in fields:
        present, value = _get(out, found.ga)
        if present:
            _pop(out, found.ga)
            out[found.beta] = found.to_beta(value)
    return out


def _beta_to_ga_param(param: str) -> str:
    return _map_param(param, _PARAMS_TO_GA)


def ga_to_beta_param(param: str) -> str:
    """An error's ``param`` (``session.audio.output.voice``) as the beta client named it
    (``session.voice``); a param that reads the same in both dialects is returned as it is."""
    return _map_param(param, _PARAMS_TO_BETA)


def _param_table(to_beta: bool) -> list[tuple[str, str]]:
    pairs = []
    for prefix, fields in (("session", SESSION_FIELDS), ("response", RESPONSE_CREATE_FIELDS)):
        for found in fields:
            beta = f"{prefix}.{found.beta}"
            ga = ".".join((prefix, *found.ga))
            pairs.append((ga, beta) if to_beta else (beta, ga))
    return sorted(pairs, key=lambda pair: -len(pair[0]))  # the longest prefix first


_PARAMS_TO_BETA = _param_table(True)
_PARAMS_TO_GA = _param_table(False)


def _map_param(param: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if param == old or param.startswith((old + ".", old + "[")):
            return new + param[len(old) :]
    return param


# -- events -----------------------------------------------------------------------------------


def client_to_ga(event: Event, aliases: Mapping[str, str] = {}) -> tuple[Event, list[str]]:
    """A beta client event in GA form, and the dropped fields that asked for something.

    Raises :class:`Untranslatable` for an event or value with no GA form.
    """
    kind = event.get("type")
    if kind in CLIENT_UNTRANSLATABLE:
        raise Untranslatable("relay_beta_not_translated", CLIENT_UNTRANSLATABLE[kind], "type")
    dropped: list[str] = []
    if kind == "session.update" and isinstance(event.get("session"), dict):
        session = _drop(event["session"], "session", dropped)
        ga = flat_to_nested(session, SESSION_FIELDS, "session")
        ga.setdefault("type", "realtime")
        if isinstance(ga.get("model"), str):
            ga["model"] = aliases.get(ga["model"], ga["model"])
        event = {**event, "session": ga}
    elif kind == "response.create" and isinstance(event.get("response"), dict):
        response = _drop(event["response"], "response", dropped)
        event = {**event, "response": flat_to_nested(response, RESPONSE_CREATE_FIELDS, "response")}
    elif kind == "conversation.item.create" and "item" in event:
        event = {**event, "item": _item(event["item"], CONTENT_TYPES)}
    return event, dropped


def client_to_beta(event: Event) -> Event:
    """A GA client event as a beta client would have written it (the inverse of
    :func:`client_to_ga`, for the tests' round trips)."""
    kind = event.get("type")
    if kind == "session.update" and isinstance(event.get("session"), dict):
        session = nested_to_flat(event["session"], SESSION_FIELDS)
        session.pop("type", None)
        return {**event, "session": session}
    if kind == "response.create" and isinstance(event.get("response"), dict):
        return {**event, "response": nested_to_flat(event["response"], RESPONSE_CREATE_FIELDS)}
    if kind == "conversation.item.create" and "item" in event:
        return {**event, "item": _item(event["item"], _CONTENT_TYPES_BETA)}
    return event


def _drop(obj: Event, param: str, dropped: list[str]) -> Event:
    """``obj`` without the fields GA lacks; the ones that asked for something are listed."""
    if not any(key in obj for key in DROPPED_FIELDS):
        return obj
    for key, default in DROPPED_FIELDS.items():
        if key in obj and obj[key] != default:
            dropped.append(f"{param}.{key}")
    return {key: value for key, value in obj.items() if key not in DROPPED_FIELDS}


def server_to_beta(event: Event) -> Event | None:
    """A GA server event as the beta API sent it; None for one beta clients never saw."""
    kind = event.get("type")
    if kind in SERVER_HIDDEN:
        return None
    if kind in SERVER_RENAMES:
        return {**event, "type": SERVER_RENAMES[kind]}
    if kind == ITEM_ADDED[0]:
        event = {**event, "type": ITEM_ADDED[1]}
    return _server_body(event, to_beta=True)


def server_to_ga(event: Event) -> Event:
    """A beta server event in GA form (the inverse of :func:`server_to_beta`, for the tests)."""
    kind = event.get("type")
    for ga, beta in SERVER_RENAMES.items():
        if kind == beta:
            return {**event, "type": ga}
    if kind == ITEM_ADDED[1]:
        event = {**event, "type": ITEM_ADDED[0]}
    return _server_body(event, to_beta=False)


def _server_body(event: Event, *, to_beta: bool) -> Event:
    """The objects inside a server event, moved to the other dialect's shape."""
    kind = event.get("type")
    types = _CONTENT_TYPES_BETA if to_beta else CONTENT_TYPES
    if kind in ("session.created", "session.updated") and isinstance(event.get("session"), dict):
        if to_beta:
            session = nested_to_flat(event["session"], SESSION_FIELDS)
            session.pop("type", None)
        else:
            session = _drop(event["session"], "", [])
            session = {"type": "realtime", **flat_to_nested(session, SESSION_FIELDS, "session")}
        return {**event, "session": session}
    if kind in ("response.created", "response.done") and isinstance(event.get("response"), dict):
        response = event["response"]
        moved = (
            nested_to_flat(response, RESPONSE_FIELDS)
            if to_beta
            else flat_to_nested(_drop(response, "", []), RESPONSE_FIELDS, "response")
        )
        return {**event, "response": moved}
    if "item" in event:  # item created/added, retrieved; output_item added/done
        return {**event, "item": _item(event["item"], types)}
    if "part" in event:  # content_part added/done
        return {**event, "part": _part(event["part"], types)}
    if kind == "error" and isinstance(event.get("error"), dict):
        error = event["error"]
        if isinstance(error.get("param"), str):
            param = (ga_to_beta_param if to_beta else _beta_to_ga_param)(error["param"])
            return {**event, "error": {**error, "param": param}}
    return event


#: GA server events whose text needs parsing for beta clients (the rest pass as they are).
_PARSED = frozenset(
    {
        "session.created",
        "session.updated",
        "conversation.item.added",
        "conversation.item.retrieved",
        "response.created",
        "response.done",
        "response.output_item.added",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "error",
    }
)
#: Client events whose text needs parsing on the way to GA.
_CLIENT_PARSED = frozenset(
    {"session.update", "response.create", "conversation.item.create", *CLIENT_UNTRANSLATABLE}
)
#: ``{"type":"<GA name>"`` → ``{"type":"<beta name>"``, for renaming without parsing.
_RENAMED_PREFIXES = {f'{_PREFIX}{ga}"': f'{_PREFIX}{beta}"' for ga, beta in SERVER_RENAMES.items()}


def _type_leads(text: str) -> bool:
    """Whether ``text`` (which starts ``{"type":"``) holds no second ``"type"`` key, so its first
    type is the one a parser reads. Without a backslash every quote is JSON's own, and the last
    string value (an audio delta's 6 KB of base64) holds none, so only what comes before it is
    searched: three scans in C, where reading the type key by key walks every field in Python.
    False when unsure (the caller then parses)."""
    if "\\" in text:
        return False
    end = text.rfind('"', 0, len(text) - 2) if text.endswith('"}') else len(text)
    return '"type"' not in text[len(_PREFIX) : end]


class BetaTranslator:
    """Translates the text of one beta connection's events (see the module docstring)."""

    __slots__ = ("aliases",)

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        self.aliases = dict(aliases or {})

    def client(self, text: str) -> tuple[str | None, str | None]:
        """``(GA text to send upstream or None, error event for the client or None)``: an
        untranslatable event is refused; a dropped field that asked for something is
        reported while the rest goes on."""
        kind = event_type(text)
        if kind not in _CLIENT_PARSED:
            return text, None  # the same in both dialects (or not JSON: the API answers it)
        event = parse_event(text)
        if event is None:
            return text, None
        client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        try:
            ga, dropped = client_to_ga(event, self.aliases)
        except Untranslatable as refused:
            return None, error_event(
                refused.code, refused.message, param=refused.param, client_event_id=client_id
            )
        warning = None
        if dropped:
            warning = error_event(
                "relay_beta_field_dropped",
                f"The GA Realtime API has no {', '.join(dropped)}: the relay dropped it and"
                " applied the rest of the event. Leave it out to silence this warning.",
                param=dropped[0],
                client_event_id=client_id,
            )
        return dumps(ga), warning

    def server(self, text: str) -> str | None:
        """The beta text of a GA server event (None: beta clients never see it).

        The type is read from the event's first bytes when nothing else in it can be a
        ``type`` key (:func:`_type_leads`), as a parser would read it; a renamed event (audio
        above all) is then renamed without its payload being parsed."""
        if text.startswith(_PREFIX) and _type_leads(text):
            kind = text[len(_PREFIX) : text.find('"', len(_PREFIX))]
            renamed = _RENAMED_PREFIXES.get(f'{_PREFIX}{kind}"')
            if renamed is not None:
                return renamed + text[len(_PREFIX) + len(kind) + 1 :]
            if kind in SERVER_HIDDEN:
                return None
            if kind not in _PARSED:
                return text  # the same in both dialects
        event = parse_event(text)
        if event is None:
            return text
        beta = server_to_beta(event)
        return None if beta is None else dumps(beta)

    def reply(self, text: str) -> str:
        """One of the relay's own error events, with its ``param`` named the beta way."""
        event = parse_event(text)
        if event is None:
            return text
        beta = server_to_beta(event)
        return text if beta is None or beta == event else dumps(beta)


class BetaBridge(Bridge):
    """A :class:`Bridge` for a client that speaks beta: client events become GA before the
    bridge (and its policy, limits and accounting) sees them, and the bridge's output becomes
    beta on the way to the client."""

    __slots__ = ("_beta",)

    def __init__(self, *, translator: BetaTranslator, **bridge: Any) -> None:
        super().__init__(**bridge)
        self._beta = translator

    def client_message(self, data: Message) -> Message | Reply | Amended | Ending | None:
        warning = None
        if (
            data.__class__ is str
            and len(data) <= self._max_message_bytes  # a bigger one: the bridge ends the pair
            and not is_audio_append(data)  # type: ignore[arg-type]
        ):
            translated, warning = self._beta.client(data)  # type: ignore[arg-type]
            if translated is None:  # refused: answered like the bridge's own refusals
                self.traffic.client_messages += 1
                self.traffic.client_bytes += len(data)
                return self._say(warning)  # type: ignore[arg-type]
            data = translated
        out = Bridge.client_message(self, data)
        cls = out.__class__
        if cls is Reply:
            return Reply(self._beta.reply(out.text))  # type: ignore[union-attr]
        if cls is Amended:
            notice = self._beta.reply(out.notice)  # type: ignore[union-attr]
            if warning is not None:
                notice = _both(notice, warning)
            return Amended(out.text, notice)  # type: ignore[union-attr]
        if warning is None or cls is Ending:
            return out
        if out is None or self._opening:  # the warning waits for session.created, as the
            held = self._say(warning)  # bridge's own notices do
            return out if held is None else held
        return Amended(out, warning)  # type: ignore[arg-type]

    def upstream_message(self, data: Message) -> Message | Reply | Batch | Ending | None:
        out = Bridge.upstream_message(self, data)
        cls = out.__class__
        if cls is str:
            return self._beta.server(out)  # type: ignore[arg-type]
        if cls is Reply:
            return Reply(self._beta.reply(out.text))  # type: ignore[union-attr]
        if cls is Batch:  # the start of the session: session.created and what waited for it
            return self._beta_batch(out)  # type: ignore[arg-type]
        return out

    def start_now(self) -> Batch | None:
        """As the bridge's; the start of a session set up in advance (a warm pooled one) is
        translated like any other start."""
        start = Bridge.start_now(self)
        return None if start is None else self._beta_batch(start)

    def _beta_batch(self, batch: Batch) -> Batch:
        texts = (
            text if text.__class__ is bytes else self._beta.server(text)  # type: ignore[arg-type]
            for text in batch.texts
        )
        return Batch(tuple(text for text in texts if text is not None))


def _both(notice: str, warning: str) -> str:
    """One ``error`` event saying what the policy and the translation each left out (a client
    event is answered once)."""
    event, extra = parse_event(notice), parse_event(warning)
    if event is None or extra is None:
        return notice
    event["error"]["message"] += " " + extra["error"]["message"]
    return dumps(event)
