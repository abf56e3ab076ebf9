"""WAV files in and out for ``relay talk``, and the resampler that feeds the Realtime API.

The API takes PCM16, 24 kHz, mono; the files people have come at any rate, in
stereo, as 8-bit or as G.711 from phones. Everything here is plain Python over
``array`` (no numpy): the loops are O(n) and convert a minute of 48 kHz audio in
about a second, which is plenty for a file someone sends through a relay.

The RIFF chunks are parsed by hand rather than with :mod:`wave`, which reads only
integer PCM and would refuse G.711 and float files with an unhelpful message.
"""

from __future__ import annotations

import struct
import sys
import wave
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..core.audio import ALAW_TO_PCM16, MULAW_TO_PCM16

API_RATE: Final = 24000
"""The only PCM rate the GA Realtime API accepts (``audio/pcm``, 24 kHz)."""

_BIG_ENDIAN: Final = sys.byteorder == "big"

# WAVE format tags (RFC 2361) this module decodes.
_PCM: Final = 0x0001
_FLOAT: Final = 0x0003
_ALAW: Final = 0x0006
_MULAW: Final = 0x0007
_EXTENSIBLE: Final = 0xFFFE

_KNOWN_TAGS: Final = {
    0x0002: "Microsoft ADPCM",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
    0x0055: "MPEG Layer 3",
    0x0161: "Windows Media Audio",
}

CONVERT_HINT: Final = "convert it first, e.g. `sox IN -r 24000 -c 1 -b 16 OUT.wav`"


class WavError(Exception):
    """A file that cannot be used as input audio; the message says why and what to do."""


@dataclass(frozen=True)
class WavFormat:
    """What a WAV file holds, as read from its ``fmt `` chunk."""

    encoding: str  # "pcm", "float", "mu-law" or "a-law"
    rate: int
    channels: int
    bits: int

    def describe(self) -> str:
        layout = {1: "mono", 2: "stereo"}.get(self.channels, f"{self.channels} channels")
        kind = (
            f"{self.bits}-bit {self.encoding.upper()}"
            if self.encoding in ("pcm", "float")
            else (f"G.711 {self.encoding}")
        )
        return f"{kind}, {self.rate} Hz, {layout}"





def mulaw_bytes(samples: Sequence[int]) -> bytes:
    """PCM16 samples as G.711 μ-law (a phone's audio, once resampled to 8 kHz): each sample
    becomes the code whose ITU-T G.711 level is nearest to it."""
    return bytes(_MULAW_OF[(s + 32768) >> 2] for s in samples)


def _mulaw_codes() -> list[int]:
    """μ-law code per PCM16 level, in steps of 4 (the finest μ-law step is 8)."""
    levels = sorted((value, code) for code, value in enumerate(MULAW_TO_PCM16))
    table, at = [], 0
    for index in range(16384):
        level = index * 4 - 32768 + 2
        while at + 1 < len(levels) and abs(levels[at + 1][0] - level) <= abs(levels[at][0] - level):
            at += 1
        table.append(levels[at][1])
    return table


_MULAW_OF = _mulaw_codes()


def read_wav(path: str | Path) -> tuple[list[int], WavFormat]:
    """Read a WAV file as mono PCM16 samples at the file's own rate.

    Raises :class:`WavError` with a one-line message for a missing, unreadable,
    damaged or unsupported file.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise WavError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise WavError(f"{name} is a directory, not a WAV file") from None
    except OSError as exc:
        raise WavError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    return parse_wav(data, name)


def parse_wav(data: bytes, name: str = "input") -> tuple[list[int], WavFormat]:
    """Decode WAV bytes to mono PCM16 samples at the file's rate (see :func:`read_wav`)."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise WavError(f"{name} is not a WAV file (no RIFF/WAVE header); {CONVERT_HINT}")
    fmt: WavFormat | None = None
    payload: bytes | None = None
    pos = 12
    while pos + 8 <= len(data) and payload is None:
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = data[pos + 8 : pos + 8 + size]  # a streamed file may claim more than it has
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(body, name)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavError(f"{name} is a damaged WAV file: its audio comes before its format")
            payload = body
        pos += 8 + size + (size & 1)
    if fmt is None:
        raise WavError(f"{name} is a damaged WAV file: it has no 'fmt ' chunk; {CONVERT_HINT}")
    if payload is None:
        raise WavError(f"{name} is a damaged WAV file: it has no 'data' chunk")
    samples = _decode(payload, fmt)
    if not samples:
        raise WavError(f"{name} holds no audio (its data chunk is empty)")
    return samples, fmt


