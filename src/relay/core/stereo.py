"""Where each piece of a call's audio falls in time, for a stereo recording.

Both sides follow one rule: a chunk starts when it arrived, or when the side's previous
chunk ends if that is later. A caller's microphone streams in real time, so its chunks
land where they were spoken; the assistant's audio arrives faster than it is played, and
a client plays it back to back from its first chunk, so laying it end to end from its
arrival is what the caller heard. A barge-in is the client's
``conversation.item.truncate``: the caller heard ``audio_end_ms`` of that item, so its
audio is cut there and the assistant's side goes on from the cut.

Audio is kept as it came, base64 text in a :class:`Spool` (memory in tests, a file in the
relay), and decoded only when the recording is rendered, after the call: decoding ~6 KB of
base64 per message both ways would be most of what recording costs while the call runs.
The timeline keeps only where each run of audio lies. Nothing here does I/O.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from .audio import convert_rate, interleave, to_pcm16

#: Samples rendered at a time (10 s at 24 kHz: a few hundred KiB in memory).
WINDOW_SAMPLES: Final = 240_000
CALLER, ASSISTANT = 0, 1


class Spool(Protocol):
    """Where a channel's audio (base64 text) is kept, in arrival order."""

    def append(self, data: bytes) -> int:
        """Keep ``data``; its offset in the spool."""
        ...

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes kept from ``offset`` on."""
        ...


class MemorySpool:
    """A spool in memory (for tests and short calls)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def append(self, data: bytes) -> int:
        offset = len(self.data)
        self.data += data
        return offset

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])


def decoded_size(b64: bytes) -> int:
    """Bytes that base64 text (without line breaks) decodes to."""
    return len(b64) // 4 * 3 - (2 if b64.endswith(b"==") else 1 if b64.endswith(b"=") else 0)


@dataclass(slots=True)
class Run:
    """Audio of format ``kind`` at ``rate`` Hz, base64 text at ``offset`` of the spool
    (``chars`` long), laid at ``start`` on the timeline for ``samples`` timeline samples."""

    start: int
    offset: int
    chars: int
    samples: int
    kind: str
    rate: int
    item: str | None = None
    #: Whether the text ends in base64 padding (then no later text may join this run).
    padded: bool = False

    @property
    def end(self) -> int:
        return self.start + self.samples


class Timeline:
    """The runs of one call's two channels, at ``rate`` samples a second from ``t0``."""

    def __init__(self, t0: float, rate: int, spools: tuple[Spool, Spool]) -> None:
        self.t0 = t0
        self.rate = rate
        self._spools = spools
        self.runs: tuple[list[Run], list[Run]] = ([], [])
        self._cursor = [0, 0]
        self._item_start: dict[str, int] = {}
        self._cut: set[str] = set()

    def add(
        self,
        channel: int,
        at: float,
        b64: bytes,
        kind: str,
        rate: int,
        item: str | None = None,
    ) -> None:
        """Base64 audio of ``channel`` in format ``kind`` at ``rate`` Hz that arrived at ``at``
        (the assistant's names its item)."""
        width = 2 if kind == "audio/pcm" else 1
        source = decoded_size(b64) // width
        samples = source * self.rate // rate
        if not samples or (item is not None and item in self._cut):
            return
        start = max(round((at - self.t0) * self.rate), self._cursor[channel])
        offset = self._spools[channel].append(b64)
        runs = self.runs[channel]
        last = runs[-1] if runs else None
        if (
            last is not None
            and not last.padded
            and last.end == start
            and (last.item, last.kind, last.rate) == (item, kind, rate)
            and last.offset + last.chars == offset
            and (source * self.rate) % rate == 0  # (the run maps to whole source samples)
            and (last.samples * rate) % self.rate == 0
        ):
            last.chars += len(b64)  # contiguous in time and in the spool: one run
            last.samples += samples
            last.padded = b64.endswith(b"=")
        else:
            runs.append(Run(start, offset, len(b64), samples, kind, rate, item, b64.endswith(b"=")))
        if item is not None:
            self._item_start.setdefault(item, start)
        self._cursor[channel] = start + samples

    def truncate(self, item: str, audio_end_ms: int) -> None:
        """The caller heard only ``audio_end_ms`` of the assistant's ``item``: cut the rest."""
        start = self._item_start.get(item)
        self._cut.add(item)
        if start is None:
            return
        cut = start + max(0, audio_end_ms) * self.rate // 1000
        runs = self.runs[ASSISTANT]
        kept = []
        for run in runs:
            if run.item == item:
                run.samples = min(run.samples, max(0, cut - run.start))
            if run.samples:
                kept.append(run)
        runs[:] = kept
        self._cursor[ASSISTANT] = max((run.end for run in runs), default=0)

    @property
    def length(self) -> int:
        """Samples from the start to the end of the last audio on either side."""
        return max(self._cursor)

    def render(self, window: int = WINDOW_SAMPLES) -> Iterator[bytes]:
        """The call as interleaved stereo PCM16 (caller left, assistant right), in windows."""
        for begin in range(0, self.length, window):
            end = min(begin + window, self.length)
            yield interleave(*(self._mono(channel, begin, end) for channel in (CALLER, ASSISTANT)))

    def _mono(self, channel: int, begin: int, end: int) -> bytearray:
        out = bytearray(2 * (end - begin))
        for run in self.runs[channel]:  # few runs: one per stretch of speech
            lo, hi = max(run.start, begin), min(run.end, end)
            if lo < hi:
                pcm = self._pcm(channel, run, lo - run.start, hi - run.start)
                out[2 * (lo - begin) : 2 * (lo - begin) + len(pcm)] = pcm
        return out

    def _pcm(self, channel: int, run: Run, lo: int, hi: int) -> bytes:
        """PCM16 at the timeline's rate of ``run``'s timeline samples ``lo``..``hi``."""
        width = 2 if run.kind == "audio/pcm" else 1
        src_lo = lo * run.rate // self.rate
        src_hi = -(-hi * run.rate // self.rate)
        b_lo, b_hi = src_lo * width, src_hi * width
        c_lo, c_hi = b_lo // 3 * 4, min(-(-b_hi // 3) * 4, run.chars)
        text = self._spools[channel].read(run.offset + c_lo, c_hi - c_lo)
        raw = binascii.a2b_base64(text)[b_lo - c_lo // 4 * 3 : b_hi - c_lo // 4 * 3]
        pcm = convert_rate(to_pcm16(raw, run.kind), run.rate, self.rate)
        skip = lo - src_lo * self.rate // run.rate
        return pcm[2 * skip : 2 * (skip + hi - lo)]
