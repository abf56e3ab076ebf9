"""Real-looking ids (``event_``, ``sess_``, ``conv_``, ``resp_``, ``item_`` + 21 alphanumerics)."""

from __future__ import annotations

import random
import string
from typing import Final

ALPHANUMERIC: Final = string.ascii_letters + string.digits


class IdFactory:
    """Real-looking ids: ``prefix_`` + 21 alphanumerics drawn from a seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def new(self, prefix: str, length: int = 21) -> str:
        return prefix + "_" + "".join(self._rng.choices(ALPHANUMERIC, k=length))
