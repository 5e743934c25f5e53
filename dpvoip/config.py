"""The configuration: one TOML file plus environment overrides, validated before anything starts.

Every setting is declared once, as a dataclass field with its documentation, so that the
loader, the error messages and the example file cannot drift apart. Loading is pure: the
file's text and the environment are passed in, a ``Config`` or a ``ConfigError`` comes out.
A ``ConfigError`` names the setting and what is wrong with it, never its value when the
setting is a secret.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from dpvoip.core.dialling_policy import DEFAULT_BLOCKED_PREFIXES
from dpvoip.crm.redis_sessions import parse_redis_url
from dpvoip.providers.interface import ProviderConfig
from dpvoip.zadarma.retention import DEFAULT_JOURNAL_DAYS, shortest_journal_days


class ConfigError(Exception):
    """A setting is unknown, of the wrong type, impossible, or the file is unreadable."""


class Secret:
    """A value that is never printed: its repr and str are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


Check = Callable[[Any], str | None]


def setting(default: Any, doc: str, check: Check | None = None, env: str = "") -> Any:
    """Declare one setting: its default, its one-line documentation, a value check.

    ``env`` names an extra environment variable (one the CRM already uses) that sets it.
    """
    meta = {"doc": doc, "check": check, "env": env}
    if isinstance(default, list):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


# --- value checks: each returns a problem description or None ---------------------------


def _between(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        if not low <= value <= high:
            return f"must be between {low:g} and {high:g}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        if value not in choices:
            return "must be one of " + ", ".join(repr(c) for c in choices)
        return None

    return check


def _marker(value: Any) -> str | None:
    if len(value) > 20:
        return "must be at most 20 characters (the CRM's phone_number column)"
    if value and not value.strip():
        return "must not be blank (leave it empty for the language's own word)"
    if any(ch.isdigit() for ch in value):
        return "must contain no digits (it must never look like a phone number)"
    return None


def _time_zone(value: Any) -> str | None:
    if value == "":
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {value!r} (use an IANA name such as 'Europe/Athens')"
    return None


def _region(value: Any) -> str | None:
    if value not in phonenumbers.SUPPORTED_REGIONS:
        return f"unknown country {value!r} (use a two-letter code such as 'GR' or 'DE')"
    return None


def _networks(value: Any) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an IP address or network"
    return None


_ENDPOINT = re.compile(r"^(tcp6?|ssl|unix|systemd):")


def _endpoint(value: Any) -> str | None:
    """Check a Twisted server endpoint string such as ``tcp:8080:interface=127.0.0.1``."""
    match = _ENDPOINT.match(value)
    if not match:
        return "must be a Twisted endpoint such as 'tcp:8080:interface=127.0.0.1'"
    kind = match.group(1)
    rest = value[match.end():]
    if kind in ("tcp", "tcp6", "ssl"):
        positional = [part for part in rest.split(":") if part and "=" not in part]
        named = dict(part.split("=", 1) for part in rest.split(":") if "=" in part)
        port = named.get("port", positional[0] if positional else "")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            return "needs a port number between 0 and 65535"
    elif kind == "unix" and not rest:
        return "needs a socket path"
    return None


def _area_code(value: Any) -> str | None:
    if value and not value.isdigit():
        return "must be digits only, without the trunk 0 (e.g. '30' for Berlin)"
    return None


def _digits_list(value: Any) -> str | None:
    for item in value:
        if not re.fullmatch(r"\+?[0-9 ()./-]{3,}", item):
            return f"{item!r} is not a phone number"
    return None


def _name(value: Any) -> str | None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,19}", value):
        return "must be 1-20 characters: lower-case letters, digits, '-' or '_'"
    return None


def _regions(value: Any) -> str | None:
    return next((problem for problem in map(_region, value) if problem), None)


def _e164_prefixes(value: Any) -> str | None:
    for item in value:
        if not re.fullmatch(r"\+[1-9][0-9]{0,14}", item):
            return f"{item!r} is not a number prefix in E.164 form (such as '+30901')"
    return None


def _base_url(value: Any) -> str | None:
    if value and not re.fullmatch(r"https?://[^\s/?#]+(:[0-9]+)?/?", value):
        return "must be a base URL such as 'https://api.zadarma.com' (no path, query or spaces)"
    return None


def _origins(value: Any) -> str | None:
    for item in value:
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?", item):
            return (f"{item!r} is not an origin: write scheme://host[:port], such as "
                    "'https://crm.example.com'")
    return None


def _cookie_name(value: Any) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        return "must be a cookie name: letters, digits, '_', '.' or '-'"
    return None


def _redis_url(value: Any) -> str | None:
    """A Redis URL as the CRM's REDIS_CACHE_URL (the message never holds it: it is a
    secret, and ``_checked`` replaces it anyway)."""
    if not value:
        return None
    try:
        parse_redis_url(value.reveal())
    except ValueError as problem:
        return str(problem)
    return None


def _key_prefix(value: Any) -> str | None:
    if not value.isprintable() or any(c.isspace() for c in value) or len(value) > 200:
        return "must be the CRM's KEY_PREFIX: printable, no spaces, at most 200 characters"
    return None


def _fingerprint(value: Any) -> str | None:
    text = str(value).replace(":", "").lower()
    if text and (len(text) != 64 or any(c not in "0123456789abcdef" for c in text)):
        return "a SHA-256 fingerprint: 64 hex digits (colons allowed)"
    return None


def _client_url(value: Any) -> str | None:
    rest = value.replace("{id}", "", 1)
    if value.count("{id}") != 1 or "{" in rest or "}" in rest:
        return "must hold {id} exactly once (and no other braces), such as '/clients/{id}/'"
    if not re.fullmatch(r"(/|https?://)[^\s\"'<>\\]*", value):
        return "must be a path on the CRM ('/...') or an http(s) URL, without spaces or quotes"
    return None


