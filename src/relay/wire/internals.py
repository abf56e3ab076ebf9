"""Every private name of Trio and Hypercorn the relay relies on, in one table.

The fast paths reach into both libraries where they publish nothing: the pump
(:mod:`relay.wire.pump`) waits in Trio's place, through the run's epoll I/O manager and run
queue, and the take-over (:mod:`relay.wire.takeover`) changes Hypercorn's connection and
WebSocket classes. A release that moves any of these names could break a fast path
silently. So each is listed here with how the relay uses it, and checked in two places:

* ``tests/relay/test_internals.py`` checks every entry against the installed versions, so a
  lock bump that moves one fails CI with a message naming it;
* at start-up the relay checks the entries of a feature before it uses them
  (:func:`problems`): a Hypercorn name missing, and the relay serves through plain ASGI
  messages instead of taking sockets over; a Trio name missing, and pairs relay through their
  own tasks instead of the pump. Either way a warning says which name, and ``/metrics`` shows
  which paths run (``relay_takeover_active``, ``relay_pump_active``).

What a name check cannot see (Trio no longer calling ``get_events`` through the attribute the
pump replaces, say), the pump's start-up proof does: it relays one message through the pump
before the worker reports ready (:func:`relay.wire.pump.prove`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cache
from types import FunctionType
from typing import Any

#: The fast paths, by what turns off when one of their names is missing.
PUMP = "pump"  # relay.wire.pump: pairs relay through their tasks instead
TAKEOVER = "takeover"  # relay.wire.takeover: plain ASGI messages instead
BALANCE = "balance"  # relay.wire.takeover.balance_accepts: Hypercorn's own listeners instead
SERVE = "serve"  # relay.server.serve: no fallback (an ImportError at start-up says which)


@dataclass(frozen=True)
class Internal:
    """One private name: ``where`` is ``module:Name.attr``.

    ``params``: a callable's parameter names, in order (None: not checked as a callable).
    ``instance``: an attribute of instances, looked for in the class's annotations or set in
    its ``__init__``. ``calls``: text the object's source must contain (how the library
    reaches something the relay replaced: through this name, or the swap is never seen).
    """

    feature: str
    where: str
    params: tuple[str, ...] | None = None
    instance: bool = False
    calls: str | None = None
    why: str = ""


INTERNALS: tuple[Internal, ...] = (
    # -- Trio: the pump ---------------------------------------------------------------------
    Internal(PUMP, "trio._core._run:GLOBAL_RUN_CONTEXT", why="the run's Runner"),
    Internal(
        PUMP, "trio._core._run:Runner.io_manager", instance=True,
        why="replaced while a pump runs, by the driver that waits in Trio's place",
    ),
    Internal(
        PUMP, "trio._core._run:run", calls="runner.io_manager.get_events(",
        why="Trio's loop must wait through the attribute the pump replaces",
    ),
    Internal(PUMP, "trio._core._run:Runner.runq", instance=True, why="tasks runnable now"),
    Internal(PUMP, "trio._core._run:Runner.clock", instance=True, why="Trio time of a read"),
    Internal(PUMP, "trio._core._run:Runner.is_guest", instance=True, why="no pump in guest mode"),
    Internal(
        PUMP, "trio._core._io_epoll:EpollIOManager.get_events", params=("self", "timeout"),
        why="Trio's own wait, called by the driver without waiting",
    ),
    Internal(
        PUMP, "trio._core._io_epoll:EpollIOManager.process_events", params=("self", "events"),
        why="given what the driver returns",
    ),
    Internal(
        PUMP, "trio._core._io_epoll:EpollIOManager._epoll", instance=True,
        why="Trio's epoll, watched by the driver's",
    ),
    Internal(
        PUMP, "trio._socket:_SocketType._sock", instance=True,
        why="the OS socket under a trio socket, read and written without Trio",
    ),
    # -- Hypercorn: the take-over -----------------------------------------------------------
    Internal(
        TAKEOVER, "hypercorn.protocol.ws_stream:Handshake.accept",
        params=("self", "subprotocol", "additional_headers"), why="declines permessage-deflate",
    ),
    Internal(
        TAKEOVER, "hypercorn.protocol.ws_stream:Handshake.extensions", instance=True,
        why="what the client offered",
    ),
    Internal(
        TAKEOVER, "hypercorn.protocol.ws_stream:WSStream.handle", params=("self", "event"),
        why="wrapped: pings stop when the stream closes",
    ),
    Internal(
        TAKEOVER, "hypercorn.protocol.ws_stream:WSStream.app_send", params=("self", "message"),
        why="replaced: the take-over message",
    ),
    Internal(
        TAKEOVER, "hypercorn.protocol.ws_stream:WSStream._send_pings", params=("self",),
        why="replaced: cancelled when the stream closes",
    ),
    Internal(
        TAKEOVER, "hypercorn.protocol.ws_stream:WSStream._send_wsproto_event",
        params=("self", "event"), why="sends a ping",
    ),
    Internal(
        TAKEOVER, "hypercorn.protocol.ws_stream:WSStream._accept", params=("self", "message"),
        why="writes the 101",
    ),
    Internal(TAKEOVER, "hypercorn.protocol.ws_stream:WSStream.closed", instance=True),
    Internal(TAKEOVER, "hypercorn.protocol.ws_stream:WSStream.state", instance=True),
    Internal(TAKEOVER, "hypercorn.protocol.ws_stream:WSStream.connection", instance=True),
    Internal(TAKEOVER, "hypercorn.protocol.ws_stream:WSStream.config", instance=True),
    Internal(TAKEOVER, "hypercorn.protocol.ws_stream:ASGIWebsocketState.HANDSHAKE"),
    Internal(
        TAKEOVER, "hypercorn.trio.tcp_server:TCPServer.run", params=("self",),
        why="the relay's subclass notes the connection for the app",
    ),
    Internal(
        TAKEOVER, "hypercorn.trio.tcp_server:TCPServer._read_data", params=("self",),
        why="replaced: stops reading when the socket is taken over",
    ),
    Internal(TAKEOVER, "hypercorn.trio.tcp_server:TCPServer.stream", instance=True),
    Internal(TAKEOVER, "hypercorn.trio.tcp_server:TCPServer.protocol", instance=True),
    Internal(TAKEOVER, "hypercorn.trio.tcp_server:TCPServer.config", instance=True),
    Internal(TAKEOVER, "hypercorn.trio.tcp_server:MAX_RECV"),
    Internal(TAKEOVER, "hypercorn.events:RawData"),
    Internal(TAKEOVER, "hypercorn.events:Closed"),
    Internal(
        TAKEOVER, "hypercorn.trio.run:worker_serve", calls="TCPServer,",
        why="builds connections from the module's TCPServer, which the relay replaces",
    ),
    # -- Hypercorn: balanced accepts --------------------------------------------------------
    Internal(
        BALANCE, "hypercorn.trio.run:worker_serve", calls="trio.SocketListener(",
        why="makes listeners through the module's trio, which the relay replaces",
    ),
    # -- Hypercorn: serving -----------------------------------------------------------------
    Internal(
        SERVE, "hypercorn.trio.run:worker_serve",
        params=("app", "config", "sockets", "shutdown_trigger", "task_status"),
        why="serves a worker on sockets its parent made",
    ),
    Internal(SERVE, "hypercorn.utils:wrap_app", params=("app", "wsgi_max_body_size", "mode")),
    Internal(SERVE, "hypercorn.utils:repr_socket_addr", params=("family", "address")),
    Internal(SERVE, "hypercorn.config:Sockets", why="the listening sockets a parent hands on"),
)


def check(internal: Internal) -> str | None:
    """What is wrong with ``internal`` in the installed library (None: nothing)."""
    module_name, _, path = internal.where.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError:
        return f"{internal.where}: no module {module_name}"
    *owners, name = path.split(".")
    for part in owners:
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            return f"{internal.where}: no {part} in {module_name}"
    if internal.instance:
        return None if _sets(found, name) else f"{internal.where}: no attribute {name}"
    found = getattr(found, name, _MISSING)
    if found is _MISSING:
        return f"{internal.where}: no {name}"
    if internal.params is not None:
        try:
            params = tuple(inspect.signature(found).parameters)
        except (TypeError, ValueError):
            return f"{internal.where}: not a callable with a signature"
        if params != internal.params:
            return f"{internal.where}: parameters {params}, expected {internal.params}"
    if internal.calls is not None:
        try:
            source = inspect.getsource(found)
        except (OSError, TypeError):
            return None  # no source installed: nothing to read, nothing found wrong
        if internal.calls not in source:
            return f"{internal.where}: no longer contains {internal.calls!r}"
    return None


@cache
def problems(feature: str) -> tuple[str, ...]:
    """What is wrong with the names ``feature`` relies on (empty: nothing), once per process."""
    return tuple(
        problem
        for internal in INTERNALS
        if internal.feature == feature and (problem := check(internal)) is not None
    )


_MISSING = object()


def _sets(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have attribute ``name``: declared (annotations, slots) or
    set in an ``__init__`` of the class or its bases."""
    for klass in getattr(cls, "__mro__", ()):
        if name in getattr(klass, "__annotations__", {}) or name in getattr(
            klass, "__slots__", ()
        ):
            return True
        init = klass.__dict__.get("__init__")
        if isinstance(init, FunctionType):  # (not object's, nor a C type's)
            try:
                source = inspect.getsource(init)
            except OSError:
                return True  # no source installed: nothing to read, nothing found wrong
            if f"self.{name} =" in source or f"self.{name}:" in source:
                return True
    return False
