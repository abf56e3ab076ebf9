"""Who is calling: the relay's users on the phone, known by their number.

A SIP call arrives as OpenAI's ``realtime.call.incoming`` webhook with the INVITE's headers;
the caller's number is the user part of the ``From`` URI. ``RELAY_SIP_CALLERS`` lists the
numbers let in, each as ``user:<hex HMAC-SHA256 of the number>`` under
``RELAY_SIP_CALLER_KEY``: the configuration never holds a number in clear, and a list that
leaks cannot be reversed by hashing every phone number (there are few enough of them to
try all of a plain hash). ``relay sip-caller USER NUMBER`` prints an entry.

Numbers are compared in one form: ``+`` and digits (``+1 (415) 555-0123`` is
``+14155550123``). The ``From`` header is whatever the caller's carrier sent: it proves as
much as caller ID does, so let numbers in for what a caller-ID check is worth.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping

from .auth import parse_user_digests

_URI_USER = re.compile(r"(?:sips?|tel):([^@;>]+)", re.IGNORECASE)


def normalise(number: str) -> str:
    """``+`` (if it had one) and the digits of a phone number."""
    digits = "".join(c for c in number if c.isdigit())
    return ("+" if number.strip().startswith("+") else "") + digits


def caller_number(sip_headers: Iterable[Mapping[str, object]]) -> str | None:
    """The caller's number from the INVITE's ``From`` header, or None (withheld, or a name)."""
    for header in sip_headers:
        if str(header.get("name", "")).lower() == "from":
            found = _URI_USER.search(str(header.get("value", "")))
            number = normalise(found.group(1)) if found else ""
            return number if number.lstrip("+") else None
    return None


def caller_digest(key: str, number: str) -> str:
    """The form in which RELAY_SIP_CALLERS holds a number."""
    return hmac.new(key.encode(), normalise(number).encode(), hashlib.sha256).hexdigest()


class Callers:
    """The numbers let in, and whose each is."""

    def __init__(self, key: str, entries: Iterable[str]) -> None:
        self._key = key
        self._users = parse_user_digests(entries, "USER:HMACHEX", "`relay sip-caller USER NUMBER`")

    def user_for(self, number: str | None) -> str | None:
        """The user calling from ``number``, or None if it is not listed."""
        if number is None or not self._key:
            return None
        return self._users.get(caller_digest(self._key, number))
