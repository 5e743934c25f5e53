"""One Asterisk's settings: a plain dataclass, read from a mapping (a ``[[provider]]``
table of ``kind = "asterisk"``, or a test's dict) with every key checked.

A bad value is refused with the key's name and what is wrong (``asterisk office port:
must be between 1 and 65535``), never with the secret's value. The declarations use the
configuration's own ``setting`` (default, one line of documentation, check), so that
``dpvoip example-config`` can document them like every other section.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpvoip.asterisk.calls import PbxRules
from dpvoip.config import (
    ConfigError,
    Secret,
    _area_code,
    _between,
    _build,
    _host,
    _name,
    _one_of,
    _region,
    setting,
)

__all__ = ["AsteriskSettings", "ConfigError", "endpoint_description", "read_settings",
           "rules_of"]


def _username(value: Any) -> str | None:
    if not value or not re.fullmatch(r"[A-Za-z0-9_.@-]{1,80}", value):
        return "must be the manager.conf user's name (letters, digits, _ . @ -)"
    return None


def _secret(value: Any) -> str | None:
    text = value.reveal() if isinstance(value, Secret) else str(value)
    if not text or "\r" in text or "\n" in text:
        return "must be the manager.conf user's secret (not empty, one line)"
    return None


def _events(value: Any) -> str | None:
    if not re.fullmatch(r"on|off|[a-z]+(,[a-z]+)*", value):
        return "must be on, off, or event classes such as 'call,cdr'"
    return None


def _pattern(value: Any) -> str | None:
    try:
        compiled = re.compile(value)
    except re.error as error:
        return f"is not a regular expression ({error})"
    if compiled.groups < 1:
        return "needs a group holding the extension, e.g. ^PJSIP/(\\d+)-[0-9a-f]+$"
    return None


def _words(value: Any) -> str | None:
    for item in value:
        if not item or any(c.isspace() for c in item):
            return f"{item!r}: each must be a word without spaces"
    return None


def _technology(value: Any) -> str | None:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,15}", value):
        return "must be a channel technology such as PJSIP, SIP or IAX2"
    return None


def _context(value: Any) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,79}", value):
        return "must be a dialplan context name"
    return None


@dataclass(frozen=True)
class AsteriskSettings:
    name: str = setting("pbx", "Short name of the PBX, part of its calls' ids.", _name)
    host: str = setting("127.0.0.1", "Host name or address of the Asterisk.", _host)
    port: int = setting(5038, "Manager Interface port (5039: TLS).", _between(1, 65535))
    tls: bool = setting(False, "Connect with TLS (manager.conf tlsenable), checking the "
                        "certificate against the system's authorities.")
    username: str = setting("dpvoip", "The manager.conf user.", _username)
    secret: Secret = setting(Secret(""), "That user's secret.", _secret)
    auth: str = setting("md5", "How to log in: md5 (Challenge, the secret never sent) "
                        "or plain.", _one_of("md5", "plain"))
    events: str = setting("call,cdr", "Event classes asked for at login.", _events)
    country: str = setting("GR", "Country of the trunks' numbers.", _region)
    area_code: str = setting("", "Local area code, without trunk 0.", _area_code)
    trunk_patterns: tuple[str, ...] = setting(
        [], "Channel names of the trunks (shell patterns, e.g. 'PJSIP/provider-*'); "
        "empty: every channel that is not a phone's or Local is a trunk's.", _words)
    incoming_contexts: tuple[str, ...] = setting(
        ["from-trunk", "from-pstn", "from-external", "from-did-direct"],
        "Contexts an incoming call from a trunk starts in.", _words)
    extension_pattern: str = setting(
        r"^(?:PJSIP|SIP|IAX2)/(\d{2,6})-[0-9A-Fa-f]+$",
        "A phone's channel name; its group 1 is the extension.", _pattern)
    voicemail_contexts: tuple[str, ...] = setting(
        ["voicemail", "macro-vm", "sub-vm", "vm"],
        "Contexts where a call reaches voicemail.", _words)
    voicemail_extensions: tuple[str, ...] = setting(
        ["vmu*", "vmb*", "vms*", "vmi*", "*97", "*98"],
        "Extensions (shell patterns) where a call reaches voicemail.", _words)
    originate_technology: str = setting(
        "PJSIP", "Click-to-call rings the user's phone as <technology>/<extension>.",
        _technology)
    originate_context: str = setting(
        "from-internal", "The context the number is dialled in (its outbound routes).",
        _context)
    originate_number: str = setting(
        "local", "How click-to-call's number is given to originate_context: local (as "
        "the office's phones dial it: national in country, its international prefix "
        "elsewhere) or e164 (+ and digits).", _one_of("local", "e164"))
    originate_timeout_seconds: float = setting(
        30.0, "How long the user's phone rings for click-to-call.", _between(5, 300))
    action_timeout_seconds: float = setting(
        10.0, "How long an answer to an action (login, originate) is awaited.",
        _between(1, 120))
    keepalive_seconds: float = setting(
        20.0, "A Ping this often; no answer within action_timeout_seconds: the "
        "connection is dead and is made again.", _between(1, 3600))
    reconnect_initial_seconds: float = setting(
        1.0, "First wait before reconnecting; doubles at each failure.", _between(0.05, 60))
    reconnect_max_seconds: float = setting(
        60.0, "Longest wait between reconnection attempts (it never gives up).",
        _between(1, 3600))
    max_open_calls: int = setting(
        64, "Most calls followed at once; beyond, the oldest is closed as interrupted.",
        _between(1, 100000))
    max_channels: int = setting(
        512, "Most channels followed at once (the same).", _between(8, 1000000))

    def __repr__(self) -> str:  # the secret's own repr is masked; say so plainly too
        return f"AsteriskSettings(name={self.name!r}, host={self.host!r}, port={self.port})"


def read_settings(values: Mapping[str, Any], where: str = "asterisk") -> AsteriskSettings:
    """The settings from ``values`` (TOML types; ``secret`` a string or a ``Secret``),
    every key checked; ``ConfigError`` names ``where``, the key and the problem."""
    raw = dict(values)
    secret = raw.get("secret")
    if isinstance(secret, Secret):
        raw["secret"] = secret.reveal()
    name = raw.get("name")
    label = f"{where} {name}" if isinstance(name, str) and name else where
    settings = _build(AsteriskSettings, raw, label)
    if not settings.secret:
        raise ConfigError(f"{label} secret: must be set (the manager.conf user's secret)")
    if settings.reconnect_max_seconds < settings.reconnect_initial_seconds:
        raise ConfigError(f"{label} reconnect_max_seconds: must not be below "
                          "reconnect_initial_seconds")
    return settings


def rules_of(settings: AsteriskSettings) -> PbxRules:
    """What the call follower needs of the settings."""
    return PbxRules(
        name=settings.name,
        trunk_patterns=settings.trunk_patterns,
        incoming_contexts=settings.incoming_contexts,
        extension_pattern=settings.extension_pattern,
        voicemail_contexts=settings.voicemail_contexts,
        voicemail_extensions=settings.voicemail_extensions,
        max_open=settings.max_open_calls,
        max_channels=settings.max_channels,
    )


def endpoint_description(settings: AsteriskSettings) -> str:
    """The Twisted client endpoint string for the PBX (``tls:`` or ``tcp:``), the host
    escaped (an IPv6 address holds colons)."""
    host = settings.host.strip("[]").replace("\\", "\\\\").replace(":", "\\:")
    if settings.tls:
        return f"tls:host={host}:port={settings.port}:timeout=10"
    return f"tcp:host={host}:port={settings.port}:timeout=10"
