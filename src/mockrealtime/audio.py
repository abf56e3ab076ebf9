"""Audio for the fake server: formats, G.711, an energy VAD and a synthetic voice.

Everything here is pure computation (no I/O, no trio). Audio is handled as
``bytes``; PCM16 means signed 16-bit little-endian mono. The stdlib ``audioop``
is gone from Python 3.13, so the G.711 tables are built here.
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
from array import array
from dataclasses import dataclass
from functools import cache
from operator import mul
from typing import Final, Literal

AudioFormat = Literal["pcm16", "g711_ulaw", "g711_alaw"]
"""Internal names of the three wire formats (beta names; GA uses audio/pcm, pcmu, pcma)."""

PCM_RATE: Final = 24_000
G711_RATE: Final = 8_000
FRAME_MS: Final = 10
"""The VAD decides speech/silence per 10 ms frame."""

HANGOVER_MS: Final = 100
"""Speech is held this long after the last loud frame before silence starts to count,
as a neural VAD's smoothing does; short pauses between words (a comma) stay one turn."""

CHUNK_MS: Final = 100
"""Reply audio is generated and streamed in 100 ms chunks (one 'syllable' each)."""

_LITTLE_ENDIAN: Final = sys.byteorder == "little"


def sample_rate(fmt: AudioFormat) -> int:
    """Samples per second of a wire format."""
    return PCM_RATE if fmt == "pcm16" else G711_RATE


def bytes_per_ms(fmt: AudioFormat) -> int:
    """Wire bytes per millisecond: 48 for PCM16 at 24 kHz, 8 for G.711."""
    return 48 if fmt == "pcm16" else 8


def duration_ms(n_bytes: int, fmt: AudioFormat) -> float:
    """Duration of ``n_bytes`` of audio in ``fmt``."""
    return n_bytes / bytes_per_ms(fmt)


# --- base64 -------------------------------------------------------------------


def b64decode(text: str) -> bytes:
    """Decode base64 strictly; raises ``ValueError`` on garbage (not silently dropping it)."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64 audio: {exc}") from None


def b64encode(data: bytes) -> str:
    """Encode bytes as standard base64 text."""
    return base64.b64encode(data).decode("ascii")


# --- G.711 --------------------------------------------------------------------


def _ulaw_to_linear(code: int) -> int:
    u = ~code & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return (0x84 - t) if (u & 0x80) else (t - 0x84)


def _alaw_to_linear(code: int) -> int:
    a = code ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if (a & 0x80) else -t


ULAW_TABLE: Final = tuple(_ulaw_to_linear(c) for c in range(256))
ALAW_TABLE: Final = tuple(_alaw_to_linear(c) for c in range(256))

_ULAW_PCM_BYTES: Final = tuple(v.to_bytes(2, "little", signed=True) for v in ULAW_TABLE)
_ALAW_PCM_BYTES: Final = tuple(v.to_bytes(2, "little", signed=True) for v in ALAW_TABLE)


def ulaw_decode(data: bytes) -> bytes:
    """G.711 μ-law bytes → PCM16 bytes (same sample rate)."""
    return b"".join(map(_ULAW_PCM_BYTES.__getitem__, data))


def alaw_decode(data: bytes) -> bytes:
    """G.711 A-law bytes → PCM16 bytes (same sample rate)."""
    return b"".join(map(_ALAW_PCM_BYTES.__getitem__, data))


def ulaw_encode_sample(sample: int) -> int:
    """One PCM16 sample → μ-law code (the classic biased-segment encoder)."""
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), clip) + bias
    exponent = max(magnitude.bit_length() - 8, 0)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def alaw_encode_sample(sample: int) -> int:
    """One PCM16 sample → A-law code."""
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(abs(sample) if sample >= 0 else -sample - 1, 32767) >> 3
    if magnitude < 32:
        code = magnitude >> 1
    else:
        exponent = magnitude.bit_length() - 5
        code = (exponent << 4) | ((magnitude >> exponent) & 0x0F)
    return (code | sign) ^ 0x55


def pcm16_samples(data: bytes) -> array[int]:
    """PCM16 little-endian bytes → an ``array('h')`` (a trailing odd byte is ignored)."""
    samples = array("h")
    samples.frombytes(data[: len(data) - (len(data) & 1)])
    if not _LITTLE_ENDIAN:
        samples.byteswap()
    return samples


def samples_to_pcm16(samples: array[int]) -> bytes:
    """``array('h')`` → PCM16 little-endian bytes."""
    if not _LITTLE_ENDIAN:
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def to_pcm16(data: bytes, fmt: AudioFormat) -> bytes:
    """Any wire format → PCM16 at that format's own rate (no resampling)."""
    if fmt == "g711_ulaw":
        return ulaw_decode(data)
    if fmt == "g711_alaw":
        return alaw_decode(data)
    return data


