"""Checks of client JSON that fail with the real server's error codes and wording.

A failed check raises ``ClientError``, which the session turns into one ``error`` event
(the socket stays open) and the REST endpoints into an HTTP 400.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """A client event was rejected; becomes one ``error`` event (the socket stays open)."""

    def __init__(self, code: str | None, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def type_name(value: Any) -> str:
    """The JSON type word the real server uses in 'Invalid type' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def invalid_type(param: str, expected: str, value: Any) -> ClientError:
    return ClientError(
        "invalid_type",
        f"Invalid type for '{param}': expected {expected}, but got {type_name(value)} instead.",
        param,
    )


def invalid_value(param: str, value: Any, supported: tuple[str, ...]) -> ClientError:
    listed = ", ".join(f"'{s}'" for s in supported)
    return ClientError(
        "invalid_value",
        f"Invalid value: '{value}'. Supported values are: {listed}.",
        param,
    )


def unknown_parameter(param: str) -> ClientError:
    return ClientError("unknown_parameter", f"Unknown parameter: '{param}'.", param)


def missing_parameter(param: str) -> ClientError:
    return ClientError(
        "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    )


def expect_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    return value


def check_keys(obj: dict[str, Any], allowed: frozenset[str] | set[str], param: str) -> None:
    """Reject unknown keys; ``param`` is the path of ``obj`` ("" for a top-level event)."""
    for key in obj:
        if key not in allowed:
            raise unknown_parameter(f"{param}.{key}" if param else key)


def expect_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    return value


def expect_bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


def expect_int(value: Any, param: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise invalid_type(param, "an integer", value)
    if lo is not None and value < lo:
        raise ClientError(
            "integer_below_min_value",
            f"Invalid '{param}': integer below minimum value. Expected a value >= {lo}, "
            f"but got {value} instead.",
            param,
        )
    if hi is not None and value > hi:
        raise ClientError(
            "integer_above_max_value",
            f"Invalid '{param}': integer above maximum value. Expected a value <= {hi}, "
            f"but got {value} instead.",
            param,
        )
    return int(value)


def expect_number(
    value: Any, param: str, lo: float | None = None, hi: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(param, "a number", value)
    if lo is not None and value < lo:
        raise ClientError(
            "decimal_below_min_value",
            f"Invalid '{param}': decimal below minimum value. Expected a value >= {lo}, "
            f"but got {value} instead.",
            param,
        )
    if hi is not None and value > hi:
        raise ClientError(
            "decimal_above_max_value",
            f"Invalid '{param}': decimal above maximum value. Expected a value <= {hi}, "
            f"but got {value} instead.",
            param,
        )
    return float(value)


def expect_choice(value: Any, param: str, choices: tuple[str, ...]) -> str:
    text = expect_str(value, param)
    if text not in choices:
        raise invalid_value(param, text, choices)
    return text