def _host(value: Any) -> str | None:
    if not value or any(c.isspace() for c in value):
        return "must be a host name or address"
    return None


# --- the sections -----------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: str = setting(
        "var",
        "Folder for dpvoip's own state: the embedded PostgreSQL and the spool. "
        "Relative paths are taken from the working directory.",
    )


def _instance_name(value: Any) -> str | None:
    if len(value) > 48:
        return "must be at most 48 characters (PostgreSQL's application_name keeps 63)"
    if value != value.strip() or any(not ch.isprintable() for ch in value):
        return "must be printable, without leading or trailing spaces"
    return None


@dataclass(frozen=True)
class InstanceSettings:
    name: str = setting(
        "",
        "This dpvoip's name among the instances sharing one database (each Fritz!Box is "
        "read by one of them): shown by /readyz, /metrics and `dpvoip check` as a box's "
        "leader, and as the lease session's application_name in pg_stat_activity. Empty: "
        "the host's name and the state folder (host:/path). Two instances must not share "
        "a name.",
        _instance_name,
    )


def instance_name(config: Config, base: Path) -> str:
    """``[instance] name``, or the host's name and the state folder's absolute path."""
    if config.instance.name:
        return config.instance.name
    import socket

    return f"{socket.gethostname()}:{config.state_path(base).absolute()}"


@dataclass(frozen=True)
class SpoolSettings:
    max_mb: int = setting(
        64,
        "Most disk space (MiB) for events spooled while PostgreSQL is unavailable. When "
        "full, webhooks get 503 (Zadarma sends again) and Fritz!Box events are logged as "
        "not recorded.",
        _between(1, 65536),
    )
    alarm_percent: int = setting(
        80, "Spool use (percent of max_mb) that raises the alarm (log, /readyz 503).",
        _between(1, 100),
    )
    deadline_seconds: float = setting(
        2.0,
        "An event not committed within this many seconds is spooled (and acknowledged) "
        "instead; its late commit, if any, makes the replay a no-op.",
        _between(0.05, 60),
    )


@dataclass(frozen=True)
class LogSettings:
    format: str = setting(
        "text",
        "'text' for human-readable lines, 'json' for one JSON object per line "
        "(honoured by `dpvoip run` and etc/dpvoip.tac; with plain twistd use "
        "--logger dpvoip.logs.json_observer).",
        _one_of("text", "json"),
    )
    level: str = setting(
        "info", "Lowest level logged.", _one_of("debug", "info", "warn", "error", "critical")
    )


@dataclass(frozen=True)
class DatabaseSettings:
    url: Secret = setting(
        Secret(""),
        "PostgreSQL URL of the CRM's database (attached mode). Empty: dpvoip starts its own "
        "embedded PostgreSQL in state_dir (standalone mode). May hold a password.",
        env="DATABASE_URL",
    )
    mode: str = setting(
        "auto",
        "'auto': standalone when url is empty, attached otherwise. 'standalone': dpvoip "
        "creates the CRM tables it uses itself. 'attached': the CRM owns them; dpvoip checks "
        "they exist and never creates or alters them.",
        _one_of("auto", "standalone", "attached"),
    )
    crm_schema: str = setting(
        "public", "PostgreSQL schema that holds the CRM's tables.", _name
    )
    pool_size: int = setting(4, "Connections in the pool.", _between(1, 64))
    connect_timeout: float = setting(
        5.0, "Seconds to wait for a connection to PostgreSQL.", _between(1, 120)
    )
    keepalives_idle: int = setting(
        30, "Seconds of silence before TCP keepalive probes to PostgreSQL.", _between(1, 7200)
    )
    keepalives_interval: int = setting(
        10, "Seconds between TCP keepalive probes.", _between(1, 600)
    )
    keepalives_count: int = setting(
        3, "Unanswered probes before the connection is declared dead.", _between(1, 60)
    )
    statement_timeout: float = setting(
        10.0, "Seconds a single statement may run before PostgreSQL cancels it.",
        _between(0.1, 600),
    )


@dataclass(frozen=True)
class WebSettings:
    listen: str = setting(
        "tcp:8080:interface=127.0.0.1",
        "Twisted endpoint of the web server. Loopback by default: put the reverse proxy of "
        "the CRM in front of it.",
        _endpoint,
    )
    max_body_bytes: int = setting(
        65536, "Largest request body accepted; larger ones get 413.", _between(1024, 10_485_760)
    )
    request_timeout: float = setting(
        15.0,
        "Seconds a client may take to send one whole request (headers and body); slower "
        "clients are cut off.",
        _between(1, 300),
    )
    idle_timeout: float = setting(
        60.0, "Seconds an idle keep-alive connection stays open.", _between(1, 3600)
    )
    drain_timeout: float = setting(
        3.0,
        "At shutdown, seconds to let requests in flight finish their writes.",
        _between(0, 30),
    )
    max_headers: int = setting(
        100, "Most header lines accepted in one request.", _between(10, 500)
    )
    trusted_proxies: tuple[str, ...] = setting(
        ["127.0.0.1/32", "::1/128"],
        "Reverse proxies whose X-Forwarded-For hop is believed.",
        _networks,
    )
    access_log: bool = setting(
        True, "Log one line per request (method, path without query, status, time)."
    )
    max_connections: int = setting(
        1024,
        "Most open connections at once, trusted proxies' and the Zadarma webhook senders' "
        "not counted; more are closed at once (keep the unit's LimitNOFILE well above).",
        _between(1, 1_000_000),
    )
    max_connections_per_peer: int = setting(
        256,
        "Most open connections from one address at once; more are closed at once. Trusted "
        "proxies are exempt (the reverse proxy is one peer carrying every client: bound it "
        "in the proxy).",
        _between(1, 1_000_000),
    )


