"""What a session has established with its upstream, so that a fresh upstream can take it over.

The Realtime API has no resume: a new connection is a new, empty session. When the relay moves
a call to a new upstream (a failover after the old one dropped, or a rollover ahead of the
60-minute cap), it re-applies the session and replays the conversation, and this ledger is
what it replays from. It is fed the events the bridge already parses (no extra parse on the hot
path: audio appends and audio deltas are never looked at), and it is sans-IO like the bridge.

* **The session**: the relay's own ``session`` object, with every client ``session.update``
  that the upstream accepted merged into it, as the policy passed it (nested objects merge key
  by key, as the API applies a partial update; anything else, lists included, replaces). A
  client update is accepted by the ``session.updated`` that answers it and refused by an
  ``error`` naming its ``event_id``; so that every update can be named, one without an
  ``event_id`` is given the relay's (``event_relay_su…``), and an ``error`` naming that is
  shown to the client with ``event_id: null``, as it would have been.
* **The conversation**: the items as the upstream confirmed them (``conversation.item.done``,
  beta's ``conversation.item.created``), in the upstream's order (``previous_item_id``), with
  the transcripts that complete them later (input transcription, ``response.output_item.done``)
  and without those deleted. Each is kept in the form that recreates it with
  ``conversation.item.create`` under the **same id**: text as it was; function calls and their
  outputs as they were; user audio as ``input_text`` carrying its transcript; assistant audio as
  ``output_text`` carrying its transcript (the model then reads, as text, what it said).
  What cannot be replayed is skipped and counted (:attr:`Ledger.skipped`): user audio without a
  transcript (transcription off, failed, or not finished), MCP items, anything else the client
  API cannot create. A truncated assistant item keeps its whole transcript (the truncation point
  is not in the event stream). Items not yet done when the upstream is lost are not replayed.
* **Bounded**: the items take at most ``max_bytes`` (their replay texts' lengths); past it the
  oldest are forgotten first (counted in :attr:`Ledger.forgotten`), as the API itself truncates
  the oldest turns when the context fills. Responses and updates in flight are bounded by count.
* **Between turns**: no response in flight and no speech in progress (server VAD's
  ``speech_started`` without its ``speech_stopped``), when a rollover may move the call.
"""

from __future__ import annotations

import copy
from typing import Any

from .events import dumps

#: The ``event_id`` prefixes of the relay's own events upstream during a takeover.
STAMP = "event_relay_su"
REPLAY = "event_relay_replay"
#: Bounds on what waits for an answer (a client cannot grow the ledger by never being answered).
MAX_PENDING_UPDATES = 64
MAX_RESPONSES = 16

#: Upstream event types the ledger reads (everything else is not looked at).
ITEM_DONE = frozenset({"conversation.item.done", "conversation.item.created"})
WATCHED = frozenset(
    {
        "session.updated",
        "error",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.created",
        "conversation.item.deleted",
        "conversation.item.input_audio_transcription.completed",
        "response.output_item.done",
        "response.created",
        "response.done",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "input_audio_buffer.cleared",
    }
)


