import trio

from .harness import connect, running_relay, scripted_upstream


async def echo(conn):
    ws = await conn.accept()
    while True:
        msg = await conn.receive()
        await ws.send_message(msg)


async def test_echo_roundtrip():
    with trio.fail_after(10):
        async with scripted_upstream(echo) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:
                first = await ws.get_message()
                assert '"session.update"' in first
                await ws.send_message('{"type":"x"}')
                assert await ws.get_message() == '{"type":"x"}'