# --- energy VAD ---------------------------------------------------------------


def threshold_to_rms(threshold: float) -> float:
    """Map the API's 0–1 VAD ``threshold`` to a linear RMS level (full scale = 1).

    0 → -60 dBFS, 0.5 → -35 dBFS, 1 → -10 dBFS: the default detects normal speech
    and ignores silence and faint hiss, a higher threshold needs louder input.
    """
    return 10 ** ((-60.0 + 50.0 * threshold) / 20.0)


def frame_rms(pcm: bytes) -> float:
    """RMS level of a PCM16 frame, full scale = 1.0 (every 2nd sample, which is plenty)."""
    samples = pcm16_samples(pcm)[::2]
    if not samples:
        return 0.0
    return math.sqrt(sum(map(mul, samples, samples)) / len(samples)) / 32768.0


@dataclass
class VadResult:
    """What one chunk of audio did to the VAD: offsets in ms of all audio so far."""

    speech_started_ms: int | None = None
    speech_stopped_ms: int | None = None


class EnergyVad:
    """Energy-based voice activity detection over 10 ms frames.

    Offsets are milliseconds of audio fed since construction (or ``reset``), which is
    how the real server reports ``audio_start_ms``/``audio_end_ms``. Speech starts on
    the first loud frame (the start offset is moved back by ``prefix_padding_ms``);
    it stops once ``HANGOVER_MS + silence_duration_ms`` of quiet frames followed it,
    and the stop offset includes that silence.
    """

    def __init__(
        self,
        fmt: AudioFormat,
        *,
        threshold: float = 0.5,
        prefix_padding_ms: int = 300,
        silence_duration_ms: int = 200,
    ) -> None:
        self.fmt: AudioFormat = fmt
        self.level = threshold_to_rms(threshold)
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self._frame_bytes = bytes_per_ms(fmt) * FRAME_MS
        self._pending = b""
        self.position_ms = 0
        """Milliseconds of audio fully processed."""
        self.in_speech = False
        self._silence_ms = 0
        self._floor_ms = 0

    def reset(self, position_ms: int) -> None:
        """Forget any speech in progress; audio before ``position_ms`` cannot be padding."""
        self.in_speech = False
        self._silence_ms = 0
        self._floor_ms = position_ms

    def feed(self, data: bytes) -> list[VadResult]:
        """Process more audio (in the wire format); returns starts/stops in order."""
        results: list[VadResult] = []
        buf = self._pending + data if self._pending else data
        step = self._frame_bytes
        end = len(buf) - len(buf) % step
        fmt = self.fmt
        for off in range(0, end, step):
            frame = buf[off : off + step]
            pcm = frame if fmt == "pcm16" else to_pcm16(frame, fmt)
            loud = frame_rms(pcm) >= self.level
            start_ms = self.position_ms
            self.position_ms += FRAME_MS
            if not self.in_speech:
                if loud:
                    self.in_speech = True
                    self._silence_ms = 0
                    begin = max(self._floor_ms, start_ms - self.prefix_padding_ms)
                    results.append(VadResult(speech_started_ms=begin))
            elif loud:
                self._silence_ms = 0
            else:
                self._silence_ms += FRAME_MS
                if self._silence_ms >= self.silence_duration_ms + HANGOVER_MS:
                    self.in_speech = False
                    self._silence_ms = 0
                    self._floor_ms = self.position_ms
                    results.append(VadResult(speech_stopped_ms=self.position_ms))
        self._pending = buf[end:]
        return results


# --- synthetic voice ----------------------------------------------------------

VARIANTS: Final = 12
"""Number of distinct 'syllables' the synthetic voice can say."""

