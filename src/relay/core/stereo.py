"""Where each piece of a call's audio falls in time, for a stereo recording.

Both sides follow one rule: a chunk starts when it arrived, or when the side's previous
chunk ends if that is later. A caller's microphone streams in real time, so its chunks
land where they were spoken; the assistant's audio arrives faster than it is played, and
a client plays it back to back from its first chunk, so laying it end to end from its
arrival is what the caller heard. A barge-in is the client's
``conversation.item.truncate``: the caller heard ``audio_end_ms`` of that item, so its
audio is cut there and the assistant's side goes on from the cut.

The samples themselves live in a :class:`Spool` (memory in tests, a file in the relay);
the timeline keeps only where each run of samples lies. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from .audio import interleave

#: Samples rendered at a time (10 s at 24 kHz: a few hundred KiB in memory).
WINDOW_SAMPLES: Final = 240_000
CALLER, ASSISTANT = 0, 1


class Spool(Protocol):
    """Where a channel's PCM16 bytes are kept, in arrival order."""

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


@dataclass(slots=True)
class Run:
    """``samples`` samples at ``start`` on the timeline, from ``offset`` of the spool."""

    start: int
    offset: int
    samples: int
    item: str | None = None

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

    def add(self, channel: int, at: float, pcm16: bytes, item: str | None = None) -> None:
        """PCM16 audio of ``channel`` that arrived at ``at`` (the assistant's names its item)."""
        samples = len(pcm16) // 2
        if not samples or (item is not None and item in self._cut):
            return
        start = max(round((at - self.t0) * self.rate), self._cursor[channel])
        offset = self._spools[channel].append(pcm16[: 2 * samples])
        runs = self.runs[channel]
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.end == start
            and last.item == item
            and last.offset + 2 * last.samples == offset
        ):
            last.samples += samples  # contiguous in time and in the spool: one run
        else:
            runs.append(Run(start, offset, samples, item))
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
        spool = self._spools[channel]
        for run in self.runs[channel]:  # few runs: one per stretch of speech
            lo, hi = max(run.start, begin), min(run.end, end)
            if lo < hi:
                data = spool.read(run.offset + 2 * (lo - run.start), 2 * (hi - lo))
                out[2 * (lo - begin) : 2 * (lo - begin) + len(data)] = data
        return out
