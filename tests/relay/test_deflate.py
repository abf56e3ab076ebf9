"""RELAY_PERMESSAGE_DEFLATE and a client that compresses (Python ``websockets``, as browsers do).

With deflate on, Hypercorn negotiates it; the relay's own framer does not inflate, so such a
session is not taken over (it used to be, and every compressing client was closed 1002): it
goes through plain ASGI messages, where Hypercorn inflates and deflates. A client that offers
nothing is still taken over. With deflate off (the default) no one gets it.
"""

from __future__ import annotations

import pytest
import trio
from websockets.sync.client import connect as sync_connect

from .harness import UpstreamConnection, open_session, running_relay, scripted_upstream

TIMEOUT = 20
#: Big and repetitive enough that a compressing client really sends a compressed frame.
MESSAGE = '{"type":"conversation.item.create","item":{"text":"' + "hello " * 2000 + '"}}'


async def echo(conn: UpstreamConnection) -> None:
    ws = await open_session(conn)  # (it reads the relay's session.update)
    while True:
        await ws.send_message(await conn.receive())


def _talk(url: str, compression: str | None, during: object) -> tuple[str | None, str]:
    """One exchange from a thread; returns the extension the server accepted and the echo.
    ``during`` (a Trio-side function) runs while the session is live."""
    with sync_connect(url, compression=compression, open_timeout=TIMEOUT) as ws:
        assert '"session.created"' in str(ws.recv(timeout=TIMEOUT))
        ws.send(MESSAGE)
        echoed = ws.recv(timeout=TIMEOUT)
        trio.from_thread.run_sync(during)  # type: ignore[arg-type]
        return ws.response.headers.get("Sec-WebSocket-Extensions"), str(echoed)


@pytest.mark.parametrize("deflate", [True, False], ids=["deflate-on", "deflate-off"])
async def test_a_compressing_client_is_relayed_whatever_the_deflate_setting(deflate: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(echo) as up, running_relay(
            upstream_url=up.url, permessage_deflate=deflate
        ) as relay:
            clients: list[str] = []

            def note_the_client() -> None:
                clients.extend(type(pair.client).__name__ for pair in relay.app.pairs)

            extension, echoed = await trio.to_thread.run_sync(
                _talk, relay.url + "/voice", "deflate", note_the_client
            )
            assert echoed == MESSAGE
            assert (extension is not None and "permessage-deflate" in extension) == deflate
            # Deflate negotiated: Hypercorn's ASGI messages; else the relay takes the socket.
            assert clients == ["AsgiClient" if deflate else "SocketClient"]
            clients.clear()
            extension, echoed = await trio.to_thread.run_sync(
                _talk, relay.url + "/voice", None, note_the_client
            )
            assert echoed == MESSAGE and extension is None
            assert clients == ["SocketClient"]  # offering nothing: taken over as ever
