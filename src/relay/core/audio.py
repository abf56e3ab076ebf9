"""Audio conversions the relay needs: G.711 to PCM16, 8 ↔ 24 kHz, mono pairs to stereo.

Everything works on whole byte strings with C-speed slicing and ``bytes.translate`` (no
Python loop per sample), because call records convert up to an hour of audio at a time.
PCM16 is little-endian, as the Realtime API and WAV files have it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

#: The Realtime API's rates: ``audio/pcm`` is 24 kHz, G.711 (``audio/pcmu``, ``audio/pcma``) 8 kHz.
PCM_RATE: Final = 24_000
G711_RATE: Final = 8_000


def _g711_tables() -> tuple[list[int], list[int]]:
    """Decoding tables (byte → linear PCM16) for μ-law and A-law, per ITU-T G.711."""
    mulaw, alaw = [], []
    for byte in range(256):
        u = ~byte & 0xFF
        magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        mulaw.append(0x84 - magnitude if u & 0x80 else magnitude - 0x84)
        a = byte ^ 0x55
        exponent, mantissa = (a & 0x70) >> 4, a & 0x0F
        value = (
            (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
        )
        alaw.append(value if a & 0x80 else -value)
    return mulaw, alaw


MULAW_TO_PCM16, ALAW_TO_PCM16 = _g711_tables()
#: Per law: translation tables to the low and the high byte of each sample's PCM16.
_BYTE_TABLES: Final = {
    law: (bytes(v & 0xFF for v in table), bytes((v >> 8) & 0xFF for v in table))
    for law, table in (("audio/pcmu", MULAW_TO_PCM16), ("audio/pcma", ALAW_TO_PCM16))
}


def audio_format(session_format: object) -> tuple[str, int]:
    """(type, rate) of a GA session's ``audio.input.format`` / ``audio.output.format``;
    PCM16 at 24 kHz when it is missing or unknown (the API's default)."""
    kind = session_format.get("type") if isinstance(session_format, Mapping) else None
    if kind in _BYTE_TABLES:
        return str(kind), G711_RATE
    return "audio/pcm", PCM_RATE


def to_pcm16(data: bytes, kind: str) -> bytes:
    """Audio of format ``kind`` as PCM16 at its own rate (G.711 is decoded; PCM passes)."""
    tables = _BYTE_TABLES.get(kind)
    if tables is None:
        return data[: len(data) - len(data) % 2]
    low, high = tables
    out = bytearray(2 * len(data))
    out[0::2] = data.translate(low)
    out[1::2] = data.translate(high)
    return bytes(out)


def convert_rate(pcm16: bytes, src: int, dst: int) -> bytes:
    """PCM16 from 8 to 24 kHz (each sample three times) or back (every third sample).

    Crude, but only used where the two sides of a recorded call differ in rate.
    """
    if src == dst:
        return pcm16
    if src == G711_RATE and dst == PCM_RATE:
        out = bytearray(3 * len(pcm16))
        for k in range(3):
            out[2 * k :: 6] = pcm16[0::2]
            out[2 * k + 1 :: 6] = pcm16[1::2]
        return bytes(out)
    if src == PCM_RATE and dst == G711_RATE:
        usable = len(pcm16) - len(pcm16) % 6
        out = bytearray(usable // 3)
        out[0::2] = pcm16[0:usable:6]
        out[1::2] = pcm16[1:usable:6]
        return bytes(out)
    raise ValueError(f"no conversion from {src} Hz to {dst} Hz")


def interleave(left: bytes | bytearray, right: bytes | bytearray) -> bytes:
    """Two PCM16 mono signals of the same length as one stereo signal (left first)."""
    if len(left) != len(right):
        raise ValueError("both channels must be as long")
    out = bytearray(2 * len(left))
    out[0::4] = left[0::2]
    out[1::4] = left[1::2]
    out[2::4] = right[0::2]
    out[3::4] = right[1::2]
    return bytes(out)


def session_formats(session: Any) -> tuple[tuple[str, int], tuple[str, int]]:
    """The (type, rate) of a GA session object's input and output audio."""
    audio = session.get("audio") if isinstance(session, Mapping) else None
    audio = audio if isinstance(audio, Mapping) else {}
    sides = [audio.get(side) for side in ("input", "output")]
    return tuple(  # type: ignore[return-value]
        audio_format(side.get("format") if isinstance(side, Mapping) else None) for side in sides
    )
