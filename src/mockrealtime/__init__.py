"""mockrealtime: an offline fake of the OpenAI Realtime API (WebSocket + REST).

Start one in a test with::

    server = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({"sk-test"})))

then connect to ``server.url`` (``ws://127.0.0.1:PORT/v1/realtime``) with ``?model=gpt-realtime``.
"""

from __future__ import annotations

from .faults import FAULTS_HEADER as FAULTS_HEADER
from .faults import Faults as Faults
from .faults import parse_faults as parse_faults
from .handshake import negotiate as negotiate
from .server import ConnectionRecord as ConnectionRecord
from .server import MockConfig as MockConfig
from .server import MockServer as MockServer
from .server import serve_mock_realtime as serve_mock_realtime
from .session import Session as Session
