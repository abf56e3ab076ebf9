"""Test-wide set-up."""

from __future__ import annotations

import struct

from wsproto import frame_protocol

_process_close = frame_protocol.FrameProtocol._process_close


def _accept_1014(self: frame_protocol.FrameProtocol, frame: frame_protocol.Frame) -> frame_protocol.Frame:
    """Let the wsproto-based test clients read close code 1014 (Bad Gateway).

    1014 is registered with IANA and accepted by browsers, Node's ws and Python's
    websockets, but wsproto 1.3 treats it as an unknown reserved code and answers
    with a protocol error, which would hide the code the relay really sent.
    """
    data = frame.payload
    if isinstance(data, bytes | bytearray) and len(data) >= 2 and struct.unpack("!H", data[:2])[0] == 1014:
        return frame_protocol.Frame(
            frame.opcode, (1014, bytes(data[2:]).decode()), frame.frame_finished, frame.message_finished
        )
    return _process_close(self, frame)


frame_protocol.FrameProtocol._process_close = _accept_1014  # type: ignore[method-assign]
