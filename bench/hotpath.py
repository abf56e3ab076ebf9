"""``python -m bench.hotpath``: the bridge's per-message cost on audio, without sockets.

Times the sans-IO steps every audio event of a session takes once the session is open: a
client's ``input_audio_buffer.append`` through :meth:`Bridge.client_message`, as the SDKs
write it and as ``bench stream`` does (with an ``event_id``), and through
:meth:`Policy.screen_client` (the path appends take while the upstream opens); and the
upstream's ``response.output_audio.delta`` through :meth:`Bridge.upstream_message`. Audio:
4,800 bytes of PCM16 (6.5 KB of JSON). Prints ns per call, the best of ``--repeat``
rounds (the least disturbed by the rest of the machine).

To compare two versions, run it against each one's sources::

    mkdir -p /tmp/relay-base && git archive <rev> src | tar -x -C /tmp/relay-base
    PYTHONPATH=/tmp/relay-base/src uv run python -m bench.hotpath
    uv run python -m bench.hotpath

For instruction counts, which a shared machine does not disturb, run one step under
``valgrind --tool=callgrind`` with ``--only STEP --number N`` and compare the totals of two N.
"""

from __future__ import annotations

import argparse
import base64
import os
import timeit
from collections.abc import Callable

from relay.core.bridge import Bridge, Limits
from relay.core.policy import Policy

MODEL = "gpt-realtime-2.1"
KEY = "sk-bench-" + "x" * 50  # as long as a real key: the bridge looks for it in upstream text


def _events() -> tuple[str, str, str]:
    """An append as the SDKs write it, one as ``bench stream`` writes it, and a delta."""
    audio = base64.b64encode(os.urandom(4800)).decode()
    append = f'{{"type":"input_audio_buffer.append","audio":"{audio}"}}'
    with_id = (
        '{"type":"input_audio_buffer.append","event_id":"b1.1712345678901234567",'
        f'"audio":"{audio}"}}'
    )
    delta = (
        '{"type":"response.output_audio.delta","event_id":"event_1","response_id":"resp_1",'
        f'"item_id":"item_1","output_index":0,"content_index":0,"delta":"{audio}"}}'
    )
    return append, with_id, delta


def open_bridge(policy: Policy) -> Bridge:
    """A bridge past its start: upstream open, flushed, session.created delivered."""
    bridge = Bridge(
        session_update='{"type":"session.update","event_id":"event_relay_setup","session":{}}',
        limits=Limits(queue_messages=256, queue_bytes=4 << 20, max_message_bytes=4 << 20),
        secret=KEY,
        policy=policy,
    )
    bridge.upstream_opened()
    while bridge.next_to_flush() is not None:
        pass
    bridge.upstream_message('{"type":"session.created","session":{}}')
    bridge.upstream_message('{"type":"session.updated","session":{}}')
    return bridge


def steps() -> dict[str, Callable[[], object]]:
    append, with_id, delta = _events()
    policy = Policy().for_session(MODEL)
    bridge = open_bridge(policy)
    for event in (append, with_id):
        assert bridge.client_message(event) is event
        screened = policy.screen_client(event)
        assert (getattr(screened, "text", None) or screened[0]) is event
    assert bridge.upstream_message(delta) is delta
    return {
        "bridge.client_message(append)": lambda: bridge.client_message(append),
        "bridge.client_message(with_id)": lambda: bridge.client_message(with_id),
        "policy.screen_client(append)": lambda: policy.screen_client(append),
        "bridge.upstream_message(delta)": lambda: bridge.upstream_message(delta),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--number", type=int, default=200_000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the best is printed")
    parser.add_argument("--only", help="time this step alone (a name as printed)")
    args = parser.parse_args()
    for name, step in steps().items():
        if args.only and name != args.only:
            continue
        best = min(timeit.repeat(step, number=args.number, repeat=args.repeat))
        print(f"{name:34s} {best / args.number * 1e9:7.0f} ns", flush=True)


if __name__ == "__main__":
    main()
