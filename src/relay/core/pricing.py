"""What a response costs: the tokens of a ``response.done`` and a price table per model.

Money is kept as integers of nanodollars (10⁻⁹ USD): a price of $X per million tokens is
X × 1,000 nanodollars per token, so every published price (they go down to $0.001 per
million) gives an exact integer cost, and sums of costs stay exact in SQLite and Redis
counters. Nothing here does I/O.

The built-in prices are the ones OpenAI publishes on its model pages
(developers.openai.com/api/docs/models/…), per million tokens, as read on
:data:`PRICES_TAKEN`. Two deprecated realtime models are missing on purpose:
``gpt-realtime`` and ``gpt-realtime-mini`` had no model page with a full price list
(text, audio and cached, in and out) where the prices were taken, so no price is
invented for them; give them in the config file's ``[prices]`` table. Snapshots
(``gpt-realtime-2025-08-28``) are priced only if named there too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import Any, Final

#: When the built-in prices were read from OpenAI's model pages.
PRICES_TAKEN: Final = "2026-12-07"
#: Nanodollars in a dollar.
NANO: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Tokens:
    """The tokens of one response, split the way they are priced (image tokens are not counted).

    ``input_text`` and ``input_audio`` include their cached parts.
    """

    input_text: int = 0
    input_audio: int = 0
    #: ``cached_tokens`` as the usage block gives it, with or without a text/audio split.
    input_cached: int = 0
    cached_text: int = 0
    cached_audio: int = 0
    output_text: int = 0
    output_audio: int = 0


def _count(block: object, key: str) -> int | None:
    """A non-negative token count from a usage block, or None if absent or malformed."""
    value = block.get(key) if isinstance(block, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return int(value)


def tokens_of(event: Mapping[str, Any]) -> Tokens:
    """The tokens of a Realtime ``response.done`` event (zeros when usage is null).

    Reads the GA ``response.usage`` block. Anything missing counts as zero, except that a
    side with no text/audio breakdown at all is charged its ``input_tokens`` /
    ``output_tokens`` as text, so a budget cannot be escaped by an upstream that leaves the
    details out; and cached tokens without ``cached_tokens_details`` are not taken as
    cached (no discount is given that the usage block does not show).
    """
    response = event.get("response") if isinstance(event, dict) else None
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return Tokens()
    sides: dict[str, tuple[int, int]] = {}
    for side in ("input", "output"):
        details = usage.get(f"{side}_token_details")
        text, audio = _count(details, "text_tokens"), _count(details, "audio_tokens")
        if text is None and audio is None:
            text = _count(usage, f"{side}_tokens")
        sides[side] = (text or 0, audio or 0)
    details = usage.get("input_token_details")
    cached = details.get("cached_tokens_details") if isinstance(details, dict) else None
    (text, audio), (out_text, out_audio) = sides["input"], sides["output"]
    return Tokens(
        input_text=text,
        input_audio=audio,
        input_cached=_count(details, "cached_tokens") or 0,
        cached_text=min(_count(cached, "text_tokens") or 0, text),
        cached_audio=min(_count(cached, "audio_tokens") or 0, audio),
        output_text=out_text,
        output_audio=out_audio,
    )


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, in nanodollars per token (= dollars per million tokens × 1,000)."""

    input_text: int
    input_audio: int
    cached_text: int
    cached_audio: int
    output_text: int
    output_audio: int

    def cost(self, tokens: Tokens) -> int:
        """What ``tokens`` cost, in nanodollars (exact)."""
        return (
            (tokens.input_text - tokens.cached_text) * self.input_text
            + tokens.cached_text * self.cached_text
            + (tokens.input_audio - tokens.cached_audio) * self.input_audio
            + tokens.cached_audio * self.cached_audio
            + tokens.output_text * self.output_text
            + tokens.output_audio * self.output_audio
        )

    def per_million(self) -> dict[str, float]:
        """The prices as published: dollars per million tokens."""
        return {f.name: getattr(self, f.name) / 1000 for f in fields(self)}


PRICE_KEYS: Final = tuple(f.name for f in fields(Price))


def _per_million(**dollars: float) -> Price:
    return Price(**{key: int(Decimal(str(value)) * 1000) for key, value in dollars.items()})


