"""The Realtime models the relay knows: today's, and the deprecated ones with their shutdown.

The installed ``openai`` SDK is the source (``RealtimeSessionCreateRequest.model`` and the
"Announced shutdown date" in its docstring); ``tests/relay/test_models.py`` fails, naming
them, when the two disagree. The relay's default model and allow-list are today's models;
``RELAY_MODELS`` takes fnmatch patterns (``gpt-realtime-2*``), and a configuration that names
a deprecated model starts with a warning that says when it goes away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Final

#: Today's realtime models, the default first (RELAY_MODEL) and all of them the default
#: allow-list (RELAY_MODELS).
CURRENT: Final = ("gpt-realtime-2.1", "gpt-realtime-2.1-mini", "gpt-realtime-2", "gpt-realtime-1.5")
DEFAULT: Final = CURRENT[0]

_SHUTDOWN = date(2027, 1, 20)
#: Deprecated realtime models and the day the API stops serving them.
DEPRECATED: Final[Mapping[str, date]] = MappingProxyType(
    {
        "gpt-realtime": _SHUTDOWN,
        "gpt-realtime-2025-08-28": _SHUTDOWN,
        "gpt-realtime-mini": _SHUTDOWN,
        "gpt-realtime-mini-2025-12-15": _SHUTDOWN,
        "gpt-audio-mini": _SHUTDOWN,
        "gpt-audio-mini-2025-12-15": _SHUTDOWN,
    }
)


def is_pattern(name: str) -> bool:
    """Whether a RELAY_MODELS entry is an fnmatch pattern rather than a model's name."""
    return any(char in name for char in "*?[")


def allows(patterns: Iterable[str], model: str) -> bool:
    """Whether ``model`` matches one of ``patterns`` (fnmatch, case-sensitive)."""
    return any(fnmatchcase(model, pattern) for pattern in patterns)


def deprecation_warning(model: str, patterns: Iterable[str]) -> str | None:
    """One line naming the deprecated models the relay is configured with (as RELAY_MODEL,
    or admitted by a RELAY_MODELS pattern) and when each shuts down; None if there are none."""
    named = {model} if model in DEPRECATED else set()
    named.update(name for name in DEPRECATED if allows(patterns, name))
    if not named:
        return None
    listed = ", ".join(f"{name} (shuts down {DEPRECATED[name]})" for name in sorted(named))
    return (
        f"RELAY_MODEL / RELAY_MODELS admit deprecated models: {listed}. Sessions on them will"
        f" fail after that date; move to one of {', '.join(CURRENT)}."
    )