def _parse_fmt(body: bytes, name: str) -> WavFormat:
    if len(body) < 16:
        raise WavError(f"{name} is a damaged WAV file: its 'fmt ' chunk is too short")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _EXTENSIBLE and len(body) >= 26:
        (tag,) = struct.unpack_from("<H", body, 24)  # first two bytes of the SubFormat GUID
    encoding = {_PCM: "pcm", _FLOAT: "float", _MULAW: "mu-law", _ALAW: "a-law"}.get(tag)
    if encoding is None:
        what = _KNOWN_TAGS.get(tag, "an encoding relay talk does not know")
        raise WavError(
            f"{name} uses WAV format 0x{tag:04X} ({what}), which relay talk cannot decode;"
            f" use PCM (8/16/24/32-bit), float, μ-law or A-law, or {CONVERT_HINT}"
        )
    supported = {"pcm": (8, 16, 24, 32), "float": (32, 64), "mu-law": (8,), "a-law": (8,)}
    if bits not in supported[encoding]:
        raise WavError(f"{name}: {bits}-bit {encoding} audio is not supported; {CONVERT_HINT}")
    if channels < 1 or rate < 1:
        raise WavError(f"{name} is a damaged WAV file: {channels} channels at {rate} Hz")
    return WavFormat(encoding, rate, channels, bits)


def _decode(payload: bytes, fmt: WavFormat) -> list[int]:
    """Interleaved frames → mono PCM16 (channels averaged)."""
    width = fmt.bits // 8
    usable = len(payload) - len(payload) % (width * fmt.channels)
    payload = payload[:usable]
    values: Sequence[int]
    if fmt.encoding == "mu-law":
        values = [MULAW_TO_PCM16[b] for b in payload]
    elif fmt.encoding == "a-law":
        values = [ALAW_TO_PCM16[b] for b in payload]
    elif fmt.encoding == "float":
        floats = array("f" if width == 4 else "d", payload)
        if _BIG_ENDIAN:
            floats.byteswap()
        values = [int(max(-1.0, min(1.0, f)) * 32767) for f in floats]
    elif width == 1:
        values = [(b - 128) << 8 for b in payload]  # 8-bit WAV is unsigned
    elif width == 2:
        values = _ints("h", payload)
    elif width == 3:
        values = [
            int.from_bytes(payload[i + 1 : i + 3], "little", signed=True)
            for i in range(0, len(payload), 3)
        ]
    else:
        values = [v >> 16 for v in _ints("i", payload)]
    if fmt.channels == 1:
        return list(values)
    n = fmt.channels
    return [sum(values[i : i + n]) // n for i in range(0, len(values), n)]


def _ints(code: str, payload: bytes) -> array[int]:
    out = array(code, payload)
    if _BIG_ENDIAN:
        out.byteswap()
    return out


def resample(samples: Sequence[int], src_rate: int, dst_rate: int) -> list[int]:
    """Resample mono PCM16 from ``src_rate`` to ``dst_rate`` (any ratio, e.g. 44.1 → 24 kHz).

    Downsampling averages the input over each output sample's span (a box filter
    computed from running sums, so fractional spans are exact); that keeps most of
    the aliasing out at O(n) cost. Upsampling interpolates linearly.
    """
    if src_rate == dst_rate or not samples:
        return list(samples)
    n_in = len(samples)
    n_out = max(1, n_in * dst_rate // src_rate)
    step = src_rate / dst_rate
    out = [0] * n_out
    if dst_rate > src_rate:
        last = n_in - 1
        for k in range(n_out):
            pos = k * step
            i = int(pos)
            frac = pos - i
            a = samples[i]
            b = samples[i + 1] if i < last else a
            out[k] = round(a + (b - a) * frac)
        return out
    prefix = [0] * (n_in + 1)
    total = 0
    for i, s in enumerate(samples):
        total += s
        prefix[i + 1] = total

    def area(x: float) -> float:  # integral of the step signal from 0 to x
        i = int(x)
        if i >= n_in:
            return prefix[n_in]
        return prefix[i] + samples[i] * (x - i)

    left = 0.0
    for k in range(n_out):
        right = (k + 1) * step
        value = round((area(right) - left) / step)
        left = area(right)
        out[k] = -32768 if value < -32768 else 32767 if value > 32767 else value
    return out


def pcm16_bytes(samples: Sequence[int]) -> bytes:
    """Little-endian PCM16 bytes, as the Realtime API and WAV files want them."""
    out = array("h", samples)
    if _BIG_ENDIAN:
        out.byteswap()
    return out.tobytes()


def pcm16_samples(data: bytes) -> list[int]:
    """The inverse of :func:`pcm16_bytes` (a trailing odd byte is dropped)."""
    return list(_ints("h", data[: len(data) - len(data) % 2]))


def load_for_api(path: str | Path) -> tuple[bytes, WavFormat]:
    """A WAV file as PCM16 24 kHz mono bytes, ready for ``input_audio_buffer.append``."""
    samples, fmt = read_wav(path)
    return pcm16_bytes(resample(samples, fmt.rate, API_RATE)), fmt


def write_wav(path: str | Path, pcm16: bytes, rate: int = API_RATE) -> None:
    """Write mono PCM16 audio as a WAV file."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm16)