_F0: Final = (118.0, 131.0, 142.0, 156.0, 170.0, 185.0)
_VOWELS: Final = ((730.0, 1090.0), (300.0, 2300.0))  # /a/ and /i/ formants


_LOW_VOICES: Final = frozenset({"ash", "ballad", "echo", "verse", "cedar"})


def voice_variants(voice: str | dict[str, object]) -> tuple[int, ...]:
    """The syllable variants a voice speaks with: lower voices use the three lowest
    pitches, the others the three highest, so voices are told apart by ear."""
    name = voice if isinstance(voice, str) else str(voice.get("id", ""))
    base = 0 if name in _LOW_VOICES else len(_F0) // 2
    return tuple(
        vowel * len(_F0) + base + k for vowel in range(len(_VOWELS)) for k in range(len(_F0) // 2)
    )


def _syllable_samples(variant: int, rate: int) -> list[int]:
    """One 100 ms voiced syllable: a few formant-weighted harmonics under an envelope."""
    f0 = _F0[variant % len(_F0)]
    f1, f2 = _VOWELS[(variant // len(_F0)) % len(_VOWELS)]
    harmonics = []
    for k in range(1, 11):
        f = k * f0
        if f >= rate / 2:
            break
        weight = (
            math.exp(-(((f - f1) / 250.0) ** 2))
            + 0.5 * math.exp(-(((f - f2) / 400.0) ** 2))
            + 0.15 / k
        )
        harmonics.append((2 * math.pi * f / rate, weight))
    total = sum(w for _, w in harmonics)
    n = rate * CHUNK_MS // 1000
    attack, release = n // 5, n // 3
    peak = 0.35 * 32767 / total
    out = []
    for i in range(n):
        if i < attack:
            env = math.sin(0.5 * math.pi * i / attack) ** 2
        elif i >= n - release:
            env = math.sin(0.5 * math.pi * (n - i) / release) ** 2
        else:
            env = 1.0
        glide = 1.0 - 0.04 * i / n  # a slight falling pitch sounds less robotic
        value = sum(w * math.sin(omega * glide * i) for omega, w in harmonics)
        out.append(int(peak * env * value))
    return out


def _encode(samples: list[int], fmt: AudioFormat) -> bytes:
    if fmt == "g711_ulaw":
        return bytes(map(ulaw_encode_sample, samples))
    if fmt == "g711_alaw":
        return bytes(map(alaw_encode_sample, samples))
    return samples_to_pcm16(array("h", samples))


@cache
def syllable_chunk(variant: int, fmt: AudioFormat) -> bytes:
    """Audio bytes of syllable ``variant`` (100 ms) in ``fmt``; cached, built once."""
    return _encode(_syllable_samples(variant % VARIANTS, sample_rate(fmt)), fmt)


@cache
def syllable_chunk_b64(variant: int, fmt: AudioFormat) -> str:
    """Base64 of ``syllable_chunk``; cached so streaming never re-encodes audio."""
    return b64encode(syllable_chunk(variant, fmt))


@cache
def silence_chunk(fmt: AudioFormat) -> bytes:
    """100 ms of digital silence in ``fmt``."""
    return _encode([0] * (sample_rate(fmt) * CHUNK_MS // 1000), fmt)


@cache
def silence_chunk_b64(fmt: AudioFormat) -> str:
    """Base64 of ``silence_chunk``."""
    return b64encode(silence_chunk(fmt))


SILENCE: Final = -1
"""Chunk plan marker for a 100 ms pause (instead of a syllable variant)."""


def chunk_b64(variant: int, fmt: AudioFormat) -> str:
    """Base64 chunk for a plan entry: a syllable variant or ``SILENCE``."""
    return silence_chunk_b64(fmt) if variant == SILENCE else syllable_chunk_b64(variant, fmt)


def chunk_bytes(variant: int, fmt: AudioFormat) -> bytes:
    """Raw chunk for a plan entry: a syllable variant or ``SILENCE``."""
    return silence_chunk(fmt) if variant == SILENCE else syllable_chunk(variant, fmt)


def syllables_in(word: str) -> int:
    """A crude syllable count: one per three letters, at least one."""
    letters = sum(c.isalnum() for c in word)
    return max(1, round(letters / 3))
