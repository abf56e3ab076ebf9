"""Watching the calls the relay admitted, each from its sideband: the Trio shell of
:class:`relay.core.sideband.Sideband`.

A WebRTC or SIP call's audio goes straight between the caller and OpenAI. For each call
it admits, the relay opens ``?call_id=`` upstream with its own key and keeps it for the
call's life, in a task of the app's lifespan nursery (the HTTP request that admitted the
call is long over). On it the relay:

* keeps the session within the policy (see the core machine);
* accounts each ``response.done`` to the user and hangs the call up
  (``POST /v1/realtime/calls/{id}/hangup``) when the daily budget is used up, or when the
  call reaches the longest a session may last;
* holds a concurrency lease for the user while the call lives, and records the call like a
  session when it ends (``relay usage``, ``/metrics``).

A sideband that drops is opened again; a call the relay cannot keep in sight
(:data:`ATTACH_ATTEMPTS` failed attaches in a row) is hung up rather than left running
unwatched. On drain the relay watches its calls for as long as it still has WebSocket
sessions to drain, then **hands them over**: it closes their sidebands without hanging up,
and they run on at OpenAI (waiting longer would not keep a call alive: it lives at OpenAI).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from ..core.sideband import GiveUp, Sideband
from ..usage.auth import Identity
from ..wire.callsapi import CallsApi
from ..wire.websocket import WebSocket
from . import admission
from .call import Call as Costs

if TYPE_CHECKING:
    from .app import RelayApp

#: Failed attaches in a row (the first, or again after a drop) before the call is hung up.
ATTACH_ATTEMPTS = 3
#: Seconds before the second attach; doubled for each one after.
ATTACH_BACKOFF = 0.5
#: Webhook deliveries remembered, so that a delivery OpenAI retries is handled once.
RECENT_WEBHOOKS = 4096

log = logging.getLogger("relay")


class CallEnd(Enum):
    """Why the relay stopped watching a call (a label of ``relay_calls_ended``)."""

    CALL_ENDED = "call_ended"  # the caller hung up, or OpenAI ended it
    BUDGET_EXHAUSTED = "budget_exhausted"  # hung up by the relay
    SESSION_EXPIRED = "session_expired"  # hung up by the relay at the length limit
    POLICY = "policy_unenforceable"  # hung up: the session kept leaving the policy
    SIDEBAND_LOST = "sideband_lost"  # hung up: the relay could not keep it in sight
    HANDED_OVER = "handed_over"  # the relay drained; the call runs on at OpenAI
    SHUTDOWN = "shutdown"  # the app stopped under it


#: How a task of a followed call reports that the call's watch is over.
Callback = Callable[[CallEnd | None], None]


@dataclass(eq=False)
class WatchedCall:
    """One call the relay watches."""

    id: str
    transport: str  # "webrtc" or "sip"
    identity: Identity
    lease: str  # the id of its concurrency lease
    model: str
    sideband: Sideband
    #: What its responses cost, added to the user's usage (relay.server.call).
    costs: Costs
    max_seconds: float = 0.0  # 0: no limit of the relay's
    started: float = field(default_factory=trio.current_time)
    handing_over: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Why the watch ended, once it has (and ``over`` is set, after the call is recorded).
    cause: CallEnd | None = None
    over: trio.Event = field(default_factory=trio.Event)


class Calls:
    """The calls of one relay instance and their sideband tasks."""

    def __init__(self, app: RelayApp) -> None:
        self._app = app
        self.api = CallsApi(app.config)
        self.live: dict[str, WatchedCall] = {}
        #: Where the sideband tasks run: the app's lifespan nursery, once it is open.
        self.nursery: trio.Nursery | None = None
        self._none_live = trio.Event()
        self._none_live.set()
        self._webhooks: OrderedDict[str, None] = OrderedDict()

    def max_seconds(self, identity: Identity) -> float:
        """How long a call of ``identity`` may last (0: no limit of the relay's)."""
        return admission.tightest(
            self._app.config.max_session_seconds, identity.max_session_seconds
        )

    def watch(self, call: WatchedCall) -> None:
        """Start watching an admitted call (its lease is taken already)."""
        assert self.nursery is not None, "calls are admitted only while the lifespan runs"
        self.live[call.id] = call
        if self._none_live.is_set():
            self._none_live = trio.Event()
        self._app.metrics.call_started(call.transport)
        log.info(
            "call started",
            extra={"fields": _fields(call)},
        )
        self.nursery.start_soon(self._run, call, name=f"sideband {call.id}")

    def first_delivery(self, webhook_id: str) -> bool:
        """Whether this webhook delivery is new (OpenAI retries a delivery it saw no 2xx for)."""
        if webhook_id in self._webhooks:
            return False
        self._webhooks[webhook_id] = None
        while len(self._webhooks) > RECENT_WEBHOOKS:
            self._webhooks.popitem(last=False)
        return True

    async def hand_over(self) -> None:
        """Stop watching every live call without hanging up: they run on at OpenAI."""
        for call in list(self.live.values()):
            call.handing_over = True
            call.scope.cancel()
        while self.live:
            await self._none_live.wait()

    async def _run(self, call: WatchedCall) -> None:
        app = self._app
        accounting = app.accounting
        assert accounting is not None
        cause = CallEnd.SHUTDOWN
        try:
            async with trio.open_nursery() as tasks:
                if accounting.holds_leases:
                    tasks.start_soon(accounting.keep_lease, call.identity, call.lease)
                with call.scope:
                    try:
                        cause = await self._watch(call)
                    except Exception:  # a bug must end this call's watch, not the app's nursery
                        log.exception("sideband failed", extra={"fields": _fields(call)})
                        cause = CallEnd.SIDEBAND_LOST
                        await self.hang_up(call, "the relay's sideband failed")
                if call.handing_over:
                    cause = CallEnd.HANDED_OVER
                tasks.cancel_scope.cancel()
        finally:
            seconds = trio.current_time() - call.started
            call.cause = cause
            guard = call.sideband
            await accounting.finish(call.identity, call.lease, guard.traffic, seconds)
            app.metrics.call_ended(call.transport, cause.value, guard.corrections)
            fields = _fields(call) | {
                "seconds": round(seconds, 3),
                "cause": cause.value,
                "corrections": guard.corrections,
                "corrected": sorted(guard.corrected),
            }
            log.info("call ended", extra={"fields": fields})
            del self.live[call.id]
            if not self.live:
                self._none_live.set()
            call.over.set()

    async def _watch(self, call: WatchedCall) -> CallEnd:
        """Attach, follow, attach again after a drop; the reason the watch is over."""
        deadline = call.started + call.max_seconds if call.max_seconds else math.inf
        failures = 0
        while True:
            attached, outcome = await self._attach_and_follow(call, deadline)
            if outcome is not None:
                return outcome
            failures = 1 if attached else failures + 1
            if failures >= ATTACH_ATTEMPTS:
                await self.hang_up(call, "the relay could not keep the call in sight")
                return CallEnd.SIDEBAND_LOST
            await trio.sleep(ATTACH_BACKOFF * 2 ** (failures - 1))

    async def _attach_and_follow(
        self, call: WatchedCall, deadline: float
    ) -> tuple[bool, CallEnd | None]:
        """(whether the sideband opened, how the call ended, or None if the sideband failed)."""
        config = self._app.config
        target = self._app.dialer.sideband(call.id)
        stream: trio.abc.Stream | None = None
        try:
            ws: WebSocket | None = None
            with trio.move_on_after(config.dial_timeout):
                try:
                    stream = await target.connect()
                    ws = await target.handshake(stream)
                except ConnectionRejected as rejected:
                    if rejected.status_code == 404:  # the call is over (or never was)
                        return False, CallEnd.CALL_ENDED
                    log.warning(
                        "sideband refused: HTTP %d",
                        rejected.status_code,
                        extra={"fields": _fields(call)},
                    )
                    return False, None
                except (OSError, trio.BrokenResourceError) as exc:
                    log.warning("sideband unreachable: %r", exc, extra={"fields": _fields(call)})
                    return False, None
            if ws is None:
                log.warning("sideband timed out opening", extra={"fields": _fields(call)})
                return False, None
            ws.send_timeout = config.send_timeout
            try:
                return True, await self._follow(call, ws, deadline)
            finally:
                reason = "relay restarting; the call is handed over" if call.handing_over else ""
                with trio.move_on_after(config.close_timeout, shield=True):
                    await ws.aclose(1001 if call.handing_over else 1000, reason)
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def _follow(self, call: WatchedCall, ws: WebSocket, deadline: float) -> CallEnd | None:
        """Read the sideband until the call ends (or the sideband drops: None), with the
        length limit and keepalive pings beside it."""
        outcome: list[CallEnd | None] = []
        async with trio.open_nursery() as nursery:

            def finish(result: CallEnd | None) -> None:
                """The first result stands: a hang-up's own close must not read as the caller's."""
                if not outcome:
                    outcome.append(result)
                nursery.cancel_scope.cancel()

            nursery.start_soon(self._read, call, ws, finish)
            if deadline < math.inf:
                nursery.start_soon(self._expire, call, deadline, outcome.append, finish)
            if self._app.config.ping_interval and self._app.config.peer_timeout:
                nursery.start_soon(self._keepalive, ws, finish)
        return outcome[0] if outcome else None

    async def _read(self, call: WatchedCall, ws: WebSocket, finish: Callback) -> None:
        guard = call.sideband
        try:
            await ws.send_message(guard.opening())
            while True:
                out = guard.upstream_message(await ws.get_message())
                if isinstance(out, GiveUp):
                    log.warning(
                        "call's session keeps leaving the policy (%s): hanging up",
                        ", ".join(out.fields),
                        extra={"fields": _fields(call)},
                    )
                    await self.hang_up(call, "the session keeps leaving the policy")
                    finish(CallEnd.POLICY)
                    return
                if out is not None:
                    await ws.send_message(out)
                while guard.refused:
                    error = guard.refused.pop(0)
                    log.warning(
                        "the Realtime API refused the sideband's session.update (%s: %s)",
                        error.get("code"),
                        error.get("message"),
                        extra={"fields": _fields(call)},
                    )
                if guard.responses_done:
                    done, guard.responses_done = guard.responses_done, []
                    used_up = await call.costs.responses_done(done)
                    if used_up is not None:
                        await self.hang_up(call, f"the user's daily {used_up} budget is used up")
                        finish(CallEnd.BUDGET_EXHAUSTED)
                        return
        except ConnectionClosed as closed:
            code = closed.reason.code if closed.reason else 1006
            finish(CallEnd.CALL_ENDED if code in (1000, 1001) else None)
        except trio.TooSlowError:
            finish(None)  # the upstream stopped reading: attach again

    async def _expire(
        self, call: WatchedCall, deadline: float, claim: Callback, finish: Callback
    ) -> None:
        await trio.sleep_until(deadline)
        claim(CallEnd.SESSION_EXPIRED)  # before the hang-up closes the sideband
        await self.hang_up(call, f"the call reached the limit of {call.max_seconds:g} s")
        finish(CallEnd.SESSION_EXPIRED)

    async def _keepalive(self, ws: WebSocket, finish: Callback) -> None:
        config = self._app.config
        while True:
            await trio.sleep(config.ping_interval)
            with trio.move_on_after(config.peer_timeout) as waited:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return  # the reader sees the close
            if waited.cancelled_caught:
                finish(None)  # the upstream stopped answering: attach again
                return

    async def hang_up(self, call: WatchedCall, why: str) -> None:
        """End a call at OpenAI (``/hangup``); a failure is logged, the watch ends anyway."""
        log.info("hanging up a call: %s", why, extra={"fields": _fields(call)})
        failure = await self.api.hangup(call.id)
        if failure is not None and failure.status != 404:
            log.error(
                "hanging up a call failed (%s: %s)",
                failure.code,
                failure.message,
                extra={"fields": _fields(call)},
            )


def _fields(call: WatchedCall) -> dict[str, object]:
    return {
        "call": call.id,
        "user": call.identity.user,
        "transport": call.transport,
        "model": call.model,
    }
