"""Who is connecting: client identity from static API keys or JWTs, and the Origin check.

Credentials come from ``Authorization: Bearer <token>`` (servers and the official
SDKs) or from a WebSocket subprotocol offered next to ``realtime`` (browsers cannot set
headers): ``relay-token.<token>``, or ``openai-insecure-api-key.<token>``, which is how the JS
Agents SDK offers its key from a browser (with a relay token there, never an OpenAI key). A token with two dots is a JWT when a
JWT key is configured; anything else is a static API key, compared by its SHA-256
hash, so the configuration never holds a key in clear.

Nothing here does I/O: :meth:`Authenticator.authenticate` takes the handshake's
headers and offered subprotocols and returns an :class:`Identity` or raises
:class:`Refusal` with the HTTP status the handshake is refused with.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TOKEN_SUBPROTOCOL = "relay-token."
#: Subprotocols a browser may carry its relay token in (never echoed, never forwarded).
TOKEN_SUBPROTOCOLS = (TOKEN_SUBPROTOCOL, "openai-insecure-api-key.")
#: Clock skew tolerated on a JWT's exp/nbf.
JWT_LEEWAY_SECONDS = 30


@dataclass(frozen=True, slots=True)  # (one per live session)
class Identity:
    """An authenticated client. Optional JWT claims can only tighten the relay's policy."""

    user: str
    method: str  # "api_key", "jwt", "anonymous", or "sip" (a caller known by number)
    model: str | None = None
    max_session_seconds: float | None = None
    budget: int | None = None
    #: A daily spending cap in dollars (the ``budget_usd`` claim).
    budget_usd: float | None = None