class Ledger:
    """The session and conversation a session has established (see the module docstring)."""

    __slots__ = (
        "_base",
        "_session",
        "max_bytes",
        "_items",
        "_bytes",
        "_pending",
        "_resend",
        "_stamps",
        "_responses",
        "speaking",
        "forgotten",
        "skipped",
    )

    def __init__(self, session: dict[str, Any], *, max_bytes: int) -> None:
        #: The relay's session, shared by every session (never changed here), and this
        #: session's own copy, made when the first client update is accepted.
        self._base = session
        self._session: dict[str, Any] | None = None
        self.max_bytes = max_bytes
        #: id → the item as ``conversation.item.create`` recreates it (None: added, not done).
        self._items: dict[str, dict[str, Any] | None] = {}
        self._bytes = 0
        #: Client updates sent (or queued to be) and not yet answered: (event_id, session),
        #: oldest first. (A list: at most MAX_PENDING_UPDATES, and an empty deque is 600 bytes
        #: per session.)
        self._pending: list[tuple[str, dict[str, Any]]] = []
        #: The ids of those a lost upstream had been sent: the replay sends them again.
        self._resend: set[str] | None = None
        self._stamps = 0
        #: Responses created and not done (their ids), oldest first.
        self._responses: dict[str, None] = {}
        self.speaking = False
        self.forgotten = 0
        self.skipped = 0

    @property
    def session(self) -> dict[str, Any]:
        """The session to re-apply: the relay's, with the client's accepted updates merged in."""
        return self._base if self._session is None else self._session

    # -- what the client sent ------------------------------------------------------

    def client_update(self, event: dict[str, Any]) -> str | None:
        """A client ``session.update`` about to go upstream (as the policy passed it): note
        it, and return its text again if the relay had to give it an ``event_id``."""
        session = event.get("session")
        if not isinstance(session, dict):
            return None
        stamped = None
        event_id = event.get("event_id")
        if not isinstance(event_id, str):
            self._stamps += 1
            event_id = event["event_id"] = f"{STAMP}{self._stamps}"
            stamped = dumps(event)
        if len(self._pending) >= MAX_PENDING_UPDATES:
            del self._pending[0]  # never answered: not taken as accepted
        self._pending.append((event_id, session))
        return stamped

    def requeued(self, event_id: object) -> None:
        """The client's update ``event_id``, which a lost upstream never got whole, goes to
        the new one from the queue (still pending): the replay must not send it too."""
        if self._resend is not None:
            self._resend.discard(event_id)  # type: ignore[arg-type]

    # -- what the upstream said ------------------------------------------------------

    def upstream_event(self, kind: str, event: dict[str, Any]) -> bool:
        """Note an upstream event (one of :data:`WATCHED`); True if the event as the client will
        see it was changed in place (an ``error`` naming a stamped ``event_id``)."""
        if kind == "session.updated":
            if self._pending:
                if self._session is None:
                    self._session = copy.deepcopy(self._base)
                merge(self._session, self._pending.pop(0)[1])
        elif kind == "error":
            return self._error(event)
        elif kind in ITEM_DONE:
            self._done(event.get("item"), event.get("previous_item_id", False))
        elif kind == "conversation.item.added":
            item = event.get("item")
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                self._place(item["id"], None, event.get("previous_item_id", False))
        elif kind == "response.output_item.done":
            item = event.get("item")
            if isinstance(item, dict) and item.get("id") in self._items:
                self._done(item, False)  # a response's item that is in the conversation
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._transcribed(event)
        elif kind == "conversation.item.deleted":
            self._drop(event.get("item_id"))
        elif kind == "response.created":
            response = event.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                if len(self._responses) >= MAX_RESPONSES:
                    del self._responses[next(iter(self._responses))]
                self._responses[response["id"]] = None
        elif kind == "response.done":
            response = event.get("response")
            if isinstance(response, dict):
                self._responses.pop(response.get("id"), None)  # type: ignore[arg-type]
        elif kind == "input_audio_buffer.speech_started":
            self.speaking = True
        else:  # speech stopped, buffer committed or cleared
            self.speaking = False
        return False

    def _error(self, event: dict[str, Any]) -> bool:
        error = event.get("error")
        if not isinstance(error, dict):
            return False
        named = error.get("event_id")
        if not isinstance(named, str):
            return False
        for at, (event_id, _) in enumerate(self._pending):
            if event_id == named:
                del self._pending[at]  # refused: the whole update is discarded
                break
        if named.startswith(STAMP):
            error["event_id"] = None  # the client sent none
            return True
        return False

    # -- the conversation ---------------------------------------------------------------

    def _done(self, item: object, previous: object) -> None:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return
        replay = replayable(item)
        if replay is None and self._items.get(item["id"]) is not None:
            return  # (a transcript came first; this done event's item has none)
        # Not replayable (yet): its place is kept, for a transcript may still complete it.
        self._place(item["id"], replay, previous)

    def _place(self, item_id: str, replay: dict[str, Any] | None, previous: object) -> None:
        """Put an item in the conversation (or update it where it is)."""
        size = _size(replay)
        if item_id in self._items:
            self._bytes += size - _size(self._items[item_id])
            self._items[item_id] = replay
        elif previous is False or previous in self._items and _last(self._items) == previous:
            self._items[item_id] = replay  # appended: the usual case
            self._bytes += size
        else:  # inserted: after ``previous`` (None: at the start; unknown: at the end)
            entries = list(self._items.items())
            at = 0 if previous is None else len(entries)
            for index, (key, _) in enumerate(entries):
                if key == previous:
                    at = index + 1
            entries.insert(at, (item_id, replay))
            self._items = dict(entries)
            self._bytes += size
        while self._bytes > self.max_bytes and self._items:
            oldest = next(iter(self._items))
            self._bytes -= _size(self._items.pop(oldest))
            self.forgotten += 1

    def _transcribed(self, event: dict[str, Any]) -> None:
        """A user audio item's transcript came: it can now be replayed, as text, where it is."""
        item_id, transcript = event.get("item_id"), event.get("transcript")
        if not isinstance(transcript, str) or not transcript or item_id not in self._items:
            return
        text = {"type": "input_text", "text": transcript}
        item = {"id": item_id, "type": "message", "role": "user", "content": [text]}
        self._place(item_id, item, False)  # type: ignore[arg-type]

    def _drop(self, item_id: object) -> None:
        if item_id in self._items:
            self._bytes -= _size(self._items.pop(item_id))  # type: ignore[arg-type]

    # -- a takeover ----------------------------------------------------------------------

    @property
    def between_turns(self) -> bool:
        """No response in flight and no speech in progress."""
        return not self._responses and not self.speaking

    def lost(self, queued: set[str]) -> tuple[str, ...]:
        """The upstream is gone, and with it what was in flight there: responses it had not
        finished (returned, oldest first), speech it heard. Updates it had not answered stay
        pending: those it had been sent (not among the ``queued`` ids, which the new upstream
        gets from the queue) go in the replay, and the new upstream's answers are the client's."""
        resend = {event_id for event_id, _ in self._pending if event_id not in queued}
        self._resend = resend or None
        responding = tuple(self._responses)
        self._responses.clear()
        self.speaking = False
        return responding

    def replay(self, setup_event_id: str) -> tuple[list[str], set[str]]:
        """What a new upstream gets before anything of the client's: the session as it stood,
        then every replayable item, in order, under its own id, then the client's updates the
        old upstream had not answered (the client waits for their ``session.updated``). Also the
        ids replayed (their echoes are not the client's to see). Forgets the items in flight."""
        update = {"type": "session.update", "event_id": setup_event_id, "session": self.session}
        texts = [dumps(update)]
        ids = set()
        for n, (item_id, item) in enumerate(self._items.items()):
            if item is None:
                continue
            texts.append(
                dumps(
                    {"type": "conversation.item.create", "event_id": f"{REPLAY}{n}", "item": item}
                )
            )
            ids.add(item_id)
        resend, self._resend = self._resend, None
        for event_id, session in self._pending:  # (still pending: their answers accept them)
            if resend is not None and event_id in resend:
                update = {"type": "session.update", "event_id": event_id, "session": session}
                texts.append(dumps(update))
        # Items in progress died with the old upstream, and so did the chance of a transcript
        # for user audio not yet transcribed: neither is replayed.
        for item_id in [key for key, item in self._items.items() if item is None]:
            self._drop(item_id)
            self.skipped += 1
        return texts, ids

    @property
    def items(self) -> int:
        """Items kept for a replay."""
        return sum(1 for item in self._items.values() if item is not None)

    @property
    def size(self) -> int:
        """Bytes the kept items take (bounded by ``max_bytes``)."""
        return self._bytes


