"""The models the fake knows: Realtime models (``?model=``) and input transcription models.

Each table maps a model name to its announced shutdown date, or None for a current model.
Deprecated models still work until that date, as on the real API; a name that is in
neither table is refused (``invalid_model`` at the handshake, ``invalid_value`` in a
session's transcription config). The tables follow the installed ``openai`` SDK: its model
literals (``RealtimeSessionCreateRequest.model``, ``AudioTranscription.model``) and the
"Announced shutdown date" notes in their docstrings; ``tests/mock/test_mock_models.py``
fails with the names when the SDK and these tables disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from types import MappingProxyType
from typing import Final

REALTIME_SHUTDOWN: Final = date(2027, 1, 20)
TRANSCRIPTION_SHUTDOWN: Final = date(2027, 2, 26)

REALTIME_MODELS: Final[Mapping[str, date | None]] = MappingProxyType(
    {
        "gpt-realtime-2": None,
        "gpt-realtime-2.1": None,
        "gpt-realtime-2.1-mini": None,
        "gpt-realtime-1.5": None,
        "gpt-audio-1.5": None,
        "gpt-realtime-mini-2025-10-06": None,
        "gpt-audio-mini-2025-10-06": None,
        # the preview family: the SDK lists them without a shutdown date
        "gpt-4o-realtime-preview": None,
        "gpt-4o-realtime-preview-2024-10-01": None,
        "gpt-4o-realtime-preview-2024-12-17": None,
        "gpt-4o-realtime-preview-2025-06-03": None,
        "gpt-4o-mini-realtime-preview": None,
        "gpt-4o-mini-realtime-preview-2024-12-17": None,
        # deprecated
        "gpt-realtime": REALTIME_SHUTDOWN,
        "gpt-realtime-2025-08-28": REALTIME_SHUTDOWN,
        "gpt-realtime-mini": REALTIME_SHUTDOWN,
        "gpt-realtime-mini-2025-12-15": REALTIME_SHUTDOWN,
        "gpt-audio-mini": REALTIME_SHUTDOWN,
        "gpt-audio-mini-2025-12-15": REALTIME_SHUTDOWN,
    }
)

TRANSCRIPTION_MODELS: Final[Mapping[str, date | None]] = MappingProxyType(
    {
        "gpt-transcribe": None,
        "gpt-live-transcribe": None,
        "gpt-realtime-whisper": None,
        # deprecated
        "whisper-1": TRANSCRIPTION_SHUTDOWN,
        "gpt-4o-transcribe": TRANSCRIPTION_SHUTDOWN,
        "gpt-4o-transcribe-diarize": TRANSCRIPTION_SHUTDOWN,
        "gpt-4o-mini-transcribe": TRANSCRIPTION_SHUTDOWN,
        "gpt-4o-mini-transcribe-2025-12-15": TRANSCRIPTION_SHUTDOWN,
    }
)

DIARIZING_TRANSCRIPTION_MODELS: Final = frozenset({"gpt-4o-transcribe-diarize"})
"""Transcription models that label speakers: they send ``…transcription.segment`` events."""


def is_realtime_model(name: str) -> bool:
    """True for a Realtime model the real API accepts today (current or deprecated)."""
    return name in REALTIME_MODELS


def shutdown_date(name: str) -> date | None:
    """The announced shutdown date of a deprecated model; None if current or unknown."""
    return REALTIME_MODELS.get(name) or TRANSCRIPTION_MODELS.get(name)