@dataclass(frozen=True)
class CrmSettings:
    secret_key: Secret = setting(
        Secret(""),
        "The CRM's Django SECRET_KEY: needed to recognise the CRM's session cookies and JWTs.",
        env="SECRET_KEY",
    )
    jwt_signing_key: Secret = setting(
        Secret(""),
        "The CRM's JWT_SIGNING_KEY when it sets one (else secret_key signs the JWTs).",
        env="JWT_SIGNING_KEY",
    )
    language: str = setting(
        "en", "Language of call log lines and ticket texts.", _one_of("en", "el")
    )
    withheld_label: str = setting(
        "",
        "What a withheld caller's call row shows as its phone number (the CRM refuses a "
        "blank one); at most 20 characters, no digits. Empty: by language, 'withheld' or "
        "'Απόκρυψη'.",
        _marker,
    )
    timezone: str = setting(
        "Europe/Athens", "The office's time zone, for times written in tickets and logs.",
        _time_zone,
    )
    allowed_origins: tuple[str, ...] = setting(
        [],
        "Origins (scheme://host[:port]) allowed to POST click-to-call with the CRM's session "
        "cookie. Empty: the CRM's pages as the browser marks them (Sec-Fetch-Site), or the "
        "host the request was addressed to (Host, or X-Forwarded-Host from the proxy).",
        _origins,
    )
    redis_url: Secret = setting(
        Secret(""),
        "Where the CRM keeps its sessions when it sets REDIS_CACHE_URL (Django's cache "
        "session backend on django-redis): redis://[:password@]host[:port]/db, rediss:// "
        "(TLS), unix:///path/to/socket?db=N. Session cookies are then looked up there first, "
        "then in django_session. Empty: django_session only. May hold a password.",
        _redis_url,
        env="REDIS_CACHE_URL",
    )
    redis_key_prefix: str = setting(
        "logistikocrm",
        "The CRM's cache KEY_PREFIX (CACHES['default']; LogistikoCRM sets 'logistikocrm').",
        _key_prefix,
    )
    redis_key_version: int = setting(
        1, "The CRM's cache VERSION (Django's default 1).", _between(0, 2**31 - 1)
    )
    redis_timeout: float = setting(
        3.0,
        "Seconds a session lookup may wait for Redis (connecting included); then the login "
        "is refused with 503, as when the database does not answer.",
        _between(0.1, 60),
    )


@dataclass(frozen=True)
class TicketSettings:
    withheld: bool = setting(
        False, "Create missed-call tickets for withheld numbers too (each on its own)."
    )
    group_hours: float = setting(
        24.0,
        "A missed call updates an open ticket of the same number created within this many "
        "hours instead of opening a new one.",
        _between(0, 24 * 30),
    )
    urgent_at: int = setting(
        3, "Missed calls of one number in the window that make its ticket urgent.",
        _between(2, 100),
    )
    assign_by_number: dict[str, str] = setting(
        {},
        "Assign tickets of calls to an own number to a CRM user: { \"2107654321\" = "
        "\"anna\" } (the number as the box or Zadarma shows it; the CRM username).",
    )
    assign_by_extension: dict[str, str] = setting(
        {},
        "Assign tickets by the extension that rang or took the call (e.g. the answering "
        "machine): { \"40\" = \"anna\" }.",
    )


@dataclass(frozen=True)
class DirectorySettings:
    region: str = setting(
        "GR",
        "Country of the numbers written in the CRM without a country code.",
        _region,
    )
    own_numbers: tuple[str, ...] = setting(
        [],
        "The office's own numbers (all boxes and Zadarma): never matched to a record.",
        _digits_list,
    )
    refresh_seconds: float = setting(
        15.0,
        "How often records edited in the CRM are re-read (by their update time).",
        _between(1, 60),
    )
    sweep_seconds: float = setting(
        60.0, "How often deleted CRM records are removed from the index.", _between(5, 3600)
    )
    margin_seconds: float = setting(
        60.0,
        "Re-read records updated up to this long before the last refresh: covers clock skew "
        "between the CRM's hosts and transactions committed late.",
        _between(0, 3600),
    )
    page_size: int = setting(
        1000, "Rows read per query while indexing.", _between(100, 100_000)
    )