def replayable(item: dict[str, Any]) -> dict[str, Any] | None:
    """``item`` as ``conversation.item.create`` recreates it under the same id, or None."""
    kind = item.get("type")
    head = {"id": item["id"], "type": kind}
    if kind == "function_call":
        fields = ("call_id", "name", "arguments")
    elif kind == "function_call_output":
        fields = ("call_id", "output")
    elif kind == "message":
        role = item.get("role")
        parts = [p for p in map(_part, item.get("content") or ()) if p is not None]
        if role not in ("user", "assistant", "system") or not parts:
            return None
        if role == "assistant":
            said = "output_text"
            parts = [{**p, "type": said} if p["type"] == "input_text" else p for p in parts]
        elif any(p["type"] == "output_text" for p in parts):
            return None
        return {**head, "role": role, "content": parts}
    else:
        return None  # MCP items and anything newer: the client API cannot recreate them
    if not all(isinstance(item.get(name), str) for name in fields):
        return None
    return {**head, **{name: item[name] for name in fields}}


def _part(part: object) -> dict[str, Any] | None:
    """A content part as a client may send it: audio becomes its transcript, as text."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = part.get("text")
        out = "output_text" if kind == "output_text" else "input_text"
        return {"type": out, "text": text} if isinstance(text, str) else None
    if kind in ("input_audio", "output_audio", "audio"):
        transcript = part.get("transcript")
        if not isinstance(transcript, str) or not transcript:
            return None  # audio without a transcript cannot be replayed
        out = "input_text" if kind == "input_audio" else "output_text"
        return {"type": out, "text": transcript}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {k: part[k] for k in ("type", "image_url", "detail") if k in part}
    return None


def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Apply a partial session update: objects merge key by key, anything else replaces."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _size(item: dict[str, Any] | None) -> int:
    return 64 if item is None else len(dumps(item))


def _last(items: dict[str, Any]) -> str | None:
    return next(reversed(items)) if items else None
