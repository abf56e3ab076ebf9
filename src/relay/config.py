"""Every setting of the relay, read once at start-up and validated.

Sources, later ones winning: the built-in defaults, the TOML file named by
``RELAY_CONFIG`` (keys are the setting names, plus a ``[session]`` table),
environment variables, then command-line flags. A bad value stops start-up with
a :class:`ConfigError` that names the setting and says what was expected.

The table :data:`SETTINGS` is the single source for the environment variable
names, the CLI flags and docs/configuration.md (``uv run python tools/configuration_md.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .core import models as realtime_models
from .core.beta import DEFAULT_MODEL_ALIASES
from .core.policy import Policy
from .core.pricing import PriceTable
from .usage.auth import parse_api_keys
from .usage.sip import Callers
from .usage.webhooks import secret_key

MiB = 1024 * 1024

#: The GA session the relay asks for as soon as the upstream opens, unless the
#: config file's ``[session]`` table or RELAY_INSTRUCTIONS / RELAY_VOICE say otherwise.
DEFAULT_SESSION: dict[str, Any] = {
    "type": "realtime",
    "instructions": (
        "You are a friendly, concise voice assistant. Answer in one or two short sentences."
    ),
    "audio": {
        "input": {
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 500,
                "create_response": True,
                "interrupt_response": True,
            }
        },
        "output": {"voice": "marin"},
    },
}


#: ``relay demo``'s Twilio auth token: known to ``relay call``, so a call through the demo needs
#: no flag. The demo serves loopback only (and anyone at all with --allow-anonymous).
DEMO_TWILIO_AUTH_TOKEN = "relay-demo-twilio-auth-token"


class ConfigError(Exception):
    """A setting has a value the relay cannot run with; the message says which and why."""


@dataclass(frozen=True)
class Setting:
    """How one field of :class:`RelayConfig` is named outside Python."""

    name: str
    env: str
    help: str
    secret: bool = False

    is_flag: bool = False  # a boolean: its CLI flag takes no value
    kind: str = "str"  # the field's type, as written in RelayConfig
    default: Any = None
    shown: str | None = None  # how the default reads where its value would mislead

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def shown_default(self) -> str:
        """The default as the docs and ``--help`` show it (Markdown: values in backticks)."""
        if self.shown is not None:
            return self.shown
        value = self.default
        if value is None:
            return "(unset)"
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        if isinstance(value, float):
            return f"`{value:g}`"
        if isinstance(value, tuple):
            value = ",".join(value)
        return f"`{value}`" if value != "" else "(none)"


def _setting(
    default: Any, env: str, help: str, *, secret: bool = False, shown: str | None = None
) -> Any:
    return field(
        default=default, metadata={"env": env, "help": help, "secret": secret, "shown": shown}
    )


@dataclass(frozen=True)
class RelayConfig:
    """The relay's validated settings. Build it with :func:`load_config`."""

    openai_api_key: str = field(
        default="",
        repr=False,
        metadata={
            "env": "OPENAI_API_KEY",
            "help": "Key the relay uses upstream. Never sent to clients or logged.",
            "secret": True,
            "shown": "(required for `serve`)",
        },
    )
    jwt_secret: str = field(
        default="",
        repr=False,
        metadata={
            "env": "RELAY_JWT_SECRET",
            "help": "Shared secret of client JWTs (HS256), at least 32 bytes. Environment only.",
            "secret": True,
        },
    )
    jwt_public_key: str = _setting(
        "",
        "RELAY_JWT_PUBLIC_KEY",
        "PEM public key of client JWTs (RS256/ES256).",
    )
    api_keys: tuple[str, ...] = _setting(
        (),
        "RELAY_API_KEYS",
        "Comma-separated `user:sha256hex` client API keys (make them with `relay keygen USER`).",
    )
    allowed_origins: tuple[str, ...] = _setting(
        (),
        "RELAY_ALLOWED_ORIGINS",
        "Comma-separated browser origins allowed to connect (empty: any). Non-browser"
        " clients send no Origin and are not affected.",
        shown="(any)",
    )
    browser_refusals: str = _setting(
        "http",
        "RELAY_BROWSER_REFUSALS",
        "How a refused browser (a request with an `Origin` header) is told: `http` (401/403/429,"
        " which a page sees only as close 1006) or `close` (accept, send an `error` event, close"
        " 4401/4403/4429 so the page can tell why).",
    )
    allow_anonymous: bool = _setting(
        False,
        "RELAY_ALLOW_ANONYMOUS",
        "Let clients in without a token (all as user `anonymous`). `relay serve` refuses to"
        " start with no client auth unless this is set.",
    )
    store: str = _setting(
        "",
        "RELAY_STORE",
        "Usage and limits store: `sqlite:///PATH` (embedded) or `redis://HOST:PORT/DB` (shared"
        " by many relay instances). Unset: `usage.db` in the state directory,"
        " `$XDG_STATE_HOME/relay` or else `~/.local/state/relay`.",
        shown="`usage.db` in the state directory",
    )
    max_sessions_per_user: int = _setting(
        0, "RELAY_MAX_SESSIONS_PER_USER", "Live sessions one user may hold across all instances (0: no cap)."
    )
    daily_token_budget: int = _setting(
        0,
        "RELAY_DAILY_TOKEN_BUDGET",
        "Tokens one user may use per UTC day, checked at admission and after each response"
        " (0: no budget).",
    )
    daily_budget_usd: float = _setting(
        0.0,
        "RELAY_DAILY_BUDGET_USD",
        "Dollars one user may spend per UTC day, by the price table, checked at admission and"
        " after each response (0: no budget). A JWT's `budget_usd` claim can lower it. Every"
        " model a client may use needs a price.",
    )
    max_session_seconds: float = _setting(
        0.0,
        "RELAY_MAX_SESSION_SECONDS",
        "Longest a session may last (0: no relay limit; the Realtime API's own is 60 min). A JWT's"
        " `max_session_seconds` claim can shorten it. Warned before, then closed 1001.",
    )
    idle_timeout: float = _setting(
        300.0,
        "RELAY_IDLE_TIMEOUT",
        "Seconds with no message either way before a session is closed 4008 (0: never).",
    )
    limit_warning_seconds: float = _setting(
        30.0,
        "RELAY_LIMIT_WARNING_SECONDS",
        "How long before the session-length or idle cut the client gets a warning event"
        " (at most half the limit).",
    )
    admin_token: str = field(
        default="",
        repr=False,
        metadata={
            "env": "RELAY_ADMIN_TOKEN",
            "help": "Bearer token of `GET /admin/usage` (unset: the endpoint is off). Environment only.",
            "secret": True,
        },
    )
    mint_per_minute: int = _setting(
        10, "RELAY_MINT_PER_MINUTE", "Client keys one user may mint per minute (per instance)."
    )
    openai_webhook_secret: str = field(
        default="",
        repr=False,
        metadata={
            "env": "RELAY_OPENAI_WEBHOOK_SECRET",
            "help": "Signing secret (`whsec_…`) of the OpenAI project's webhook for"
            " `realtime.call.incoming`: turns on `POST /webhooks/openai`, where SIP calls"
            " arrive (unset: off). Environment only.",
            "secret": True,
        },
    )
    sip_callers: tuple[str, ...] = _setting(
        (),
        "RELAY_SIP_CALLERS",
        "Comma-separated `user:hmac` entries: the phone numbers whose SIP calls are taken, and"
        " whose each is (make them with `relay sip-caller USER NUMBER`). Other callers are"
        " declined, or taken as `anonymous` with RELAY_ALLOW_ANONYMOUS.",
    )
    sip_caller_key: str = field(
        default="",
        repr=False,
        metadata={
            "env": "RELAY_SIP_CALLER_KEY",
            "help": "Key of the HMAC under which RELAY_SIP_CALLERS holds the numbers (at least"
            " 16 bytes). Environment only.",
            "secret": True,
        },
    )
    upstream_url: str = _setting(
        "wss://api.openai.com/v1/realtime",
        "RELAY_UPSTREAM_URL",
        "Realtime API WebSocket URL (ws:// or wss://); `?model=` is added per session.",
    )
    upstream_auth: str = _setting(
        "header",
        "RELAY_UPSTREAM_AUTH",
        "How the key is sent upstream: `header` (Authorization: Bearer) or `subprotocol`"
        " (openai-insecure-api-key.<key>).",
    )
    model: str = _setting(
        realtime_models.DEFAULT, "RELAY_MODEL", "Model used when a client names none."
    )
    models: tuple[str, ...] = _setting(
        realtime_models.CURRENT,
        "RELAY_MODELS",
        "Comma-separated models a client may pick with `?model=`, or fnmatch patterns"
        " (`gpt-realtime-2*`); RELAY_MODEL is always allowed. Default: today's models, none"
        " deprecated; a deprecated one here or in RELAY_MODEL starts the relay with a warning"
        " naming its shutdown date.",
    )
    safety_identifier: str = _setting(
        "hash",
        "RELAY_SAFETY_IDENTIFIER",
        "`hash`: send `OpenAI-Safety-Identifier` upstream, a keyed hash of the client's user"
        " (HMAC-SHA256 keyed from OPENAI_API_KEY; anonymous clients share one), so OpenAI can"
        " tell one abusive user from the organisation; `off`: send none.",
    )
    warm_pool: tuple[str, ...] = _setting(
        (),
        "RELAY_WARM_POOL",
        "Upstream sessions each worker keeps open and set up in advance, so a client gets"
        " `session.created` without waiting for a dial: `N` for RELAY_MODEL, or"
        " `MODEL=N,MODEL=N` (at most 64 each; empty: no pool). Under RELAY_SAFETY_IDENTIFIER=hash"
        " they carry the anonymous identifier and serve anonymous clients only (see"
        " [Deployment](deployment.md#warm-upstream-pool)).",
        shown="(none)",
    )
    warm_pool_max_age: float = _setting(
        600.0,
        "RELAY_WARM_POOL_MAX_AGE",
        "Seconds a pooled session may wait for a client before it is closed and replaced (at"
        " most 1800: a client should get most of the Realtime API's 60 minutes).",
    )
    model_aliases: tuple[str, ...] = _setting(
        tuple(f"{old}={new}" for old, new in DEFAULT_MODEL_ALIASES.items()),
        "RELAY_MODEL_ALIASES",
        "Comma-separated `retired=current` model names: a client naming a retired model (as beta"
        " clients do) gets the current one. A shipped pair whose model is not allowed here is"
        " ignored; one you write must lead to an allowed model. `none`: no aliases.",
        shown="the retired preview models → `gpt-realtime-2.1` / `gpt-realtime-2.1-mini`"
        " ([beta.md](beta.md#model-aliases))",
    )
    beta: str = _setting(
        "translate",
        "RELAY_BETA",
        "Clients asking for the retired beta dialect (`OpenAI-Beta: realtime=v1` or the"
        " `openai-beta.realtime-v1` subprotocol): `translate` (served in beta, GA upstream; see"
        " [beta.md](beta.md)) or `refuse` (error `beta_api_shape_disabled`, close 4000, as the"
        " Realtime API does).",
    )
    host: str = _setting("127.0.0.1", "RELAY_HOST", "Address `relay serve` binds to.")
    port: int = _setting(8000, "RELAY_PORT", "Port `relay serve` binds to.")
    workers: int = _setting(
        1,
        "RELAY_WORKERS",
        "Worker processes of `relay serve`, sharing one listening socket, each taking its share of"
        " the sessions; one per core.",
    )
    tls_cert: str = _setting(
        "", "RELAY_TLS_CERT", "PEM certificate (chain) file: serve `https://` and `wss://`."
    )
    tls_key: str = _setting("", "RELAY_TLS_KEY", "PEM private key file of `RELAY_TLS_CERT`.")
    keep_alive_timeout: float = _setting(
        5.0, "RELAY_KEEP_ALIVE_TIMEOUT", "Seconds an idle HTTP keep-alive connection is kept."
    )
    ping_interval: float = _setting(
        20.0,
        "RELAY_PING_INTERVAL",
        "Seconds between WebSocket pings on both legs, keeping proxies and NATs from timing"
        " out a quiet session (0: no pings).",
    )
    peer_timeout: float = _setting(
        45.0,
        "RELAY_PEER_TIMEOUT",
        "Seconds in which a peer sent nothing, not even a pong, after which it is taken for dead:"
        " the session ends, or (failover) its upstream is replaced (0: never). Keep it above"
        " RELAY_PING_INTERVAL and RELAY_SEND_TIMEOUT.",
    )
    max_sessions: int = _setting(
        0,
        "RELAY_MAX_SESSIONS",
        "Live sessions one relay process takes (0: no cap); beyond it, HTTP 503 `relay_full`.",
    )
    overload_cpu: float = _setting(
        0.85,
        "RELAY_OVERLOAD_CPU",
        "Share of a core (0-1, smoothed over ~1 s) the relay process may use before new sessions"
        " get HTTP 503 `relay_overloaded` and `/readyz` 503 (0: no limit).",
    )
    overload_lag: float = _setting(
        0.1,
        "RELAY_OVERLOAD_LAG",
        "Event-loop lag (seconds, smoothed) above which new sessions are refused the same way"
        " (0: no limit).",
    )
    shed_cpu: float = _setting(
        0.97,
        "RELAY_SHED_CPU",
        "Core share above which, after 1 s, the tenth of the sessions that cost the most (bytes"
        " and messages a second) is closed 1013 `relay_overloaded`, again every second until the"
        " load recovers (0: never).",
    )
    shed_lag: float = _setting(
        0.5, "RELAY_SHED_LAG", "Loop lag (seconds) that sheds sessions the same way (0: never)."
    )
    overload_behind: float = _setting(
        0.1,
        "RELAY_OVERLOAD_BEHIND",
        "Share of live sessions (0-1, smoothed) with over 64 KiB from one side the relay has"
        " not read yet, the other side not holding it back, above which new sessions are"
        " refused (0: no limit).",
    )
    shed_behind: float = _setting(
        0.25,
        "RELAY_SHED_BEHIND",
        "Share of live sessions that far behind which sheds sessions the same way (0: never).",
    )
    busy_poll: float = _setting(
        0.0001,
        "RELAY_BUSY_POLL",
        "At most how long (seconds) an idle worker polls its sockets before it sleeps; it learns"
        " how long pays off (0: sleep at once). Cuts the latency a relay adds where waking a"
        " sleeping process is slow (VMs); the time polled is not counted as load.",
    )
    pump: str = _setting(
        "auto",
        "RELAY_PUMP",
        "How sessions over plain sockets are relayed: `auto` (by the pump, where it proves at"
        " start-up that it works in this Trio; else by each session's own tasks, with a"
        " warning), `on` (the pump, or start-up fails) or `off` (the sessions' own tasks)."
        " `relay_pump_active` in /metrics says which runs.",
    )
    client_max_rate: int = _setting(
        700_000,
        "RELAY_CLIENT_MAX_RATE",
        "Bytes a second one client may send, after a burst of 10 s of it; over it, an `error`"
        " event `relay_rate_limited` and close 4009 (0: no limit). The default is about ten"
        " times real-time audio (24 kHz PCM16 as base64 JSON: 66 kB/s).",
    )
    drain_seconds: float = _setting(
        10.0,
        "RELAY_DRAIN_SECONDS",
        "On SIGTERM/SIGINT: seconds live sessions get to finish, after a `relay_draining`"
        " notice, before the rest are closed 1012.",
    )
    records: str = _setting(
        "",
        "RELAY_RECORDS",
        "Directory for call records: per session a JSON summary and a transcript, files mode"
        " 0600 (empty: no records).",
    )
    records_audio: bool = _setting(
        False,
        "RELAY_RECORDS_AUDIO",
        "Also record each call's audio as a stereo WAV (caller left, assistant right).",
    )
    records_retention_days: float = _setting(
        30.0,
        "RELAY_RECORDS_RETENTION_DAYS",
        "Days call records are kept before the relay deletes them (0: kept for ever).",
    )
    records_webhook: str = _setting(
        "",
        "RELAY_RECORDS_WEBHOOK",
        "URL that gets each call's summary and transcript as a signed JSON POST when the"
        " session ends (works with or without RELAY_RECORDS).",
    )
    records_webhook_secret: str = field(
        default="",
        repr=False,
        metadata={
            "env": "RELAY_RECORDS_WEBHOOK_SECRET",
            "help": "Key of the webhook's HMAC-SHA256 signature (`Relay-Signature` header)."
            " Environment only.",
            "secret": True,
        },
    )
    otel_endpoint: str = _setting(
        "",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTLP/HTTP endpoint for OpenTelemetry traces (a span per session and per turn), e.g."
        " http://127.0.0.1:4318 (empty: no tracing, at no cost). OTEL_SERVICE_NAME names the"
        " service (default relay).",
    )
    log_format: str = _setting(
        "auto",
        "RELAY_LOG_FORMAT",
        "`json` (one object per line), `text`, or `auto` (text on a terminal, else JSON).",
    )
    log_level: str = _setting("info", "RELAY_LOG_LEVEL", "`debug`, `info`, `warning` or `error`.")
    instructions: str | None = _setting(
        None, "RELAY_INSTRUCTIONS", "Overrides `session.instructions` of the session.update."
    )
    voice: str | None = _setting(
        None, "RELAY_VOICE", "Overrides `session.audio.output.voice` of the session.update."
    )
    dial_timeout: float = _setting(
        10.0, "RELAY_DIAL_TIMEOUT", "Seconds to open the upstream WebSocket before giving up (1014)."
    )
    close_timeout: float = _setting(
        5.0, "RELAY_CLOSE_TIMEOUT", "Seconds a close handshake may take before the socket is cut."
    )
    failover_attempts: int = _setting(
        4,
        "RELAY_FAILOVER_ATTEMPTS",
        "Dials to a new upstream when the upstream drops mid-session (1001, 1006, 1011-1014, no"
        " pong); the session and conversation are replayed there under the same item ids."
        " 0: no failover, the session ends with its upstream (also turns off rollover).",
    )
    failover_backoff: float = _setting(
        0.5,
        "RELAY_FAILOVER_BACKOFF",
        "Seconds before the second failover dial, doubling for each further one (at most 5 s);"
        " the first is at once.",
    )
    rollover_seconds: float = _setting(
        3300.0,
        "RELAY_ROLLOVER_SECONDS",
        "Age at which an upstream session is replaced by a fresh one, at the next moment between"
        " turns, ahead of the Realtime API's 60-minute cap (0: never). Needs failover.",
    )
    replay_bytes: int = _setting(
        256 * 1024,
        "RELAY_REPLAY_BYTES",
        "Most bytes of conversation items a session keeps for a failover's replay; past it the"
        " oldest are forgotten first.",
    )
    resume_seconds: float = _setting(
        0.0,
        "RELAY_RESUME_SECONDS",
        "How long a relay-aware client (subprotocol `relay-resume`) that lost its connection may"
        " take to resume its session; meanwhile the upstream stays open (0: no resume).",
    )
    resume_bytes: int = _setting(
        1 * MiB,
        "RELAY_RESUME_BYTES",
        "Most bytes of recent events a resumable session keeps for the client to resume from;"
        " a session whose client is away that would need more is ended.",
    )
    send_timeout: float = _setting(
        10.0,
        "RELAY_SEND_TIMEOUT",
        "Seconds either side may take to accept one message before the pair is closed"
        " (a stalled reader: client 1008, upstream 1014).",
    )
    queue_messages: int = _setting(
        256, "RELAY_QUEUE_MESSAGES", "Most client messages held while the upstream opens."
    )
    queue_bytes: int = _setting(
        4 * MiB, "RELAY_QUEUE_BYTES", "Most bytes of client messages held while the upstream opens."
    )
    max_message_bytes: int = _setting(
        4 * MiB, "RELAY_MAX_MESSAGE_BYTES", "Largest client message; a bigger one closes with 1009."
    )
    upstream_max_message_bytes: int = _setting(
        32 * MiB, "RELAY_UPSTREAM_MAX_MESSAGE_BYTES", "Largest upstream message accepted."
    )
    binary_frames: str = _setting(
        "audio",
        "RELAY_BINARY_FRAMES",
        "Client binary frames: `audio` (raw audio, sent on as input_audio_buffer.append)"
        " or `reject` (answered with an error event).",
    )
    permessage_deflate: bool = _setting(
        False,
        "RELAY_PERMESSAGE_DEFLATE",
        "Negotiate permessage-deflate with clients. Off: it costs 2-9x CPU on audio.",
    )
    public_url: str = _setting(
        "",
        "RELAY_PUBLIC_URL",
        "The relay's URL as the world reaches it (`https://relay.example.com`, with any path"
        " prefix a proxy adds): the URL Twilio signs and the base of the stream URL it is sent"
        " (unset: each request's own scheme and Host).",
        shown="(each request's own)",
    )
    twilio_auth_token: str = field(
        default="",
        repr=False,
        metadata={
            "env": "RELAY_TWILIO_AUTH_TOKEN",
            "help": "Auth token of the Twilio account whose calls the relay takes: turns on"
            " `POST /twilio/voice` and `/twilio` ([Phone calls](phone.md)). Environment only.",
            "secret": True,
            "shown": "(unset: off)",
        },
    )
    twilio_dtmf: str = _setting(
        "text",
        "RELAY_TWILIO_DTMF",
        "What a key a caller presses becomes: `text` (a user item saying which key, and a"
        " response unless one is under way) or `off` (ignored).",
    )
    twilio_goodbye: str = _setting(
        "The call is about to end because of a time or usage limit. In one short sentence,"
        " tell the caller so and say goodbye.",
        "RELAY_TWILIO_GOODBYE",
        "Instructions for the model's last words when a limit (RELAY_MAX_SESSION_SECONDS, a daily"
        " token budget) ends a call; the call ends once they have played (empty: no goodbye).",
        shown="(a one-sentence goodbye)",
    )
    twilio_max_calls: int = _setting(
        0,
        "RELAY_TWILIO_MAX_CALLS",
        "Live calls the phone line (usage user `twilio`) may hold across all instances (0: no"
        " cap); each caller is also a user under RELAY_MAX_SESSIONS_PER_USER.",
    )
    twilio_daily_token_budget: int = _setting(
        0,
        "RELAY_TWILIO_DAILY_TOKEN_BUDGET",
        "Tokens all calls together may use per UTC day (0: no budget); each caller also has"
        " RELAY_DAILY_TOKEN_BUDGET.",
    )
    policy: Policy = field(default_factory=Policy, metadata={"toml_only": True})
    prices: PriceTable = field(default_factory=PriceTable, metadata={"toml_only": True})
    session: Mapping[str, Any] = field(
        default_factory=lambda: copy.deepcopy(DEFAULT_SESSION),
        metadata={"toml_only": True},
    )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret setting's value (for the logs' redaction)."""
        return tuple(getattr(self, s.name) for s in SETTINGS if s.secret)

    @property
    def allowed_models(self) -> tuple[str, ...]:
        """RELAY_MODELS (names and fnmatch patterns) and RELAY_MODEL."""
        return (*self.models, self.model) if self.model not in self.models else self.models

    def allows_model(self, model: str) -> bool:
        """Whether a client may connect with ``?model=model``."""
        return realtime_models.allows(self.allowed_models, model)

    @property
    def aliases(self) -> dict[str, str]:
        """The model aliases in force: those whose current model is allowed here."""
        pairs = (entry.partition("=") for entry in self.model_aliases if entry != "none")
        return {old: new for old, _, new in pairs if self.allows_model(new)}

    @property
    def warm_pool_sizes(self) -> dict[str, int]:
        """RELAY_WARM_POOL as sessions per model (validated at load: :func:`_warm_pool`)."""
        return _warm_pool(self)

    def rest_url(self, endpoint: str) -> str:
        """The Realtime API's REST ``endpoint`` (``calls``, ``client_secrets``) beside
        RELAY_UPSTREAM_URL: ``wss://host/v1/realtime`` → ``https://host/v1/realtime/calls``."""
        url = urlsplit(self.upstream_url)
        scheme = "https" if url.scheme == "wss" else "http"
        return f"{scheme}://{url.netloc}{url.path.rstrip('/')}/{endpoint}"

    def session_object(self) -> dict[str, Any]:
        """The GA session sent upstream first, with the env overrides applied."""
        session = copy.deepcopy(dict(self.session))
        session["type"] = "realtime"
        if self.instructions is not None:
            session["instructions"] = self.instructions
        if self.voice is not None:
            session.setdefault("audio", {}).setdefault("output", {})["voice"] = self.voice
        return session


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(
        f.name,
        f.metadata["env"],
        f.metadata["help"],
        secret=f.metadata.get("secret", False),
        is_flag=f.type == "bool",
        kind=str(f.type),
        default=f.default,
        shown=f.metadata.get("shown"),
    )
    for f in dataclasses.fields(RelayConfig)
    if "env" in f.metadata
)
_FIELDS = {f.name: f for f in dataclasses.fields(RelayConfig)}
#: The config file's tables other than [session], and what reads each.
_TABLES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "policy": Policy.from_table,
    "prices": PriceTable.from_table,
}


