"""Call records: files per session, kept for a while, and a signed webhook at each end.

A session hands its finished record to :meth:`Recorder.submit`, which never waits: the
record goes into a bounded queue (a full queue drops it, logged) that the app's lifespan
drains in the background. There each record is written as files, mode 0600, under
``RELAY_RECORDS/YYYY-MM-DD/`` (``HHMMSS-SESSION.json``, ``.txt`` and, with audio,
``.wav``), and POSTed to the webhook; deliveries run in their own tasks, retried with
backoff, so a slow receiver delays neither sessions nor files. Records older than the
retention period are deleted hourly. On shutdown the queues get a bounded time to drain.

The webhook body is JSON (``{"type": "relay.call.ended", "summary": …, "transcript":
[…]}``) with the header ``Relay-Signature: t=UNIX_SECONDS,v1=HEX``, where HEX is
HMAC-SHA256 over ``"{t}." + body`` with ``RELAY_RECORDS_WEBHOOK_SECRET``; a receiver
recomputes it, compares in constant time and rejects an old ``t`` (replays).
``Relay-Delivery`` (the session id) is the same on every retry of one record.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import queue
import threading
import time
import wave
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
import trio

from ..core.calllog import Line
from ..core.stereo import Timeline

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("relay")

#: Finished calls waiting to be written (beyond: dropped, logged).
QUEUE_RECORDS: Final = 64
#: Deliveries waiting for the webhook (beyond: dropped, logged), and how many run at once.
QUEUE_DELIVERIES: Final = 256
SENDERS: Final = 4
#: Attempts per delivery, and the pause before each retry (doubling): 1, 2, 4, 8, 16 s.
ATTEMPTS: Final = 6
FIRST_RETRY_SECONDS: Final = 1.0
#: One POST may take this long.
POST_TIMEOUT: Final = 10.0
#: On shutdown, how long what is queued may still take to be written and delivered.
DRAIN_SECONDS: Final = 10.0
#: How often old records are looked for.
SWEEP_SECONDS: Final = 3600.0
#: Audio is written to the spool file in pieces of this size.
SPOOL_CHUNK: Final = 1 << 20
#: Audio waiting for the disk beyond this is dropped (the record says so), not held in memory.
SPOOL_BACKLOG: Final = 64 << 20
SIGNATURE_HEADER: Final = "Relay-Signature"

FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Relay-Signature`` header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, now: float, tolerance: float = 300) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds of ``now``
    (what a receiver does; the tests use it too)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return abs(now - timestamp) <= tolerance and hmac.compare_digest(expected, fields.get("v1", ""))


class SpoolWriter:
    """One thread that writes every spool's audio to disk, in order, so that a disk that is
    slow to take a write (a busy VM's dirty pages) never stalls the event loop."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Bytes handed over and not yet written (read and changed under the GIL).
        self.backlog = 0

    def put(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="relay spool writer", daemon=True
            )
            self._thread.start()
        self._queue.put(job)

    def wait(self) -> None:
        """Block until every job put so far is done (call it from a thread, not the loop)."""
        done = threading.Event()
        self.put(done.set)
        done.wait()

    def stop(self) -> None:
        """Finish the jobs put so far, then end the thread (blocking)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except OSError as exc:  # a full disk: that record's audio is lost, nothing else
                log.error("cannot write call audio to the records directory: %s", exc)


class FileSpool:
    """A channel's audio in a file of the records directory (mode 0600), handed to the
    :class:`SpoolWriter` in 1 MiB pieces: a session never waits for the disk."""

    def __init__(self, path: Path, writer: SpoolWriter) -> None:
        self.path = path
        self._writer = writer
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._written = 0
        self._pending = bytearray()
        #: Bytes of audio dropped because the disk fell behind.
        self.lost = 0

    def append(self, data: bytes) -> int:
        offset = self._written + len(self._pending)
        self._pending += data
        if len(self._pending) >= SPOOL_CHUNK:
            self._hand_over()
        return offset

    def _hand_over(self) -> None:
        if not self._pending:
            return
        writer, fd, data, offset = self._writer, self._fd, bytes(self._pending), self._written
        self._written += len(data)
        self._pending.clear()
        if writer.backlog + len(data) > SPOOL_BACKLOG:
            self.lost += len(data)  # the disk is too slow: a gap (silence) in this record
            return
        writer.backlog += len(data)

        def write() -> None:
            try:
                _pwrite_all(fd, data, offset)
            finally:
                writer.backlog -= len(data)

        writer.put(write)

    def read(self, offset: int, size: int) -> bytes:
        """Blocking: call it from a thread once the call is over."""
        if self._pending:
            self._hand_over()
            self._writer.wait()
        return os.pread(self._fd, size, offset)

    def discard(self, *, wait: bool = False) -> None:
        """Close and delete the spool, after the writes handed over (idempotent); ``wait``
        (from a thread only) until it is gone."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._pending.clear()
            path = self.path

            def remove() -> None:
                os.close(fd)
                path.unlink(missing_ok=True)

            self._writer.put(remove)
        if wait:
            self._writer.wait()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


@dataclass
class Record:
    """One finished call, as the session hands it over (no I/O done yet)."""

    session_id: str
    started_wall: float
    summary: dict[str, Any]
    transcript: list[Line]
    audio: Timeline | None = None
    spools: tuple[FileSpool, FileSpool] | None = None
    files: dict[str, str] = field(default_factory=dict)

    def transcript_json(self) -> list[dict[str, Any]]:
        return [
            {
                "at": round(line.at, 3),
                "speaker": line.speaker,
                "text": line.text,
                **({"heard_ms": line.heard_ms} if line.heard_ms is not None else {}),
            }
            for line in self.transcript
        ]

    def discard_audio(self, *, wait: bool = False) -> None:
        for spool in self.spools or ():
            spool.discard(wait=wait)


def transcript_text(record: Record) -> str:
    """The transcript as people read it: one line per utterance, times from the call's start."""
    summary = record.summary
    lines = [
        f"Call {record.session_id}, user {summary['user']}, model {summary['model']},"
        f" {summary['started']} to {summary['ended']}, ended: {summary['cause']}",
        "",
    ]
    for line in record.transcript:
        minutes, seconds = divmod(max(0.0, line.at), 60)
        text = f"[{int(minutes):02d}:{seconds:04.1f}] {line.speaker}: {line.text}"
        if line.heard_ms is not None:
            text += f"  [interrupted: the caller heard {line.heard_ms / 1000:.1f} s of this]"
        lines.append(text)
    if not record.transcript:
        lines.append("(nothing was transcribed: the caller's side needs input transcription")
        lines.append(" in the session, audio.input.transcription)")
    return "\n".join(lines) + "\n"


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_record(directory: Path, record: Record) -> dict[str, str]:
    """Write the record's files (blocking: run in a thread); their paths by kind."""
    day = time.strftime("%Y-%m-%d", time.gmtime(record.started_wall))
    folder = directory / day
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    stem = time.strftime("%H%M%S", time.gmtime(record.started_wall)) + f"-{record.session_id}"
    files = {"summary": folder / f"{stem}.json", "transcript": folder / f"{stem}.txt"}
    try:
        if record.audio is not None:
            lost = sum(spool.lost for spool in record.spools or ())
            if lost:
                record.summary["audio_lost_bytes"] = lost
            files["audio"] = folder / f"{stem}.wav"
            fd = os.open(files["audio"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with os.fdopen(fd, "wb") as raw, wave.open(raw, "wb") as out:
                out.setnchannels(2)
                out.setsampwidth(2)
                out.setframerate(record.audio.rate)
                for chunk in record.audio.render():
                    out.writeframes(chunk)
    finally:
        record.discard_audio(wait=True)
    names = {kind: str(path.relative_to(directory)) for kind, path in files.items()}
    record.summary["files"] = names
    _write(files["transcript"], transcript_text(record).encode())
    body = {**record.summary, "transcript": record.transcript_json()}
    _write(files["summary"], orjson.dumps(body, option=orjson.OPT_INDENT_2))
    return names


def sweep(directory: Path, keep_seconds: float, now: float) -> int:
    """Delete record files (and leftover audio spools) older than ``keep_seconds``; empty day
    folders go too. Blocking: run in a thread. Returns how many files were deleted."""
    deleted = 0
    if not directory.is_dir():
        return 0
    for folder in directory.iterdir():
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            try:
                if now - path.stat().st_mtime > keep_seconds:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:
                pass
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass
    return deleted


class Recorder:
    """Writes and delivers call records in the background (see the module docstring)."""

    def __init__(
        self,
        *,
        directory: str = "",
        audio: bool = False,
        retention_days: float = 0.0,
        webhook: str = "",
        secret: str = "",
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.directory = Path(directory) if directory else None
        self.audio = audio and self.directory is not None
        self._retention = retention_days * 86400
        self._webhook = webhook
        self._secret = secret
        self._clock = clock
        self._transport = transport
        self._records, self._pending_records = trio.open_memory_channel[Record](QUEUE_RECORDS)
        self._deliveries, self._pending_deliveries = trio.open_memory_channel[Record](
            QUEUE_DELIVERIES
        )
        #: Told ``(what, record)`` as each record is ``written``, ``delivered``, ``failed`` or
        #: ``dropped`` (for tests and embedders; it must not block).
        self.observe: Callable[[str, Record], None] | None = None
        self._spool_writer = SpoolWriter()

    def spools(self, session_id: str) -> tuple[FileSpool, FileSpool] | None:
        """Fresh spool files for a recorded call's audio, or None when audio is off."""
        if not self.audio or self.directory is None:
            return None
        spool_dir = self.directory / "spool"
        spool_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        return (
            FileSpool(spool_dir / f"{session_id}.caller.pcm", self._spool_writer),
            FileSpool(spool_dir / f"{session_id}.assistant.pcm", self._spool_writer),
        )

    def submit(self, record: Record) -> None:
        """Queue a finished call; never waits (a full queue drops the record, logged)."""
        try:
            self._records.send_nowait(record)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._tell("dropped", record)
            record.discard_audio()
            log.warning(
                "call record of session %s dropped: %d records are already waiting to be written",
                record.session_id,
                QUEUE_RECORDS,
                extra={"fields": {"session": record.session_id}},
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write, deliver and sweep until the queues are closed and empty (see :meth:`close`)."""
        async with trio.open_nursery() as nursery:
            if self.directory is not None and self._retention:
                nursery.start_soon(self._sweep_forever)
            async with self._pending_deliveries:
                async with trio.open_nursery() as senders:
                    for _ in range(SENDERS if self._webhook else 0):
                        senders.start_soon(self._send_forever, self._pending_deliveries.clone())
                    task_status.started()
                    async with self._deliveries:
                        try:
                            await self._write_forever()
                        finally:
                            with trio.CancelScope(shield=True):  # spools of dropped records
                                await trio.to_thread.run_sync(self._spool_writer.stop)
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Take no more records; :meth:`run` returns once what is queued is done."""
        self._records.close()

    async def _write_forever(self) -> None:
        async with self._pending_records:
            async for record in self._pending_records:
                if self.directory is not None:
                    try:
                        await trio.to_thread.run_sync(write_record, self.directory, record)
                        self._tell("written", record)
                    except OSError as exc:
                        record.discard_audio()
                        log.error(
                            "cannot write the call record of session %s to %s: %s",
                            record.session_id,
                            self.directory,
                            exc,
                        )
                if self._webhook:
                    try:
                        self._deliveries.send_nowait(record)
                    except trio.WouldBlock:
                        self._tell("dropped", record)
                        log.warning(
                            "webhook delivery of session %s dropped: %d deliveries are waiting",
                            record.session_id,
                            QUEUE_DELIVERIES,
                        )

    async def _send_forever(self, pending: trio.MemoryReceiveChannel[Record]) -> None:
        import httpx  # here, not at the top: only a relay with a webhook needs it

        async with (
            pending,
            httpx.AsyncClient(timeout=POST_TIMEOUT, transport=self._transport) as client,
        ):
            async for record in pending:
                await self._deliver(client, record)

    async def _deliver(self, client: httpx.AsyncClient, record: Record) -> None:
        import httpx

        body = orjson.dumps(
            {
                "type": "relay.call.ended",
                "summary": record.summary,
                "transcript": record.transcript_json(),
            }
        )
        pause = FIRST_RETRY_SECONDS
        problem = ""
        for attempt in range(1, ATTEMPTS + 1):
            headers = {
                "content-type": "application/json",
                SIGNATURE_HEADER: signature(self._secret, int(self._clock()), body),
                "Relay-Delivery": record.session_id,
            }
            try:
                answer = await client.post(self._webhook, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            else:
                if answer.status_code < 300:
                    self._tell("delivered", record)
                    return
                problem = f"HTTP {answer.status_code}"
                if answer.status_code < 500 and answer.status_code not in (408, 429):
                    break  # the receiver refuses this record: another try would be refused too
            if attempt < ATTEMPTS:
                await trio.sleep(pause)
                pause *= 2
        self._tell("failed", record)
        log.error(
            "webhook did not take the call record of session %s (%s); giving up after %d attempts",
            record.session_id,
            problem,
            attempt,
            extra={"fields": {"session": record.session_id}},
        )

    def _tell(self, what: str, record: Record) -> None:
        if self.observe is not None:
            self.observe(what, record)

    async def _sweep_forever(self) -> None:
        assert self.directory is not None
        while True:
            try:
                await trio.to_thread.run_sync(sweep, self.directory, self._retention, self._clock())
            except OSError as exc:
                log.warning("cannot delete old call records in %s: %s", self.directory, exc)
            await trio.sleep(SWEEP_SECONDS)


def summary_tokens(turns: Iterable[Any]) -> dict[str, int]:
    """The tokens of a call's turns, added up (for the summary)."""
    keys = ("input_text", "input_audio", "input_cached", "output_text", "output_audio")
    totals = dict.fromkeys(keys, 0)
    for turn in turns:
        for key in keys:
            totals[key] += getattr(turn.tokens, key)
    totals["total"] = sum(
        totals[k] for k in ("input_text", "input_audio", "output_text", "output_audio")
    )
    return totals