@dataclass(frozen=True)
class ZadarmaSettings:
    key: Secret = setting(
        Secret(""),
        "Zadarma API key. This section is the provider kind = \"zadarma\", name = "
        "\"zadarma\": its webhook URL is /voip/zd/, and the CRM's connections whose provider "
        "is 'Zadarma' dial through it. More providers (another Zadarma account, another "
        "kind): one [[provider]] table each, with kind, name and the kind's keys (for "
        "kind = \"zadarma\" the keys of this section); another Zadarma provider's webhook "
        "URL is /voip/zd/<name>/. With [[provider]] tables, this section is a provider "
        "only when one of its keys is set (here or in the environment).",
        env="ZADARMA_KEY")
    secret: Secret = setting(
        Secret(""), "Zadarma API secret; also signs the webhooks.", env="ZADARMA_SECRET"
    )
    sandbox: bool = setting(False, "Use Zadarma's sandbox API.")
    timezone: str = setting(
        "",
        "The Zadarma account's time zone (call_start is local to it). Empty: asked from "
        "Zadarma at start when API keys are set, else the daemon's time zone.",
        _time_zone,
    )
    allowed_networks: tuple[str, ...] = setting(
        ["185.45.152.40/30"],
        "Networks Zadarma's webhooks come from; any other sender is refused (403). Add "
        "127.0.0.1/32 for the local demo (`dpvoip zadarma-call`).", _networks
    )
    caller_name: bool = setting(
        True, "Answer NOTIFY_START with the matched caller's name for the phones' display."
    )
    redirect_to_owner: bool = setting(
        False, "Answer NOTIFY_START with a redirect to the extension of the caller's owner."
    )
    create_tickets: bool = setting(False, "Create missed-call tickets for Zadarma calls.")
    max_event_age_hours: float = setting(
        24.0,
        "Webhook events whose call_start (in the account's zone) is more than this many hours "
        "before their arrival are refused as stale (answered 200, logged, counted): a "
        "captured signature stops working after it.", _between(1, 24 * 365 * 100),
    )
    max_event_ahead_minutes: float = setting(
        10.0,
        "Webhook events whose call_start is more than this many minutes after their arrival "
        "are refused (clock skew allowance).", _between(0, 24 * 60),
    )
    journal_days: float = setting(
        DEFAULT_JOURNAL_DAYS,
        "Days Zadarma's webhook events are kept in dpvoip.zadarma_event (with their "
        "signed strings' owners in dpvoip.zadarma_binding), then pruned, hourly, in small "
        "batches. At least a day more than max_event_age_hours (a call's events are judged "
        "against each other while a new one can still be accepted): a shorter value is "
        "refused, and the default is raised to that. 0: kept for ever. The journal is one "
        "for all Zadarma providers: it keeps their events for the longest of them.",
        _between(0, 36500),
    )
    journal_max_events: int = setting(
        64, "Events kept per Zadarma call; further variants are refused and counted.",
        _between(8, 10_000),
    )
    journal_max_kib: int = setting(
        64, "KiB of event forms kept per Zadarma call; further variants are refused.",
        _between(4, 64 * 1024),
    )
    api_url: str = setting(
        "",
        "Base URL of Zadarma's REST API. Empty: https://api.zadarma.com (or the sandbox when "
        "sandbox = true). Set it only for a proxy or the `dpvoip zadarma-sim` fake.",
        _base_url,
    )
    api_timeout: float = setting(
        10.0, "Seconds one API request may take, answer body included.", _between(1, 120)
    )
    api_requests_per_minute: int = setting(
        90, "dpvoip's own limit of API requests per minute (Zadarma allows 100).",
        _between(1, 100),
    )
    api_ca_file: str = setting(
        "", "PEM file of extra certificate authorities to trust for the API (empty: the "
        "system's). The server's name is always verified.",
    )


@dataclass(frozen=True)
class ClickToCallSettings:
    allowed_countries: tuple[str, ...] = setting(
        [],
        "Countries (ISO codes such as \"GR\", \"DE\") that click-to-call may dial. Empty: "
        "only the [directory] region.",
        _regions,
    )
    blocked_prefixes: tuple[str, ...] = setting(
        list(DEFAULT_BLOCKED_PREFIXES),
        "Number prefixes (E.164 with +) never dialled: premium-rate and satellite ranges.",
        _e164_prefixes,
    )
    block_premium: bool = setting(
        True, "Also refuse any number the phone-number metadata classifies as premium-rate."
    )
    per_user_per_minute: int = setting(
        5, "Click-to-call requests one user may make per minute.", _between(1, 100)
    )
    session_cookie: str = setting(
        "sessionid", "Name of the CRM's session cookie (Django's SESSION_COOKIE_NAME).",
        _cookie_name,
    )
    login_url: str = setting(
        "/admin/login/", "Where the CRM's sign-in page is, for the hint shown when nobody is "
        "signed in.",
    )
    recordings: str = setting(
        "staff-or-own",
        "Who gets a link to a call's recording: 'staff-or-own' (CRM staff, and a user one of "
        "whose VoIP connections was a leg of the call) or 'any-user' (every signed-in user).",
        _one_of("staff-or-own", "any-user"),
    )