def state_dir(environ: Mapping[str, str]) -> Path:
    """Where the relay keeps its state unless told otherwise (XDG base directories):
    ``$XDG_STATE_HOME/relay``, else ``~/.local/state/relay``; never the working directory."""
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the spec says to ignore a relative one
        base = os.path.join(environ.get("HOME") or str(Path.home()), ".local", "state")
    return Path(base) / "relay"


def default_store(environ: Mapping[str, str]) -> str:
    """The RELAY_STORE used when none is set: an SQLite file in :func:`state_dir`."""
    return f"sqlite:///{state_dir(environ) / 'usage.db'}"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_models(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


#: For each field type: the TOML value types it takes, and how to parse it from text.
_KINDS: dict[str, tuple[tuple[type, ...], Callable[[Any], Any]]] = {
    "str": ((str,), str),
    "str | None": ((str,), str),
    "int": ((int,), int),
    "float": ((int, float), float),
    "bool": ((bool,), _parse_bool),
    "tuple[str, ...]": ((list, tuple), lambda v: tuple(str(x) for x in v)),
}


def coerce_setting(name: str, value: Any, source: str) -> Any:
    """Turn a raw value (text from env/CLI, or a TOML value) into the field's type."""
    kind = _FIELDS[name].type
    assert isinstance(kind, str)
    accepted, convert = _KINDS[kind]
    try:
        if isinstance(value, str):
            return _parse_models(value) if kind == "tuple[str, ...]" else convert(value)
        if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
            return convert(value)
        raise ValueError(f"expected {kind}")
    except ValueError as exc:
        env = _FIELDS[name].metadata.get("env", name)
        raise ConfigError(f"{env} ({source}) has the bad value {value!r}: {exc}") from None


def load_config(
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: str | None = None,
) -> RelayConfig:
    """Build and validate the configuration.

    ``overrides`` are already-typed values (from CLI flags); ``None`` values are ignored.
    ``config_file`` wins over ``RELAY_CONFIG`` in ``environ``.
    """
    values: dict[str, Any] = {}
    path = config_file or environ.get("RELAY_CONFIG")
    if path:
        values.update(_read_toml(Path(path)))
    for setting in SETTINGS:
        if setting.env in environ and environ[setting.env] != "":
            values[setting.name] = coerce_setting(setting.name, environ[setting.env], "environment")
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    if not values.get("store"):
        values["store"] = default_store(environ)
    config = RelayConfig(**values)
    _validate(config)
    # A client may change session.model only to one of these (if it is not locked), and a
    # locked field's value equal to the relay's own session's is no change.
    policy = replace(config.policy, models=config.allowed_models, session=config.session_object())
    return replace(config, policy=policy)


def deprecation_warning(config: RelayConfig) -> str | None:
    """The warning to log at start when the configuration names a deprecated model."""
    return realtime_models.deprecation_warning(config.model, config.models)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"RELAY_CONFIG: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"RELAY_CONFIG: {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "session":
            if not isinstance(value, dict):
                raise ConfigError(f"RELAY_CONFIG: [session] in {path} must be a table")
            session = copy.deepcopy(DEFAULT_SESSION)
            session.update(value)
            values["session"] = session
        elif key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"RELAY_CONFIG: [{key}] in {path} must be a table")
            try:
                values[key] = _TABLES[key](value)
            except ValueError as exc:
                raise ConfigError(f"RELAY_CONFIG: {exc}") from None
        elif key in _FIELDS and "env" in _FIELDS[key].metadata:
            if _FIELDS[key].metadata.get("secret"):
                raise ConfigError(
                    f"RELAY_CONFIG: {key} must not be in the config file; "
                    f"set {_FIELDS[key].metadata['env']} in the environment instead"
                )
            values[key] = coerce_setting(key, value, str(path))
        else:
            known = ", ".join(sorted(s.name for s in SETTINGS if not s.secret))
            raise ConfigError(
                f"RELAY_CONFIG: unknown setting {key!r} in {path}; known: {known}, [session], [policy],"
                " [prices]"
            )
    return values


def _validate(config: RelayConfig) -> None:
    url = urlsplit(config.upstream_url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise ConfigError(
            f"RELAY_UPSTREAM_URL must be a ws:// or wss:// URL, got {config.upstream_url!r}"
        )
    if url.query:
        raise ConfigError("RELAY_UPSTREAM_URL must not carry a query; the relay adds ?model=")
    if config.upstream_auth not in ("header", "subprotocol"):
        raise ConfigError(
            f"RELAY_UPSTREAM_AUTH must be 'header' or 'subprotocol', got {config.upstream_auth!r}"
        )
    if config.workers < 1:
        raise ConfigError(f"RELAY_WORKERS must be at least 1, got {config.workers}")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("RELAY_TLS_CERT and RELAY_TLS_KEY go together: set both, or neither")
    for name in ("tls_cert", "tls_key"):
        path = getattr(config, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"{_FIELDS[name].metadata['env']}: no such file {path!r}")
    for name in (
        "keep_alive_timeout", "ping_interval", "peer_timeout", "drain_seconds",
        "max_sessions", "overload_cpu", "overload_lag", "shed_cpu", "shed_lag",
        "overload_behind", "shed_behind", "busy_poll", "client_max_rate",
    ):
        if getattr(config, name) < 0:
            raise ConfigError(f"{_FIELDS[name].metadata['env']} must be >= 0")
    if config.peer_timeout and not config.ping_interval:
        raise ConfigError(
            f"RELAY_PEER_TIMEOUT ({config.peer_timeout:g}) needs pings: with RELAY_PING_INTERVAL=0"
            " a quiet client sends nothing and the upstream answers no ping, so every session"
            f" that stays quiet for {config.peer_timeout:g} s would be dropped as dead. Set"
            " RELAY_PING_INTERVAL below it, or RELAY_PEER_TIMEOUT=0 too."
        )
    if config.peer_timeout and config.peer_timeout <= config.ping_interval:
        raise ConfigError(
            f"RELAY_PEER_TIMEOUT ({config.peer_timeout:g}) must be above RELAY_PING_INTERVAL"
            f" ({config.ping_interval:g}): a quiet peer is heard from only when it answers a"
            " ping, so a shorter timeout would drop live sessions between two pings."
        )
    if config.peer_timeout and config.peer_timeout <= config.send_timeout:
        raise ConfigError(
            f"RELAY_PEER_TIMEOUT ({config.peer_timeout:g}) must be above RELAY_SEND_TIMEOUT"
            f" ({config.send_timeout:g}): while the relay waits on a slow client it cannot read"
            " the upstream's pongs, and that must not look like a dead upstream."
        )
    if config.log_format not in ("auto", "json", "text"):
        raise ConfigError(f"RELAY_LOG_FORMAT must be auto, json or text, got {config.log_format!r}")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"RELAY_LOG_LEVEL must be debug, info, warning or error, got {config.log_level!r}"
        )
    if config.browser_refusals not in ("http", "close"):
        raise ConfigError(
            f"RELAY_BROWSER_REFUSALS must be 'http' or 'close', got {config.browser_refusals!r}"
        )
    if config.pump not in ("auto", "on", "off"):
        raise ConfigError(f"RELAY_PUMP must be auto, on or off, got {config.pump!r}")
    if config.binary_frames not in ("audio", "reject"):
        raise ConfigError(
            f"RELAY_BINARY_FRAMES must be 'audio' or 'reject', got {config.binary_frames!r}"
        )
    if not config.model:
        raise ConfigError(f"RELAY_MODEL must name a model, e.g. {realtime_models.DEFAULT}")
    if config.safety_identifier not in ("hash", "off"):
        raise ConfigError(
            f"RELAY_SAFETY_IDENTIFIER must be 'hash' or 'off', got {config.safety_identifier!r}"
        )
    if config.beta not in ("translate", "refuse"):
        raise ConfigError(f"RELAY_BETA must be 'translate' or 'refuse', got {config.beta!r}")
    _validate_aliases(config)
    if not 0 <= config.port < 65536:
        raise ConfigError(f"RELAY_PORT must be 0-65535, got {config.port}")
    for name in (
        "dial_timeout",
        "close_timeout",
        "send_timeout",
        "queue_messages",
        "queue_bytes",
        "max_message_bytes",
        "upstream_max_message_bytes",
    ):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{_FIELDS[name].metadata['env']} must be positive")
    for name in (
        "max_session_seconds",
        "idle_timeout",
        "limit_warning_seconds",
        "failover_attempts",
        "failover_backoff",
        "rollover_seconds",
        "resume_seconds",
    ):
        if getattr(config, name) < 0:
            raise ConfigError(f"{_FIELDS[name].metadata['env']} must be >= 0 (0 turns it off)")
    for name in ("replay_bytes", "resume_bytes"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{_FIELDS[name].metadata['env']} must be positive")
    if config.max_sessions_per_user < 0 or config.daily_token_budget < 0:
        raise ConfigError("RELAY_MAX_SESSIONS_PER_USER and RELAY_DAILY_TOKEN_BUDGET must be >= 0")
    if config.daily_budget_usd < 0 or config.records_retention_days < 0:
        raise ConfigError("RELAY_DAILY_BUDGET_USD and RELAY_RECORDS_RETENTION_DAYS must be >= 0")
    patterns = [m for m in config.allowed_models if realtime_models.is_pattern(m)]
    if config.daily_budget_usd and patterns:
        raise ConfigError(
            f"RELAY_DAILY_BUDGET_USD needs a price for every model a client may use, and the"
            f" RELAY_MODELS pattern {patterns[0]!r} admits models that have none: name the models"
            f" instead. Priced: {', '.join(sorted(config.prices))}."
        )
    unpriced = sorted(m for m in config.allowed_models if m not in config.prices)
    if config.daily_budget_usd and unpriced:
        raise ConfigError(
            f"RELAY_DAILY_BUDGET_USD needs a price for every model a client may use, and"
            f" {', '.join(unpriced)} {'has' if len(unpriced) == 1 else 'have'} none. Add"
            f" [prices.{unpriced[0]}] to RELAY_CONFIG (dollars per million tokens: input_text,"
            " input_audio, cached_text, cached_audio, output_text, output_audio), or take the"
            f" model out of RELAY_MODELS / RELAY_MODEL. Priced: {', '.join(sorted(config.prices))}."
        )
    for name in ("records_webhook", "otel_endpoint"):
        url = getattr(config, name)
        parts = urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname):
            env = _FIELDS[name].metadata["env"]
            raise ConfigError(f"{env} must be an http:// or https:// URL, got {url!r}")
    if config.records_webhook and not config.records_webhook_secret:
        raise ConfigError(
            "RELAY_RECORDS_WEBHOOK needs RELAY_RECORDS_WEBHOOK_SECRET, the key its POSTs are"
            " signed with (make one with `python -c 'import secrets;"
            " print(secrets.token_urlsafe(32))'`), so the receiver can tell them from forgeries."
        )
    if config.records_audio and not (config.records):
        raise ConfigError("RELAY_RECORDS_AUDIO needs RELAY_RECORDS, the directory the WAVs go to")
    if not config.store.startswith(("sqlite:///", "redis://")):
        raise ConfigError(
            f"RELAY_STORE must be sqlite:///PATH or redis://HOST:PORT/DB, got {config.store!r}"
        )
    try:
        parse_api_keys(config.api_keys)
    except ValueError as exc:
        raise ConfigError(f"RELAY_API_KEYS: {exc}") from None
    _validate_calls(config)
    if config.jwt_secret and len(config.jwt_secret.encode()) < 32:
        raise ConfigError(
            "RELAY_JWT_SECRET must be at least 32 bytes (RFC 7518 §3.2); make one with"
            " `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    if config.jwt_public_key and not config.jwt_public_key.lstrip().startswith("-----BEGIN"):
        raise ConfigError(
            "RELAY_JWT_PUBLIC_KEY must hold a PEM public key (-----BEGIN PUBLIC KEY-----…);"
            " to read it from a file use RELAY_JWT_PUBLIC_KEY=\"$(cat key.pem)\""
        )
    if config.twilio_dtmf not in ("off", "text"):
        raise ConfigError(f"RELAY_TWILIO_DTMF must be 'off' or 'text', got {config.twilio_dtmf!r}")
    if config.twilio_max_calls < 0 or config.twilio_daily_token_budget < 0:
        raise ConfigError("RELAY_TWILIO_MAX_CALLS and RELAY_TWILIO_DAILY_TOKEN_BUDGET must be >= 0")
    public = urlsplit(config.public_url)
    if config.public_url and (
        public.scheme not in ("http", "https") or not public.hostname or public.query
    ):
        raise ConfigError(
            "RELAY_PUBLIC_URL must be an http:// or https:// URL without a query, such as"
            f" https://relay.example.com, got {config.public_url!r}"
        )
    if not isinstance(config.session, Mapping):
        raise ConfigError("RELAY_CONFIG: [session] must be a table")
    _warm_pool(config)
    if not 0 < config.warm_pool_max_age <= WARM_POOL_MAX_AGE:
        raise ConfigError(
            f"RELAY_WARM_POOL_MAX_AGE must be above 0 and at most {WARM_POOL_MAX_AGE:g} s (a"
            f" pooled session's client should get most of the Realtime API's 60 minutes), got"
            f" {config.warm_pool_max_age:g}"
        )


#: The most sessions RELAY_WARM_POOL may keep per model (and worker).
WARM_POOL_MAX = 64
#: The longest RELAY_WARM_POOL_MAX_AGE: a pooled session's client gets at least the rest of
#: the Realtime API's 60 minutes.
WARM_POOL_MAX_AGE = 1800.0


def _warm_pool(config: RelayConfig) -> dict[str, int]:
    """RELAY_WARM_POOL's entries (``N`` for RELAY_MODEL, ``MODEL=N``) as sessions per model;
    raises ConfigError on a bad one."""
    sizes: dict[str, int] = {}
    for entry in config.warm_pool:
        model, _, count = entry.rpartition("=")
        model = model.strip() or config.model
        try:
            size = int(count)
        except ValueError:
            size = -1
        if not 0 <= size <= WARM_POOL_MAX:
            raise ConfigError(
                f"RELAY_WARM_POOL: {entry!r} is not `N` or `MODEL=N` with N from 0 to"
                f" {WARM_POOL_MAX}, e.g. RELAY_WARM_POOL=4 or"
                f" RELAY_WARM_POOL={config.model}=4"
            )
        if model in sizes:
            raise ConfigError(f"RELAY_WARM_POOL names {model} twice")
        if realtime_models.is_pattern(model) or not config.allows_model(model):
            raise ConfigError(
                f"RELAY_WARM_POOL: {model!r} is not one of the relay's models (RELAY_MODEL,"
                " RELAY_MODELS); name a model clients may use, not a pattern"
            )
        if size:
            sizes[model] = size
    return sizes


def _validate_aliases(config: RelayConfig) -> None:
    """Aliases an operator wrote must be well formed and lead to an allowed model (the shipped
    ones lead to the default models and are left out where those are not allowed)."""
    if config.model_aliases == RelayConfig.model_aliases or config.model_aliases == ("none",):
        return
    for entry in config.model_aliases:
        old, eq, new = entry.partition("=")
        if not (eq and old.strip() and new.strip()) or old != old.strip() or new != new.strip():
            raise ConfigError(
                f"RELAY_MODEL_ALIASES: {entry!r} is not `retired=current`, e.g."
                " gpt-4o-realtime-preview=gpt-realtime"
            )
        if not config.allows_model(new):
            allowed = ", ".join(sorted(config.allowed_models))
            raise ConfigError(
                f"RELAY_MODEL_ALIASES maps {old} to {new}, which clients may not use here;"
                f" allowed (RELAY_MODEL, RELAY_MODELS): {allowed}."
            )

def _validate_calls(config: RelayConfig) -> None:
    """The SIP settings: a webhook secret that is one, and callers with their key."""
    if config.openai_webhook_secret:
        try:
            secret_key(config.openai_webhook_secret)
        except ValueError as exc:
            raise ConfigError(f"RELAY_OPENAI_WEBHOOK_SECRET: {exc}") from None
    if config.sip_callers:
        if len(config.sip_caller_key.encode()) < 16:
            raise ConfigError(
                "RELAY_SIP_CALLERS needs RELAY_SIP_CALLER_KEY (at least 16 bytes), the key its"
                " entries were made with"
            )
        try:
            Callers(config.sip_caller_key, config.sip_callers)
        except ValueError as exc:
            raise ConfigError(f"RELAY_SIP_CALLERS: {exc}") from None
