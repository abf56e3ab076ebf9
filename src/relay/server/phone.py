"""Phone calls through Twilio: the voice webhook, the ``/twilio`` media stream and its leg.

* ``POST /twilio/voice`` is the webhook Twilio calls when the number rings. A request with a
  valid ``X-Twilio-Signature`` is answered with TwiML that connects the call to ``/twilio`` on
  the relay's public URL, with a single-use stream token (:mod:`relay.usage.calls`) as a
  ``<Parameter>``; anything else gets 403.
* ``/twilio`` takes the stream. The upgrade must carry Twilio's signature of the stream URL
  (else 403, nothing accepted); then ``start`` must carry a token minted for that call, not
  expired and not used before (the usage store says, so a replay to another instance is
  refused too). The caller (a keyed hash of their number) and the phone line (user
  ``twilio``) are admitted against their limits, and the call runs as a
  :class:`~relay.server.pair.Pair`, like any WebSocket session: same nursery, policy,
  accounting, limits, drain and metrics.
* :class:`TwilioLeg` is the pair's client side: it translates on the way in and out
  (:class:`relay.core.twilio.TwilioStream`), so the bridge and the policy see Realtime events.
  Phone sessions relay through the pair's tasks, not the pump: every message is translated,
  and at ~50 small messages a second each way a call is light.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape, quoteattr

import trio

from ..core.bridge import SETUP_EVENT_ID, Bridge, Ending, Message
from ..core.closecodes import Code
from ..core.events import dumps, error_event
from ..core.twilio import End, Start, StreamError, TwilioStream, signature_matches
from ..usage.accounting import Accounting
from ..usage.auth import Identity, Refusal
from ..usage.calls import ACCOUNT_USER, CallKeys, TokenRefused
from .asgi import Receive, Scope, Send, deny, header, offers_deflate, read_body
from .call import Call
from .legs import AsgiClient, SocketClient
from .notes import SessionNotes

if TYPE_CHECKING:
    from .app import RelayApp
    from .pair import Pair

TWILIO_PATH = "/twilio"
TWILIO_WEBHOOK_PATH = "/twilio/voice"
#: Seconds Twilio has after the upgrade to send ``connected`` and ``start``.
START_TIMEOUT = 10.0
#: Seconds the usage store may take to check a token and admit a call.
STORE_TIMEOUT = 5.0
#: A call is warned this long before its maximum length (at most RELAY_LIMIT_WARNING_SECONDS):
#: the warning is the cue for the goodbye, which then ends the call.
GOODBYE_LEAD = 15.0
MAX_WEBHOOK_BYTES = 64 * 1024
#: Close codes of refused streams: as a refused browser's, 4000 + the HTTP status.
TOKEN_REFUSED = 4403

log = logging.getLogger("relay")


class PhoneLine:
    """The relay's Twilio routes (on when RELAY_TWILIO_AUTH_TOKEN is set)."""

    def __init__(self, app: RelayApp) -> None:
        self.app = app
        config = app.config
        self._auth_token = config.twilio_auth_token
        self.keys = CallKeys(config.twilio_auth_token)
        session = config.session_object()
        audio = session.setdefault("audio", {})
        for side in ("input", "output"):
            audio.setdefault(side, {})["format"] = {"type": "audio/pcmu"}
        #: The relay's session for a call: its own, with μ-law both ways.
        self.session = session
        self.session_update = dumps(
            {"type": "session.update", "event_id": SETUP_EVENT_ID, "session": session}
        )

    # -- URLs as Twilio sees them ------------------------------------------------------

    def _base(self, scope: Scope) -> str:
        """The relay's public base URL (``https://host[/prefix]``)."""
        if self.app.config.public_url:
            return self.app.config.public_url.rstrip("/")
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", ""), scope.get("scheme"))
        host = (header(scope, b"host") or b"").decode("latin-1")
        return f"{scheme or 'http'}://{host}"

    def stream_url(self, scope: Scope) -> str:
        """The ``/twilio`` URL Twilio is sent to (and signs when it connects)."""
        base = urlsplit(self._base(scope))
        scheme = "wss" if base.scheme == "https" else "ws"
        return base._replace(scheme=scheme).geturl() + TWILIO_PATH

    # -- the voice webhook ------------------------------------------------------------

    async def webhook(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /twilio/voice``: TwiML connecting a signed call to ``/twilio``."""
        if scope["method"] != "POST":
            await _answer(send, 405, "Twilio's voice webhook is POST /twilio/voice.")
            return
        body = await read_body(receive, MAX_WEBHOOK_BYTES)
        if body is None:
            await _answer(send, 413, "The webhook's body is over 64 KiB.")
            return
        params = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        query = scope.get("query_string", b"").decode("latin-1")
        url = self._base(scope) + scope["path"] + (f"?{query}" if query else "")
        signature = (header(scope, b"x-twilio-signature") or b"").decode("latin-1")
        if not signature_matches(self._auth_token, url, params, signature):
            self.app.metrics.refused(403)
            log.warning(
                "voice webhook refused: %s X-Twilio-Signature for %s (behind a proxy, set"
                " RELAY_PUBLIC_URL to the URL Twilio calls)",
                "a wrong" if signature else "no",
                url,
            )
            await _answer(send, 403, "The request does not carry Twilio's signature.")
            return
        fields = dict(params)
        call_sid = fields.get("CallSid", "")
        if not call_sid:
            await _answer(send, 400, "The webhook needs Twilio's CallSid.")
            return
        caller = self.keys.caller_id(fields.get("From") or "anonymous")
        token = self.keys.mint(
            call_sid=call_sid,
            caller=caller,
            account_sid=fields.get("AccountSid", ""),
            now=time.time(),
        )
        twiml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Connect>'
            f"<Stream url={quoteattr(self.stream_url(scope))}>"
            f'<Parameter name="token" value={quoteattr(token)}/>'
            "</Stream></Connect></Response>\n"
        ).encode()
        log.info("call ringing", extra={"fields": {"call": call_sid, "user": caller}})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/xml; charset=utf-8"),
                    (b"content-length", str(len(twiml)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": twiml})

    # -- the media stream -------------------------------------------------------------

    async def admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A ``/twilio`` upgrade that passed the relay's own checks (draining, load, full)."""
        app = self.app
        url = self.stream_url(scope)
        signature = (header(scope, b"x-twilio-signature") or b"").decode("latin-1")
        if not signature_matches(self._auth_token, url, (), signature):
            app.metrics.refused(403)
            log.warning("media stream refused: no valid X-Twilio-Signature for %s", url)
            await deny(
                send,
                403,
                f"{TWILIO_PATH} takes Twilio media streams only: the upgrade must carry Twilio's"
                " signature (X-Twilio-Signature).",
                code="twilio_signature_invalid",
            )
            return
        if app.accounting is None:
            await deny(send, 503, "the relay is still starting; connect again in a moment")
            return
        client, release = await app.open_client(
            send, receive, None, deflate_offered=offers_deflate(scope)
        )
        config = app.config
        leg = TwilioLeg(
            client,
            TwilioStream(dtmf=config.twilio_dtmf, goodbye=config.twilio_goodbye),
            playout_seconds=config.close_timeout / 2,
        )
        try:
            await self._call(leg, app.accounting)
        finally:
            if release is not None:
                release()

    async def _call(self, leg: TwilioLeg, accounting: Accounting) -> None:
        app, config = self.app, self.app.config
        with trio.move_on_after(START_TIMEOUT) as waited:
            start = await leg.opening()
        if waited.cancelled_caught:
            await leg.refuse(
                Code.POLICY_VIOLATION,
                "twilio_start_missing",
                f"no 'start' message within {START_TIMEOUT:g} s of the upgrade",
            )
            return
        if start is None:
            return  # gone, or refused for a message that is not Twilio's
        caller, session_id = await self._admit(leg, start, accounting)
        if caller is None:
            return
        line = self._line(accounting)
        account = Identity(user=ACCOUNT_USER, method="twilio")
        bridge = Bridge(
            session_update=self.session_update,
            limits=app.limits,
            secret=config.openai_api_key,
            policy=config.policy.for_session(config.model),
            observer=SessionNotes(app.metrics, session_id),
        )
        call = Call(app, caller, session_id, config.model, session=self.session)  # as any session
        call.also_accounted.append((line, account))

        async def responses_done(done: list[dict[str, object]]) -> str | None:
            used_up = await call.responses_done(done)
            if used_up is not None and await leg.goodbye_for(partial(_spent, used_up)):
                return None  # the call ends once the goodbye has played
            return used_up

        pair = app.new_pair(
            leg,
            bridge,
            call,
            max_seconds=config.max_session_seconds,
            lead=min(config.limit_warning_seconds, GOODBYE_LEAD),
            on_responses_done=responses_done,
        )
        leg.attach(pair, config.max_session_seconds)
        log.info(
            "call connected",
            extra={"fields": {"session": session_id, "call": start.call_sid, "user": caller.user}},
        )
        async with accounting.held(caller, session_id, bridge.traffic):
            async with line.held(account, session_id, bridge.traffic):
                await app.run_pair(pair, call)

    def _line(self, accounting: Accounting) -> Accounting:
        """The phone line's own limits, on the same store as every user's."""
        config = self.app.config
        return Accounting(
            accounting.store,
            max_sessions=config.twilio_max_calls,
            daily_budget=config.twilio_daily_token_budget,
        )

    async def _admit(
        self, leg: TwilioLeg, start: Start, accounting: Accounting
    ) -> tuple[Identity | None, str]:
        """Check the stream token (once only, across instances) and admit the caller and the
        line; refuse the stream and return None otherwise."""
        session_id = secrets.token_hex(8)
        now = time.time()
        try:
            claim = self.keys.verify(
                start.parameters.get("token"), call_sid=start.call_sid, now=now
            )
        except TokenRefused as refused:
            await leg.refuse(TOKEN_REFUSED, refused.code, refused.message)
            return None, session_id
        caller = Identity(user=claim.caller, method="twilio")
        account = Identity(user=ACCOUNT_USER, method="twilio")
        line = self._line(accounting)
        try:
            with trio.fail_after(STORE_TIMEOUT):
                ttl = claim.expires - now + 60  # past its expiry, the token is refused anyway
                if not await accounting.store.claim_once(f"twilio:{claim.nonce}", ttl_seconds=ttl):
                    await leg.refuse(
                        TOKEN_REFUSED,
                        "twilio_stream_token_used",
                        "the stream token was used before (each call's token admits one stream)",
                    )
                    return None, session_id
                await line.admit(account, session_id)
                try:
                    await accounting.admit(caller, session_id)
                except BaseException:
                    if line.holds_leases:
                        with trio.CancelScope(shield=True):
                            await accounting.store.release_slot(account.user, session_id)
                    raise
        except Refusal as refused:
            await leg.refuse(4000 + refused.status, refused.code, refused.message)
            return None, session_id
        except (trio.TooSlowError, OSError) as exc:
            log.error("usage store unavailable at a call's admission: %r", exc)
            await leg.refuse(
                Code.TRY_AGAIN_LATER, "relay_store_unavailable", "the usage store is not answering"
            )
            return None, session_id
        return caller, session_id


def _spent(budget: str, bridge: Bridge) -> Ending | None:
    return bridge.budget_exhausted(budget)


async def _answer(send: Send, status: int, text: str) -> None:
    """A short plain-text answer to the webhook (Twilio shows it in its debugger)."""
    body = (escape(text) + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class TwilioLeg:
    """A Twilio media stream as a pair's client side (:class:`relay.server.pair.ClientSide`).

    :meth:`receive` hands the pair the Realtime events the caller's messages become, and
    :meth:`send` turns what the pair would send a client into Twilio's messages (consuming the
    rest); what must go back upstream (a truncate, the goodbye) goes through
    :meth:`Pair.send_upstream`. Everything sent to Twilio goes through :meth:`_to_twilio` and
    :meth:`_close_twilio`. Twilio takes only ``media``, ``mark`` and ``clear``, so an ending the
    relay decides reaches it as a close code and reason, not as an ``error`` event; only a
    peer that is not speaking Twilio's protocol gets one.
    """

    websocket = None  # every message is translated: relayed by the pair's tasks, never pumped

    def __init__(
        self, twilio: AsgiClient | SocketClient, stream: TwilioStream, *, playout_seconds: float
    ) -> None:
        self._twilio = twilio
        self.stream = stream
        self._queue: deque[str] = deque()  # events for the upstream, from one caller message
        self._pair: Pair | None = None
        self._max_seconds = 0.0
        #: The ending the goodbye being said comes before (a limit's).
        self._last: Callable[[Bridge], Ending | None] | None = None
        self._playout_seconds = playout_seconds
        self._played: trio.Event | None = None  # set once Twilio has played all it was sent

    def attach(self, pair: Pair, max_seconds: float) -> None:
        self._pair = pair
        self._max_seconds = max_seconds

    async def opening(self) -> Start | None:
        """Read ``connected`` and ``start``; None if the peer left or was refused."""
        while True:
            data = await self._twilio.receive()
            if data is None:
                return None
            try:
                start = self.stream.opening(data)
            except StreamError as exc:
                await self._refuse_stream(exc)
                return None
            if start is not None:
                return start

    async def refuse(self, code: int, reason: str, why: str) -> None:
        """Close a stream that may not run (a close code and reason, which Twilio logs)."""
        log.info("media stream refused: %s (%s)", reason, why)
        await self._close_twilio(code, reason)
        await self._twilio.wait_closed(self._playout_seconds * 2)

    async def _refuse_stream(self, exc: StreamError) -> None:
        """A peer that does not speak Twilio Media Streams: one error event, then 1008."""
        message = f"This is not a Twilio media stream: {exc.message}."
        log.info("media stream closed: %s", exc.message)
        await self._to_twilio(error_event("twilio_protocol_error", message))
        await self._close_twilio(Code.POLICY_VIOLATION, "twilio_protocol_error")

    # -- ClientSide -----------------------------------------------------------------

    async def receive(self) -> Message | None:
        queue, stream = self._queue, self.stream
        while True:
            if queue:
                return queue.popleft()
            data = await self._twilio.receive()
            if data is None:
                return None
            try:
                out = stream.from_twilio(data)
            except StreamError as exc:
                await self._refuse_stream(exc)
                return None
            if self._played is not None and not stream.unplayed:
                self._played.set()
            if out is None:
                continue
            if out.__class__ is str:
                return out  # the caller's audio
            if out.end is End.STOPPED:
                await self._close_twilio(Code.NORMAL, "")
                return None
            if out.end is End.GOODBYE_SAID:
                await self._hang_up()
                return None
            queue.extend(out.upstream)  # type: ignore[union-attr]

    async def send(self, data: Message) -> None:
        out = self.stream.from_upstream(data)
        if out is None:
            return
        if self._last is None and self.stream.goodbye_asked:  # the session-length warning
            self._last = partial(Bridge.session_expired, limit=self._max_seconds)
        await self._carry_out(out.twilio, out.upstream)
        if out.end is End.GOODBYE_SAID:
            await self._hang_up()

    async def _carry_out(self, twilio: list[str], upstream: list[str]) -> None:
        for message in twilio:
            await self._to_twilio(message)
        for event in upstream:
            await self._pair.send_upstream(event)  # type: ignore[union-attr]

    async def goodbye_for(self, ending: Callable[[Bridge], Ending | None]) -> bool:
        """Have the model say goodbye before the bridge's ``ending`` ends the call; False if
        no goodbye is configured (end it now). The call ends once the goodbye has played."""
        out = self.stream.goodbye()
        if out is None:
            return False
        if self._last is None:
            self._last = ending
        await self._carry_out(out.twilio, out.upstream)
        return True

    async def _hang_up(self) -> None:
        """The goodbye has played: end the call for the limit that asked for it."""
        pair = self._pair
        assert pair is not None and self._last is not None
        await pair.end(self._last(pair.bridge))

    async def close(self, code: int, reason: str) -> None:
        """Let Twilio play what it was sent (bounded), then close: Twilio goes on to the
        call's next TwiML verb."""
        if self.stream.unplayed:
            self._played = trio.Event()
            with trio.move_on_after(self._playout_seconds):
                await self._played.wait()  # the client task reads the marks meanwhile
        await self._close_twilio(code, reason)

    async def keepalive(self) -> None:
        await self._twilio.keepalive()

    @property
    def last_heard(self) -> float:
        return self._twilio.last_heard

    def unread(self) -> int:
        return self._twilio.unread()

    @property
    def writing(self) -> bool:
        return self._twilio.writing

    async def wait_closed(self, timeout: float) -> None:
        await self._twilio.wait_closed(timeout)

    # -- the only ways to Twilio -------------------------------------------------------

    async def _to_twilio(self, text: str) -> None:
        await self._twilio.send(text)

    async def _close_twilio(self, code: int, reason: str) -> None:
        await self._twilio.close(code, reason)
