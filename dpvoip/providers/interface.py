"""The provider interface: what a telephony provider is to dpvoip, as plain types.

A *kind* (``ProviderKind``) is a plugin: Zadarma, an Asterisk manager client, a test's
echo. The configuration names one or more providers of each kind (``[[provider]]``
tables: ``kind``, ``name`` and the kind's own keys); the kind reads its table, and at
start builds a ``Provider`` from those settings and the tools the composition root
hands it (``ProviderTools``). A built provider is plain data: its services, its web
parts, how it dials for click-to-call, how it links a recording, what it tells
``/readyz``, ``/metrics``. Every part is optional, so that a provider that only records
calls (or only dials) says nothing about the rest.

Why plain data and Protocols: the composition root wires what a provider offers without
knowing its kind, and a kind's tests build one with fakes for every tool. Nothing here
does I/O or imports the reactor; heavy types are named for the type checker only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from dpvoip.core.happenings import Happening
from dpvoip.core.numbers import Dialling, without_formatting

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from twisted.application.service import IService
    from twisted.internet.defer import Deferred
    from twisted.web.resource import IResource

    from dpvoip.calls.ingest import Origin
    from dpvoip.store.database import Store
    from dpvoip.web.sources import Network

S = TypeVar("S")


# -- errors the user is answered with ---------------------------------------------------


class ProviderError(Exception):
    """A provider could not do what click-to-call asked (dial, link a recording).

    ``status`` is the HTTP status the user is answered with and ``message`` what they are
    told (so it must never hold a secret); ``retry_after`` (seconds) when the provider said
    when to try again. A kind raises a subclass with its own status (Zadarma's errors are
    ``ZadarmaApiError`` errors)."""

    status = 502

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class RecordingGone(Exception):
    """The provider no longer has this recording (its message is shown to the user)."""


# -- what a provider offers -------------------------------------------------------------


@dataclass(frozen=True)
class DialRequest:
    """One click-to-call, already checked: the connection is the user's own and active,
    the number passed the dialling policy and the user is within their rate."""

    line: str  # the user's own line, as voip_connection.number holds it
    number: str  # what to call then, E.164 ("+302101234567")
    sip: str = ""  # the extension or SIP number whose caller id to use, when asked
    predicted: bool = False  # ring the number first, the user when it answers
    connection_type: str = ""  # voip_connection.type: "pbx", "sip", "voip"
    user: str = ""  # the CRM username, for the provider's log lines

    @property
    def ring_first(self) -> str:
        """The user's line without what people write between its digits."""
        return without_formatting(self.line)


class Dialler(Protocol):
    """How a provider places a click-to-call: the user's own line first, then the number."""

    def refusal(self, call: DialRequest) -> str | None:
        """Why this provider cannot place ``call`` (the user is answered 400 with it and
        nothing is dialled), else None. Pure: no request is made."""
        ...

    def dial(self, call: DialRequest) -> Awaitable[None]:
        """Ring ``call.ring_first``, then ``call.number``; a ``ProviderError`` (its status
        and message are the user's answer) when the provider refuses or does not answer."""
        ...


class RecordingLinks(Protocol):
    """How a provider hands out a recording kept under its own id."""

    def recording_link(self, recording: str) -> Awaitable[str]:
        """A fresh (temporary) link to ``recording``; ``RecordingGone`` when the provider
        no longer has it, a ``ProviderError`` when it cannot say."""
        ...


@dataclass(frozen=True)
class WebPart:
    """A provider's HTTP resource, served at ``/voip/<path>/``.

    ``resource`` is a leaf: it gets every request whose path is ``/voip/<path>`` or lies
    below ``/voip/<path>/`` (``request.path`` is the whole path) and answers its own
    404s and 405s. ``senders`` are networks (CIDR text) that post to it in bulk (a cloud
    PBX's webhooks): the web server's per-address connection limits do not count them.
    """

    path: str
    resource: IResource
    senders: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProviderHealth:
    """What ``/readyz`` shows of a provider: ``details`` (JSON-able) under its name, and
    ``warnings`` (each a line saying what to do). A provider never makes dpvoip "not
    ready": the database is what readiness is about, and the other sources go on."""

    details: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def _healthy() -> ProviderHealth:
    return ProviderHealth()