#: Published prices, dollars per million tokens, as read on PRICES_TAKEN (see the module doc).
DEFAULT_PRICES: Final[Mapping[str, Price]] = {
    # developers.openai.com/api/docs/models/gpt-realtime-2.1
    "gpt-realtime-2.1": _per_million(
        input_text=4, input_audio=32, cached_text=0.4, cached_audio=0.4,
        output_text=24, output_audio=64,
    ),
    # developers.openai.com/api/docs/models/gpt-realtime-2.1-mini
    "gpt-realtime-2.1-mini": _per_million(
        input_text=0.6, input_audio=10, cached_text=0.06, cached_audio=0.3,
        output_text=2.4, output_audio=20,
    ),
    # developers.openai.com/api/docs/models/gpt-realtime-2
    "gpt-realtime-2": _per_million(
        input_text=4, input_audio=32, cached_text=0.4, cached_audio=0.4,
        output_text=24, output_audio=64,
    ),
    # developers.openai.com/api/docs/models/gpt-realtime-1.5
    "gpt-realtime-1.5": _per_million(
        input_text=4, input_audio=32, cached_text=0.4, cached_audio=0.4,
        output_text=16, output_audio=64,
    ),
}  # fmt: skip


class PriceTable(Mapping[str, Price]):
    """Prices by model name: the built-in ones, overridden or added to by ``[prices]``."""

    def __init__(self, prices: Mapping[str, Price] = DEFAULT_PRICES) -> None:
        self._prices = dict(prices)

    def __getitem__(self, model: str) -> Price:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({sorted(self._prices)})"

    def cost(self, model: str, tokens: Tokens) -> int | None:
        """What ``tokens`` cost on ``model`` in nanodollars, or None if it has no price."""
        price = self._prices.get(model)
        return None if price is None else price.cost(tokens)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> PriceTable:
        """The built-in prices with a config file's ``[prices]`` table applied.

        Each key is a model with a table of dollars per million tokens (``input_text``,
        ``input_audio``, ``cached_text``, ``cached_audio``, ``output_text``,
        ``output_audio``): for a model with a built-in price the keys given replace
        those prices, a new model needs all six. Raises ValueError saying what is wrong.
        """
        prices = dict(DEFAULT_PRICES)
        for model, entry in table.items():
            if not isinstance(entry, Mapping):
                raise ValueError(
                    f"[prices.{model}] must be a table of dollars per million tokens"
                    f" ({', '.join(PRICE_KEYS)})"
                )
            unknown = sorted(set(entry) - set(PRICE_KEYS))
            if unknown:
                raise ValueError(
                    f"[prices.{model}] has unknown keys {unknown}; known: {', '.join(PRICE_KEYS)}"
                )
            base = prices.get(model)
            missing = [key for key in PRICE_KEYS if key not in entry]
            if base is None and missing:
                raise ValueError(
                    f"[prices.{model}] is a model without a built-in price, so it needs all of"
                    f" {', '.join(PRICE_KEYS)}; missing: {', '.join(missing)}"
                )
            values = {key: getattr(base, key) for key in missing} if base else {}
            for key in PRICE_KEYS:
                if key in entry:
                    values[key] = _nanodollars_per_token(model, key, entry[key])
            prices[model] = Price(**values)
        return cls(prices)


def _nanodollars_per_token(model: str, key: str, value: object) -> int:
    """Dollars per million tokens → nanodollars per token, refusing what is not exact."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"[prices.{model}] {key} must be a number of dollars per million tokens")
    try:
        exact = Decimal(str(value)) * 1000
    except InvalidOperation:
        raise ValueError(f"[prices.{model}] {key} = {value!r} is not a number") from None
    if exact < 0 or exact != exact.to_integral_value():
        raise ValueError(
            f"[prices.{model}] {key} = {value!r}: a price must be >= 0 with at most three"
            " decimals of a dollar per million tokens"
        )
    return int(exact)


def dollars(nanodollars: int) -> float:
    """Nanodollars as dollars (for display and metrics; sums are kept in nanodollars)."""
    return nanodollars / NANO


def nanodollars(amount: float) -> int:
    """Dollars (a setting or a token claim) as nanodollars, rounded to the nearest one."""
    return int((Decimal(str(amount)) * NANO).to_integral_value())