@dataclass(frozen=True)
class FritzBoxSettings:
    name: str = setting("office", "Short name of the box, part of its calls' ids.", _name)
    host: str = setting("fritz.box", "Host name or address of the box.", _host, env="FRITZ_HOST")
    port: int = setting(1012, "CallMonitor port.", _between(1, 65535), env="FRITZ_PORT")
    timezone: str = setting(
        "Europe/Athens", "Time zone of the box's clock.", _time_zone
    )
    country: str = setting("GR", "Country of the box's lines (for numbers).", _region)
    area_code: str = setting(
        "", "Local area code, without trunk 0, for local numbers dialled without one.",
        _area_code,
    )
    own_numbers: tuple[str, ...] = setting(
        [], "The office's own numbers on this box: never matched to a client.", _digits_list
    )
    answering_machine_extensions: tuple[int, ...] = setting(
        [6, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
        "Extensions that are answering machines: a call they take is a missed call.",
    )
    blocked_threshold_seconds: float = setting(
        2.0,
        "An incoming call that rang this many seconds or less without an answer was "
        "blocked by the box (measured by the lines' arrival where the box's whole-second "
        "times allow it; a RING and DISCONNECT in the same second of the box are always "
        "blocked).",
        _between(0, 30),
    )
    reconnect_initial_seconds: float = setting(
        1.0, "First wait before reconnecting to the box; doubles at each failure.",
        _between(0.05, 60),
    )
    reconnect_max_seconds: float = setting(
        60.0, "Longest wait between reconnection attempts (it never gives up).",
        _between(1, 3600),
    )
    newline_keepalive_seconds: float = setting(
        0.0, "Send a bare newline this often to keep NAT mappings alive (0: never).",
        _between(0, 3600),
    )
    max_open_calls: int = setting(
        64,
        "Most calls followed at once on this box; beyond it the oldest is closed as "
        "interrupted (a box sending RINGs without end cannot grow memory without end).",
        _between(1, 100000),
    )
    clock_tolerance_seconds: float = setting(
        600.0,
        "A line dated further than this from dpvoip's clock (a box just rebooted, a wrong "
        "time zone) is dated by its arrival instead, with a warning. 0: the box's dates "
        "are always believed (replaying old captures).",
        _between(0, 86400),
    )
    tr064_user: str = setting(
        "", "TR-064 user of the box (its call list). Empty: TR-064 off, the CallMonitor "
        "port alone.",
    )
    tr064_password: Secret = setting(Secret(""), "TR-064 password of that user.")
    tr064_tls: bool = setting(
        True, "Speak TR-064 over TLS (the box's self-signed certificate is pinned on first "
        "use). Off: plain HTTP, on a trusted network only.",
    )
    tr064_port: int = setting(
        0, "TR-064 port; 0: 49443 with TLS, 49000 without.", _between(0, 65535),
    )
    tr064_certificate: str = setting(
        "", "SHA-256 fingerprint (hex) the box's TLS certificate must have. Empty: the one "
        "seen first is pinned (in the database) and reported by `dpvoip check`.",
        _fingerprint,
    )
    reconcile_every_seconds: float = setting(
        600.0, "Read the box's call list this often while connected (and after every "
        "(re)connect and at start).", _between(30, 86400),
    )
    call_list_days: int = setting(
        7, "Days of the call list read again when the box's list was reset.",
        _between(1, 999),
    )

    @property
    def tr064(self) -> bool:
        """Whether the box's call list is read (TR-064 credentials are configured)."""
        return bool(self.tr064_user)

    @property
    def tr064_port_used(self) -> int:
        return self.tr064_port or (49443 if self.tr064_tls else 49000)


@dataclass(frozen=True)
class LegacyMonitorSettings:
    token: Secret = setting(
        Secret(""),
        "Bearer token of the old fritz_monitor.py script's endpoint. Empty: endpoint refuses all.",
        env="FRITZ_API_TOKEN",
    )


@dataclass(frozen=True)
class PageSettings:
    client_url: str = setting(
        "/accounting/client/{id}/",
        "The CRM's page of a client, {id} its accounting_clientprofile id: the live page "
        "and the screen pop link a caller's name to it (both CRM versions: "
        "/accounting/client/{id}/).",
        _client_url,
    )
    recent_calls: int = setting(
        50, "Ended calls of today the live page (/voip/) shows, newest first.",
        _between(1, 1000),
    )
    open_tickets: int = setting(
        50, "Open missed-call tickets the live page shows, newest first.", _between(1, 1000),
    )
    popup_for: str = setting(
        "mine",
        "Whom the CRM's screen pop (/voip/popup.js) shows a ringing call to: 'mine' (a "
        "staff user: the calls ringing on one of their voip_connection numbers; any other "
        "user: the calls their event stream carries, their own), or 'everyone' (every "
        "ringing call the user's stream carries).",
        _one_of("mine", "everyone"),
    )


@dataclass(frozen=True)
class LiveSettings:
    watchers: str = setting(
        "everyone-own-calls",
        "Who may watch GET /voip/events: 'staff' (the CRM's staff users only), "
        "'everyone-own-calls' (staff see every call; another signed-in user the calls on "
        "their own voip_connection numbers and extension, and every box), 'everyone' "
        "(every signed-in user sees every call).",
        _one_of("staff", "everyone-own-calls", "everyone"),
    )
    keep_minutes: float = setting(
        60.0,
        "Minutes a live event is kept in dpvoip.live_event: a browser that reconnects "
        "within them gets what it missed; later, it is told to reload.",
        _between(1, 10080),
    )
    heartbeat_seconds: float = setting(
        15.0, "Seconds between keepalive comments on an idle event stream.",
        _between(1, 300),
    )
    max_streams: int = setting(
        200, "Most event streams open at once; one more gets 503.", _between(1, 100000)
    )
    queue_events: int = setting(
        256,
        "Events queued for a stream whose client does not keep up; beyond, the client is "
        "dropped (and counted) rather than dpvoip's memory growing.",
        _between(8, 100000),
    )


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration."""

    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    instance: InstanceSettings = field(default_factory=InstanceSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    log: LogSettings = field(default_factory=LogSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    web: WebSettings = field(default_factory=WebSettings)
    crm: CrmSettings = field(default_factory=CrmSettings)
    directory: DirectorySettings = field(default_factory=DirectorySettings)
    tickets: TicketSettings = field(default_factory=TicketSettings)
    zadarma: ZadarmaSettings = field(default_factory=ZadarmaSettings)
    click_to_call: ClickToCallSettings = field(default_factory=ClickToCallSettings)
    fritzbox: tuple[FritzBoxSettings, ...] = field(
        default_factory=lambda: (FritzBoxSettings(),)
    )
    legacy_monitor: LegacyMonitorSettings = field(default_factory=LegacyMonitorSettings)
    page: PageSettings = field(default_factory=PageSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    #: The ``[[provider]]`` tables (their kinds' settings read); ``all_providers`` adds
    #: the ``[zadarma]`` section's.
    providers: tuple[ProviderConfig, ...] = ()

    @property
    def zadarma_in_force(self) -> bool:
        """Whether the ``[zadarma]`` section is a provider (named ``zadarma``): always
        without ``[[provider]]`` tables (as before there were any), else when one of its
        settings differs from its default (set in the file or the environment)."""
        return not self.providers or self.zadarma != ZadarmaSettings()

    @property
    def all_providers(self) -> tuple[ProviderConfig, ...]:
        """Every configured provider: the ``[zadarma]`` section's first (when in force),
        then the ``[[provider]]`` tables in their order."""
        if not self.zadarma_in_force:
            return self.providers
        from dpvoip.providers.discovery import built_in

        return (ProviderConfig(ZADARMA, built_in("zadarma"), self.zadarma), *self.providers)

    @property
    def standalone(self) -> bool:
        if self.database.mode == "auto":
            return not self.database.url
        return self.database.mode == "standalone"

    @property
    def embedded(self) -> bool:
        """True when dpvoip runs its own PostgreSQL (no URL given)."""
        return not self.database.url

    def state_path(self, base: Path) -> Path:
        return base / self.daemon.state_dir


SECTIONS: dict[str, type[Any]] = {
    "daemon": DaemonSettings,
    "instance": InstanceSettings,
    "spool": SpoolSettings,
    "log": LogSettings,
    "database": DatabaseSettings,
    "web": WebSettings,
    "crm": CrmSettings,
    "directory": DirectorySettings,
    "tickets": TicketSettings,
    "zadarma": ZadarmaSettings,
    "click_to_call": ClickToCallSettings,
    "legacy_monitor": LegacyMonitorSettings,
    "page": PageSettings,
    "live": LiveSettings,
}
LIST_SECTIONS: dict[str, type[Any]] = {"fritzbox": FritzBoxSettings}
#: The list of telephony providers: ``[[provider]]`` tables, each read by its kind.
PROVIDER_SECTION = "provider"
#: The ``[zadarma]`` section's provider's name.
ZADARMA = "zadarma"
#: Names a provider cannot have: the paths of dpvoip's own routes under /voip/ (a kind
#: may serve its provider at /voip/<name>/).
RESERVED_PROVIDER_NAMES = frozenset({"zd", "get-callback", "calls", "static", "events"})

#: Environment variables that are not settings but are ours.
RESERVED_ENV = frozenset({"DPVOIP_CONFIG"})


# --- conversion -------------------------------------------------------------------------

T = TypeVar("T")


def _type_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             Secret: "a string"}
    if typing.get_origin(kind) is tuple:
        return "a list of " + _type_name(typing.get_args(kind)[0]).split(" ", 1)[1] + "s"
    if typing.get_origin(kind) is dict:
        return "a table of strings (key = \"value\")"
    return names.get(kind, str(kind))


def _convert(kind: Any, value: Any, from_env: bool) -> Any:
    """Turn a TOML (or environment string) value into the declared type, or raise ValueError."""
    if typing.get_origin(kind) is dict:
        if from_env:
            pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError
        return dict(value)
    if typing.get_origin(kind) is tuple:
        item_kind = typing.get_args(kind)[0]
        if from_env:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ValueError
        return tuple(_convert(item_kind, item, from_env) for item in value)
    if kind is bool:
        if from_env:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind is int:
        if from_env:
            return int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if kind is float:
        if from_env:
            return float(value.strip())
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError
    if kind is str or kind is Secret:
        if not isinstance(value, str):
            raise ValueError
        return Secret(value) if kind is Secret else value
    raise TypeError(f"unsupported setting type {kind!r}")


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def read_section(cls: type[T], raw: Mapping[str, Any], where: str) -> T:
    """One section (a dataclass of ``setting`` fields) from its raw TOML table, every key
    checked: a ``ConfigError`` starting with ``where`` names the key and what is wrong,
    never a ``Secret``'s value. What a provider kind reads its ``[[provider]]`` table with."""
    return _build(cls, raw, where)


def _build(cls: type[T], raw: Mapping[str, Any], where: str) -> T:
    """Build one section from its raw TOML table, checking every key."""
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            if isinstance(value, FromEnvironment):
                raise ConfigError(f"environment {value.variable}: {where} has no key {key!r}"
                                  f" (known: {', '.join(sorted(known))})")
            raise ConfigError(f"{where} unknown key {key!r} (known: {', '.join(sorted(known))})")
        values[key] = _checked(known[key], hints[key], value, f"{where} {key}", from_env=False)
    return cls(**values)


def _checked(spec: Any, kind: Any, value: Any, where: str, from_env: bool) -> Any:
    if isinstance(value, FromEnvironment):  # a [[provider]] key the environment set
        from_env, where, value = True, f"environment {value.variable} ({where})", str(value)
    try:
        converted = _convert(kind, value, from_env)
    except (ValueError, TypeError):
        got = "" if from_env or kind is Secret else f", got {_toml_type(value)}"
        raise ConfigError(f"{where}: expected {_type_name(kind)}{got}") from None
    check = spec.metadata.get("check")
    problem = check(converted) if check else None
    if problem:
        if kind is Secret:
            problem = "is not valid"
        raise ConfigError(f"{where}: {problem}")
    return converted


def _toml_type(value: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def parse(text: str, source: str = "config") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None


Kinds = Mapping[str, Callable[[], Any]]  # kind name -> its loader (providers.discovery)


def from_toml(data: Mapping[str, Any], source: str = "config", whole: bool = True,
              kinds: Kinds | None = None) -> Config:
    """The file's settings; ``whole=False`` defers the checks that span settings (the
    environment may still supply what the file lacks, e.g. DATABASE_URL). ``kinds``: the
    provider kinds ``[[provider]]`` tables may name (default: the installed ones)."""
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name == PROVIDER_SECTION:
            if not isinstance(table, list) or not all(isinstance(t, dict) for t in table):
                raise ConfigError(f"{source}: [[{name}]] must be an array of tables")
            sections["providers"] = _providers(table, source, kinds)
        elif name in SECTIONS:
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            sections[name] = _build(SECTIONS[name], table, f"{source}: [{name}]")
        elif name in LIST_SECTIONS:
            if not isinstance(table, list) or not all(isinstance(t, dict) for t in table):
                raise ConfigError(f"{source}: [[{name}]] must be an array of tables")
            sections[name] = tuple(
                _build(LIST_SECTIONS[name], item, f"{source}: [[{name}]] #{index + 1}")
                for index, item in enumerate(table)
            )
        else:
            known = sorted([*SECTIONS, *LIST_SECTIONS, PROVIDER_SECTION])
            raise ConfigError(
                f"{source}: unknown section [{name}] (known: {', '.join(known)})"
            )
    config = Config(**sections)
    if whole:
        _check_whole(config, source)
    return config


def _providers(tables: list[dict[str, Any]], source: str,
               kinds: Kinds | None) -> tuple[ProviderConfig, ...]:
    """Each ``[[provider]]`` table's kind found and its settings read by that kind."""
    from dpvoip.providers.discovery import installed, load

    kinds = installed() if kinds is None else kinds
    read: list[ProviderConfig] = []
    for index, table in enumerate(tables):
        where = f"{source}: [[provider]] #{index + 1}"
        kind, name = table.get("kind"), table.get("name")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{where}: kind missing (a string; installed kinds: "
                              f"{', '.join(sorted(kinds))})")
        if not isinstance(name, str):
            raise ConfigError(f"{where}: name missing (a string: the provider's name, as "
                              "the CRM's voip_connection.provider says it, in lower case)")
        problem = _name(name)
        if problem:
            raise ConfigError(f"{where} name: {problem}")
        where = f"{source}: [[provider]] {name!r}"
        try:
            plugin = load(kind, kinds)
        except LookupError as unknown:
            raise ConfigError(f"{where} kind: {unknown.args[0]}") from None
        except Exception as error:  # a broken plugin: named, not a traceback
            raise ConfigError(f"{where} kind: the plugin of kind {kind!r} cannot be "
                              f"loaded: {type(error).__name__}: {error}") from None
        rest = {key: value for key, value in table.items() if key not in ("kind", "name")}
        read.append(ProviderConfig(name, plugin, plugin.read_settings(rest, where)))
    return tuple(read)


def _check_providers(config: Config, source: str) -> None:
    """Provider names: unique, none of a box's (calls are told apart by it) or a route's."""
    boxes = {box.name for box in config.fritzbox}
    names: set[str] = set()
    for provider in config.all_providers:
        name = provider.name
        if name in names:
            if name == ZADARMA and config.zadarma_in_force:
                raise ConfigError(
                    f"{source}: [[provider]] name 'zadarma' is the [zadarma] section's "
                    "provider, in force because one of its keys is set (in [zadarma], "
                    "DPVOIP_ZADARMA_* or ZADARMA_KEY/ZADARMA_SECRET): rename the table, or "
                    "move those keys into it")
            raise ConfigError(f"{source}: [[provider]] name {name!r} is used twice")
        names.add(name)
        if name in boxes:
            raise ConfigError(f"{source}: [[provider]] name {name!r} is also a [[fritzbox]] "
                              "name: calls are told apart by it; rename one")
        if name in RESERVED_PROVIDER_NAMES:
            raise ConfigError(f"{source}: [[provider]] name {name!r} is the path of one of "
                              f"dpvoip's own routes (/voip/{name}/); choose another")


def _check_whole(config: Config, source: str) -> None:
    names = [box.name for box in config.fritzbox]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: [[fritzbox]] name {name!r} is used twice")
    _check_providers(config, source)
    for box in config.fritzbox:
        if box.tr064_user and not box.tr064_password:
            raise ConfigError(f"{source}: [[fritzbox]] {box.name!r}: tr064_user needs "
                              "tr064_password (the box's TR-064 user has one)")
    for provider in config.all_providers:
        _check_journal_days(provider.name, provider.settings, source)
    if config.database.mode == "attached" and not config.database.url:
        raise ConfigError(
            f"{source}: [database] mode 'attached' needs url (or DATABASE_URL)"
        )


def _check_journal_days(name: str, settings: object, source: str) -> None:
    """A Zadarma provider's journal is kept while its calls can still get events. The
    default is raised to that where the window is wider (``retention.kept_days``): a
    configuration from before the setting still starts."""
    if not isinstance(settings, ZadarmaSettings) or settings.journal_days in (
            0, DEFAULT_JOURNAL_DAYS):
        return
    fewest = shortest_journal_days(settings.max_event_age_hours,
                                   settings.max_event_ahead_minutes)
    if settings.journal_days < fewest:
        raise ConfigError(
            f"{source}: provider {name!r} journal_days = {settings.journal_days:g} is too "
            f"short: its events must be kept while their call can still get one "
            f"(max_event_age_hours = {settings.max_event_age_hours:g}, and a day): at least"
            f" {fewest:.2f}, or 0 to keep them for ever")


#: A ``[[provider]]`` table's keys in the environment: ``DPVOIP_PROVIDER_<NAME>_<KEY>``.
PROVIDER_ENV = "DPVOIP_PROVIDER_"


class FromEnvironment(str):
    """A ``[[provider]]`` table's value that the environment gave: the kind reads its table
    with ``read_section``, which converts it as an environment string (``true``, ``a,b``)
    and names its variable in errors. Its text is never shown (it may be a secret)."""

    variable: str

    def __new__(cls, value: str, variable: str) -> FromEnvironment:
        made = super().__new__(cls, value)
        made.variable = variable
        return made

    def __repr__(self) -> str:
        return f"FromEnvironment({self.variable})"


def provider_env_prefix(name: str) -> str:
    """Where a provider's keys start in the environment (its name in capitals, ``-`` as
    ``_``): ``DPVOIP_PROVIDER_BRANCH_`` for ``branch``."""
    return f"{PROVIDER_ENV}{name.upper().replace('-', '_')}_"


def _provider_environment(data: Mapping[str, Any], environ: Mapping[str, str]
                          ) -> tuple[dict[str, Any], frozenset[str]]:
    """The file's ``[[provider]]`` tables with the keys the environment sets for them
    (a provider is declared by its table, with its kind and name; the environment adds
    or replaces its other keys, its secrets above all); the variables used. Of two names
    one of which begins the other, the longer takes the variables that fit it; two names
    that are one in the environment (``a-b``, ``a_b``) cannot be told apart: refused."""
    tables = data.get(PROVIDER_SECTION)
    if not isinstance(tables, list):
        return dict(data), frozenset()  # no tables, or a shape from_toml refuses
    updated = [dict(table) if isinstance(table, dict) else table for table in tables]
    owners: dict[str, list[dict[str, Any]]] = {}
    for table in updated:
        if isinstance(table, dict) and isinstance(table.get("name"), str):
            owners.setdefault(provider_env_prefix(table["name"]), []).append(table)
    used: set[str] = set()
    for variable, value in environ.items():
        if not variable.startswith(PROVIDER_ENV):
            continue
        # The longest name wins: DPVOIP_PROVIDER_A_B_KEY is a_b's key, not a's b_key.
        prefix = max((p for p in owners if variable.startswith(p)), key=len, default=None)
        if prefix is None:
            continue  # no such provider: refused as an unknown setting
        if len(owners[prefix]) > 1:
            names = ", ".join(repr(table["name"]) for table in owners[prefix])
            raise ConfigError(f"environment {variable}: could set a key of the providers "
                              f"{names} (one name in the environment): rename one of them")
        table = owners[prefix][0]
        key = variable[len(prefix):].lower()
        if key in ("", "kind", "name"):
            raise ConfigError(f"environment {variable}: a provider's kind and name are "
                              "written in its [[provider]] table")
        table[key] = FromEnvironment(value, variable)
        used.add(variable)
    return {**data, PROVIDER_SECTION: updated}, frozenset(used)


def _env_name(section: str, key: str) -> str:
    return f"DPVOIP_{section.upper()}_{key.upper()}"


def _from_environment(
    cls: type[Any], section: str, label: str, environ: Mapping[str, str], known: set[str]
) -> dict[str, Any]:
    """The settings of one section that the environment sets (names recorded in ``known``)."""
    hints = _hints(cls)
    changes: dict[str, Any] = {}
    for spec in fields(cls):
        for env_name in (_env_name(section, spec.name), spec.metadata.get("env", "")):
            if not env_name:
                continue
            known.add(env_name)
            if env_name in environ:
                where = f"environment {env_name} ({label} {spec.name})"
                changes[spec.name] = _checked(
                    spec, hints[spec.name], environ[env_name], where, from_env=True
                )
    return changes


def apply_environment(
    config: Config, environ: Mapping[str, str], source: str = "environment",
    used: frozenset[str] = frozenset(),
) -> Config:
    """Apply ``DPVOIP_<SECTION>_<KEY>`` and the CRM's own variable names over the file.
    The ``[[fritzbox]]`` variables (and FRITZ_HOST, FRITZ_PORT) set the first box.
    ``used``: the variables already read into the ``[[provider]]`` tables."""
    known: set[str] = set(RESERVED_ENV) | used
    updated: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        changes = _from_environment(cls, section, f"[{section}]", environ, known)
        if changes:
            updated[section] = replace(getattr(config, section), **changes)
    box_changes = _from_environment(
        FritzBoxSettings, "fritzbox", "first [[fritzbox]]", environ, known
    )
    if box_changes:
        boxes = list(config.fritzbox)
        boxes[0:1] = [replace(boxes[0] if boxes else FritzBoxSettings(), **box_changes)]
        updated["fritzbox"] = tuple(boxes)
    for name in environ:
        if name.startswith("DPVOIP_") and name not in known:
            raise ConfigError(f"environment {name}: unknown setting")
    result = replace(config, **updated)
    _check_whole(result, source)
    return result


def load(path: Path | None, environ: Mapping[str, str], kinds: Kinds | None = None) -> Config:
    """Load the file (when given) and apply the environment. Raises ConfigError.
    ``kinds``: the provider kinds (default: the installed ones)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the config file: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
        data = parse(text, source)
    data, used = _provider_environment(data, environ)
    return apply_environment(from_toml(data, source, whole=False, kinds=kinds), environ,
                             source, used)


def describe() -> list[tuple[str, str, Any, str, str]]:
    """(section, key, default, doc, env names) for every setting: docs and the example file."""
    rows: list[tuple[str, str, Any, str, str]] = []
    for section, cls in [*SECTIONS.items(), *LIST_SECTIONS.items()]:
        for spec in fields(cls):
            default = (
                spec.default if spec.default is not MISSING
                else spec.default_factory()  # type: ignore[operator]
            )
            envs = ", ".join(e for e in (_env_name(section, spec.name), spec.metadata["env"]) if e)
            rows.append((section, spec.name, default, spec.metadata["doc"], envs))
    return rows


__all__ = [
    "Config",
    "ConfigError",
    "CrmSettings",
    "DaemonSettings",
    "DatabaseSettings",
    "DirectorySettings",
    "FritzBoxSettings",
    "InstanceSettings",
    "LegacyMonitorSettings",
    "LogSettings",
    "PageSettings",
    "Secret",
    "TicketSettings",
    "WebSettings",
    "ZadarmaSettings",
    "describe",
    "instance_name",
    "load",
    "read_section",
]