def _no_metrics() -> Iterable[Metric]:
    return ()


@dataclass(frozen=True, kw_only=True)
class Provider:
    """A built provider: the parts the composition root wires, each optional.

    - ``services``: started after the spool's replay is under way and the boxes, before
      the web; stopped in the reverse order (a provider's connections close after the web
      stopped taking requests).
    - ``web``: its resources under ``/voip/``.
    - ``dialler``: click-to-call for a ``voip_connection`` whose ``provider`` column is
      this provider's name (compared case-insensitively).
    - ``recordings``: links to recordings kept under this provider's ids.
    - ``origins``: where its happenings come from (``calls.ingest.Origin``, one name each):
      the spool's replay applies a spooled happening with the origin of that name, so
      every origin a provider submits with must be listed here. An origin with
      ``sales_side=True`` (a PBX's, as Asterisk's) has its finished calls write the CRM's
      sales side (``was_in_touch``, the active deal's workflow line), as Zadarma's do.
    - ``health``: its entry in ``/readyz``; ``metrics``: its Prometheus families (families
      of one name from several providers are merged into one).
    """

    name: str
    kind: str
    services: Sequence[IService] = ()
    web: Sequence[WebPart] = ()
    dialler: Dialler | None = None
    recordings: RecordingLinks | None = None
    origins: Sequence[Origin] = ()
    health: Callable[[], ProviderHealth] = _healthy
    metrics: Callable[[], Iterable[Metric]] = _no_metrics


# -- what the composition root hands a kind ---------------------------------------------


class Recorder(Protocol):
    """The durable way into the call pipeline (``spool.durable.DurableIngest``): the
    happening is committed within the deadline, or spooled and replayed later. Fires once
    it is one or the other; ``NotRecorded`` when the spool is full."""

    def submit(self, happening: Happening, origin: Origin) -> Deferred[None]: ...


@dataclass(frozen=True)
class ProviderTools:
    """Everything a kind may build a provider from. Only what the root owns: a provider
    builds its own clients, protocols and services from these."""

    reactor: Any  # IReactorTCP, IReactorTime, ...: the one reactor, never the global
    recorder: Recorder
    store: Store  # the database; a kind's SQL lives in its own module under dpvoip/store/
    crm_schema: str  # the schema of the CRM's tables
    region: Dialling  # how numbers without a country code are read ([directory] region)
    own_numbers: frozenset[str]  # the office's own numbers (E.164): never a caller
    office_zone: tzinfo  # [crm] timezone
    trusted_proxies: Sequence[Network]  # whose X-Forwarded-For is believed ([web])
    state_folder: Path  # dpvoip's state folder (a kind may keep a file of its own there)
    schema_prepared: Callable[[], Deferred[None]]  # fires once the schema is prepared
    spool_replayed: Callable[[], Deferred[None]]  # fires once the last run's spool is in


# -- the plugin --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderConfig:
    """One configured provider: its name, its kind's plugin and the settings that plugin
    read from its ``[[provider]]`` table (a ``repr`` of settings masks its secrets when
    they are ``config.Secret`` values, as they must be)."""

    name: str
    plugin: ProviderKind[Any]
    settings: Any

    @property
    def kind(self) -> str:
        return self.plugin.kind


class ProviderKind(Protocol[S]):
    """A kind of provider: what a plugin's entry point (group ``dpvoip.providers``, the
    entry point's name the kind) gives. ``S`` is the kind's settings type."""

    #: The name ``[[provider]]`` tables give as ``kind`` (lower case).
    kind: str

    def read_settings(self, table: Mapping[str, Any], where: str) -> S:
        """The settings of one ``[[provider]]`` table (its ``kind`` and ``name`` removed),
        checked. A problem is a ``config.ConfigError`` starting with ``where`` and naming
        the key, never a secret's value (``config.read_section`` does all of that for a
        dataclass of ``config.setting`` fields)."""
        ...

    def check_lines(self, name: str, settings: S) -> Sequence[str]:
        """What ``dpvoip check`` says of this provider from its settings alone (it builds
        nothing and connects to nothing): one line each, no secret."""
        ...

    def build(self, name: str, settings: S, tools: ProviderTools) -> Provider:
        """The provider ``name``: its objects made, nothing started (its services start
        when the daemon starts them)."""
        ...
