"""The client side over ASGI: a client hanging up mid-write is a client gone, not a crash."""

from __future__ import annotations

import pytest
import trio

from relay.server.legs import AsgiClient


@pytest.mark.parametrize("error", [trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError])
async def test_a_write_racing_the_clients_hang_up_is_not_an_error(error: type[Exception]) -> None:
    """Regression (found by the thorough loopback property): Hypercorn half-closes the socket
    without its send lock when the client hangs up, so a concurrent write from the app raised
    BusyResourceError out of the pair."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.disconnect", "code": 1006}

    async def send(message: dict) -> None:
        sent.append(message)
        raise error("another task is currently sending data on this SocketStream")

    client = AsgiClient(receive, send)
    await client.send('{"type":"x"}')
    await client.close(1011, "bye")
    assert [m["type"] for m in sent] == ["websocket.send", "websocket.close"]
    assert await client.receive() is None