class Refusal(Exception):
    """The handshake is refused with ``status``; ``code`` and the message go in the JSON body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def hash_key(key: str) -> str:
    """The form in which an API key is configured (RELAY_API_KEYS holds ``user:hash``)."""
    return hashlib.sha256(key.encode()).hexdigest()


#: What the safety identifiers' key is derived for (a different purpose, a different key).
_SAFETY_PURPOSE = b"relay: OpenAI-Safety-Identifier, v1"


def safety_key(upstream_key: str) -> bytes:
    """The key of :func:`safety_identifier`, derived from the relay's upstream key: secret
    like it, and the same on every instance and after every restart that share it."""
    return hmac.new(upstream_key.encode(), _SAFETY_PURPOSE, hashlib.sha256).digest()


def safety_identifier(key: bytes, identity: Identity) -> str:
    """A stable identifier of the client's user for OpenAI's ``OpenAI-Safety-Identifier``.

    HMAC-SHA256 of the user name under :func:`safety_key`, cut to 32 hex digits: OpenAI can
    tell one user's sessions from another's, and no one without the relay's key can find a
    user from it, not even by hashing guessed names. Anonymous clients share one identifier,
    which no named user can have.
    """
    name = b"anonymous" if identity.method == "anonymous" else b"user:" + identity.user.encode()
    return hmac.new(key, name, hashlib.sha256).hexdigest()[:32]


def new_api_key() -> str:
    return "rk_" + secrets.token_urlsafe(32)


def parse_api_keys(entries: Iterable[str]) -> dict[str, str]:
    """``["alice:<sha256 hex>", …]`` → ``{hash: user}``; raises ValueError on a bad entry."""
    return parse_user_digests(entries, "USER:SHA256HEX", "`relay keygen USER`")


def parse_user_digests(entries: Iterable[str], form: str, maker: str) -> dict[str, str]:
    """``["alice:<64 hex digits>", …]`` → ``{digest: user}``; a bad entry raises ValueError
    naming the ``form`` entries take and the command (``maker``) that makes one."""
    keys: dict[str, str] = {}
    for entry in entries:
        user, sep, digest = entry.partition(":")
        digest = digest.strip().lower()
        if not sep or not user.strip() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(
                f"each entry must be {form} (make one with {maker}); got {entry[:12]!r}…"
            )
        keys[digest] = user.strip()
    return keys


class Authenticator:
    """Checks one handshake's credentials and Origin against the relay's settings."""

    def __init__(
        self,
        *,
        api_keys: Mapping[str, str],
        jwt_secret: str = "",
        jwt_public_key: str = "",
        allowed_origins: Iterable[str] = (),
        anonymous: bool = False,
    ) -> None:
        self._api_keys = dict(api_keys)
        if jwt_public_key:
            self._jwt_key: str | None = jwt_public_key
            self._jwt_algorithms = ["RS256", "ES256"]
        elif jwt_secret:
            self._jwt_key = jwt_secret
            self._jwt_algorithms = ["HS256"]
        else:
            self._jwt_key = None
            self._jwt_algorithms = []
        self._origins = frozenset(o.rstrip("/") for o in allowed_origins)
        self._anonymous = anonymous

    @property
    def configured(self) -> bool:
        """Whether any client credential is accepted at all (else only anonymous use)."""
        return bool(self._api_keys) or self._jwt_key is not None

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]], offered: Iterable[str]) -> Identity:
        origin: str | None = None
        bearer: str | None = None
        for name, value in headers:
            if name == b"origin":
                if origin is not None:
                    # A browser sends one; with two, a check of either could be fooled.
                    raise Refusal(
                        403,
                        "origin_not_allowed",
                        "The request carries more than one Origin header; send one.",
                    )
                origin = value.decode("latin-1")
            elif name == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and rest.strip():
                    bearer = rest.strip()
        if self._origins and origin is not None and origin.rstrip("/") not in self._origins:
            raise Refusal(
                403,
                "origin_not_allowed",
                f"Pages from {origin} may not use this relay (RELAY_ALLOWED_ORIGINS).",
            )
        token = bearer or next(
            (
                p.partition(".")[2]
                for p in offered
                if p.startswith(TOKEN_SUBPROTOCOLS) and p.partition(".")[2]
            ),
            None,
        )
        if token is None or (self._anonymous and not self.configured):
            # With no client credentials configured at all, a token means nothing here: the
            # official SDKs always send their own key as a Bearer token, which must not lock
            # them out of an anonymous relay (and is never forwarded upstream).
            if self._anonymous:
                return Identity(user="anonymous", method="anonymous")
            raise Refusal(
                401,
                "missing_credentials",
                "This relay needs a token: send `Authorization: Bearer <token>`, or from a"
                " browser offer the subprotocols `realtime` and `relay-token.<token>`.",
            )
        if token.count(".") == 2 and self._jwt_key is not None:
            return self._from_jwt(token)
        user = self._api_keys.get(hash_key(token))
        if user is None:
            raise Refusal(401, "invalid_credentials", "The token is not valid for this relay.")
        return Identity(user=user, method="api_key")

    def _from_jwt(self, token: str) -> Identity:
        import jwt  # here, not at the top: with cryptography it takes a quarter second to import

        try:
            claims = jwt.decode(
                token,
                self._jwt_key,  # type: ignore[arg-type]
                algorithms=self._jwt_algorithms,
                options={"require": ["exp", "sub"]},
                leeway=JWT_LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise Refusal(401, "token_expired", "The token has expired; get a new one.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Refusal(401, "invalid_credentials", f"The token lacks the {exc.claim!r} claim.") from None
        except jwt.InvalidTokenError:
            raise Refusal(401, "invalid_credentials", "The token is not valid for this relay.") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Refusal(401, "invalid_credentials", "The token's 'sub' must name the user.")
        return Identity(
            user=sub,
            method="jwt",
            model=_optional(claims, "model", str),
            max_session_seconds=_optional(claims, "max_session_seconds", (int, float)),
            budget=_optional(claims, "budget", int),
            budget_usd=_optional(claims, "budget_usd", (int, float)),
        )


def _optional(claims: Mapping[str, object], name: str, kind: type | tuple[type, ...]) -> object:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Refusal(401, "invalid_credentials", f"The token's {name!r} claim has the wrong type.")
    return value
