"""TLS to the upstream, done by the relay over the plain socket so that the socket stays its own.

Against the real API the upstream leg is ``wss://``. Through :class:`trio.SSLStream` every
message of it would go Trio's stream way (a wake-up of the pair's task, Trio's TLS retry loop,
the socket stream's send and receive), and :mod:`relay.wire.pump` could not relay it: that cost
about three times the relay's CPU per message of a plain leg. :class:`TLSSocketStream` keeps an
:class:`ssl.SSLObject` between two memory buffers over a :class:`trio.SocketStream`: it is a
Trio stream for the HTTP upgrade, and then :mod:`relay.wire.websocket` reads and writes the socket
itself, passing what it reads through :meth:`~TLSSocketStream.decrypt` and what it writes
through :meth:`~TLSSocketStream.encrypt`, and the pump relays it like a plain leg.

Records are written in the order they are encrypted: the connection's single writer
encrypts only when it holds the write turn, and every ciphertext it takes is written whole
before the next (a write left part-way is finished first; one cut off, even before its first
byte, breaks the connection, as records after it would not decrypt). Bytes OpenSSL produces while
reading (a TLS 1.3 key update's answer) wait in the outgoing buffer and go out, in order,
before the next record written.
"""

from __future__ import annotations

import ssl

import trio

#: Bytes asked of the socket per read during the handshake.
RECEIVE_BYTES = 65536
#: Plaintext taken from OpenSSL per call (it hands out at most one record's worth).
READ_BYTES = 65536


class TLSSocketStream(trio.abc.Stream):
    """A client TLS connection over ``transport`` (call :meth:`do_handshake` first)."""

    def __init__(
        self, transport: trio.SocketStream, context: ssl.SSLContext, server_hostname: str
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )
        self._plain = b""  # read by receive_some but not yet returned

    async def do_handshake(self) -> None:
        """Run the TLS handshake (certificate and host name checked by the context).

        Raises :class:`ssl.SSLError` (an OSError) if the server is not who it should be, and
        trio.BrokenResourceError if the connection drops.
        """
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            await self._flush()
            data = await self.transport.receive_some(RECEIVE_BYTES)
            if not data:
                raise trio.BrokenResourceError("the server closed the connection in the handshake")
            self._incoming.write(data)
        await self._flush()

    async def _flush(self) -> None:
        if out := self._outgoing.read():
            await self.transport.send_all(out)

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` as TLS records, after anything OpenSSL has left to send: write it whole,
        and before anything encrypted after it."""
        self._tls.write(data)
        return self._outgoing.read()

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext of ``data`` read from the socket (and of any records before it that
        were not complete); b"" when it held no whole record of application data. Raises
        :class:`ssl.SSLError` for a record that is not genuine: the connection is lost."""
        if data:
            self._incoming.write(data)
        chunks = []
        while True:
            try:
                chunk = self._tls.read(READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break  # the server's close_notify: its end shows as the socket's
            if not chunk:
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def take_buffered(self) -> bytes:
        """Plaintext decrypted or decryptable now that no socket read will bring again: for
        the reader that takes the socket over after the HTTP upgrade."""
        plain, self._plain = self._plain, b""
        return plain + self.decrypt(b"")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = max_bytes or RECEIVE_BYTES
        if not self._plain:
            self._plain = self.decrypt(b"")  # records already buffered come first
        while not self._plain:
            try:
                data = await self.transport.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError:
                return b""
            if not data:
                return b""
            self._plain = self.decrypt(data)
        plain, self._plain = self._plain[:limit], self._plain[limit:]
        return plain

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(self.encrypt(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport.aclose()
