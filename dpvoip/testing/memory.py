"""In-memory stand-ins for what the web routes reach through their services: the CRM's
accounts, the click-to-call tables, Zadarma's API, the durable ingest.

Like ``treq.testing``, they ship with the package, so that anything built on dpvoip's
services (and dpvoip's own tests) can drive the real ``Logins``, ``ClickToCall`` and
``CallbackPages`` without PostgreSQL or a network. Each fits the Protocol its consumer
declares (``click_to_call.ports``, ``web.zadarma.Recorder``) and behaves like the real one
on the points the routes depend on:

- ``MemoryAccounts``: an expired or unknown session is not found; a revoked or unknown
  token is not found; a token of an inactive user is found (``Logins`` refuses it); the
  password hash comes with ``account`` and not with ``use_token``.
- ``MemoryCallbacks``: only the owner's active connections, lowest id first; every
  request kept in ``records`` (a claimed one as ``pending`` until its outcome is
  recorded over it); a claim counts the user's earlier claims in the window as the
  table does; a call with no recording has none.
- ``MemoryZadarmaApi``: every callback asked is kept (with the parameters the real client
  would sign), answered from a script of the same exceptions the real client raises
  (``refused``, ``unreachable``, ``rate_limited``, ``timed_out``, ``bad_answer``).
- ``MemoryRecorder``: an event already recorded is a duplicate, as the journal's unique
  key says; a full spool is ``NotRecorded``.

Setting ``unreachable`` on a store makes every call fail as a database that does not
answer (``DatabaseUnreachable``). Times come from the clock each is given.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from dpvoip.calls.ingest import ZadarmaContext, ZadarmaOutcome
from dpvoip.click_to_call.errors import DatabaseUnreachable
from dpvoip.core.matching import Client, Match
from dpvoip.crm.logins import api_token_hash, new_api_token
from dpvoip.store.accounts import Account
from dpvoip.store.callbacks import (
    PENDING,
    PENDING_MESSAGE,
    CallbackRequest,
    Claim,
    ConnectionRow,
)
from dpvoip.store.tokens import TokenError
from dpvoip.zadarma import api
from dpvoip.zadarma.events import ZadarmaEvent
from dpvoip.zadarma.signing import php_query

#: What a store set ``unreachable`` fails with (as ``from_database`` would say it).
DOWN = "the memory store is unreachable"


# --- the CRM's accounts -------------------------------------------------------------------


@dataclass
class _Session:
    data: str
    expires_at: float


@dataclass
class _Token:
    id: int
    user_id: int
    label: str
    revoked: bool = False
    last_used_at: float | None = None


class MemoryAccounts:
    """The CRM's users and Django sessions and dpvoip's API tokens (an ``AccountStore``).

    Session data is kept as given: sign it as Django does (the tests have a builder), so
    that ``Logins`` checks it exactly as it checks the CRM's."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self.users: dict[int, Account] = {}
        self.sessions: dict[str, _Session] = {}
        self.tokens: dict[str, _Token] = {}  # by the token's SHA-256, as stored
        self.unreachable = False

    # -- what a test sets up ---------------------------------------------------------------

    def add_user(self, username: str, *, password: str = "", first_name: str = "",
                 last_name: str = "", is_active: bool = True) -> int:
        """A CRM user (``password`` is Django's hash); its id."""
        user_id = next(self._ids)
        self.users[user_id] = Account(user_id, username, first_name, last_name, is_active,
                                      password)
        return user_id

    def change_user(self, user_id: int, *, password: str | None = None,
                    is_active: bool | None = None) -> None:
        """What the CRM's admin does to a user: a new password, (de)activation."""
        user = self.users[user_id]
        if password is not None:
            user = replace(user, password=password)
        if is_active is not None:
            user = replace(user, is_active=is_active)
        self.users[user_id] = user

    def add_session(self, session_data: str, lifetime: float = 86400.0,
                    key: str | None = None) -> str:
        """A session row that expires ``lifetime`` seconds from now; its key (the cookie)."""
        key = key if key is not None else secrets.token_hex(16)
        self.sessions[key] = _Session(session_data, self._clock.seconds() + lifetime)
        return key

    def issue_token(self, user_id: int, label: str = "") -> tuple[int, str]:
        """(id, token) for an active user, as ``store.tokens.create_token``."""
        user = self.users.get(user_id)
        if user is None or not user.is_active:
            raise TokenError(f"no active CRM user with id {user_id}")
        token, digest = new_api_token()
        token_id = next(self._ids)
        self.tokens[digest] = _Token(token_id, user_id, label)
        return token_id, token

    def revoke_token(self, token_id: int) -> bool:
        """True when the token was live and is now revoked."""
        for token in self.tokens.values():
            if token.id == token_id and not token.revoked:
                token.revoked = True
                return True
        return False

    def last_used(self, token: str) -> float | None:
        """When ``token`` was last accepted (clock seconds), None if never."""
        return self.tokens[api_token_hash(token)].last_used_at

    # -- the AccountStore ------------------------------------------------------------------

    def _reachable(self) -> None:
        if self.unreachable:
            raise DatabaseUnreachable(DOWN)

    async def session_data(self, session_key: str) -> str | None:
        self._reachable()
        session = self.sessions.get(session_key)
        if session is None or session.expires_at <= self._clock.seconds():
            return None
        return session.data

    async def account(self, user_id: int) -> Account | None:
        self._reachable()
        return self.users.get(user_id)

    async def use_token(self, token_sha256: str) -> Account | None:
        self._reachable()
        token = self.tokens.get(token_sha256)
        if token is None or token.revoked:
            return None
        token.last_used_at = self._clock.seconds()
        user = self.users.get(token.user_id)
        return None if user is None else replace(user, password=None)


# --- the click-to-call tables -------------------------------------------------------------


@dataclass
class _Connection:
    row: ConnectionRow
    owner_id: int
    active: bool


class MemoryCallbacks:
    """Users' VoIP connections, the record of every request, the calls' recordings (a
    ``CallbackStore``)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._connections: dict[int, _Connection] = {}
        self.records: list[CallbackRequest] = []  # a request's id: its place, from 1
        self._counted: dict[int, tuple[int, float]] = {}  # request id -> (user, time)
        self._recordings: dict[str, str] = {}  # dpvoip's call id -> Zadarma's recording
        self._crm_calls: dict[int, str] = {}  # the CRM's call id -> dpvoip's call id
        self._legs: dict[str, tuple[str, ...]] = {}  # dpvoip's call id -> its office side
        #: The CRM's staff (``auth_user.is_staff``): they may hear every recording.
        self.staff: set[int] = set()
        self.unreachable = False
        #: Raised by ``record`` (and nothing kept) when set: a write that fails.
        self.record_error: Exception | None = None

    # -- what a test sets up ---------------------------------------------------------------

    def add_connection(self, owner_id: int, number: str, *, callerid: str = "",
                       provider: str = "Zadarma", type: str = "pbx",
                       active: bool = True) -> int:
        connection_id = next(self._ids)
        self._connections[connection_id] = _Connection(
            (connection_id, type, number, callerid, provider), owner_id, active)
        return connection_id

    def set_active(self, connection_id: int, active: bool) -> None:
        self._connections[connection_id].active = active

    def add_call(self, call_id: str, recording: str = "", crm_call_id: int | None = None,
                 legs: tuple[str, ...] = ()) -> None:
        """A call dpvoip recorded (``recording``: Zadarma's id of its recording, or none),
        the CRM's id of it when the CRM has it, and the numbers of its office side
        (``legs``: a user with a connection of one of them may hear it)."""
        self._recordings[call_id] = recording
        self._legs[call_id] = legs
        if crm_call_id is not None:
            self._crm_calls[crm_call_id] = call_id

    # -- the CallbackStore -----------------------------------------------------------------

    def _reachable(self) -> None:
        if self.unreachable:
            raise DatabaseUnreachable(DOWN)

    async def connections(self, owner_id: int) -> list[ConnectionRow]:
        self._reachable()
        return [c.row for _, c in sorted(self._connections.items())
                if c.owner_id == owner_id and c.active]

    async def own_connection(self, connection_id: int, owner_id: int) -> ConnectionRow | None:
        self._reachable()
        found = self._connections.get(connection_id)
        if found is None or found.owner_id != owner_id or not found.active:
            return None
        return found.row

    async def claim(self, pending: CallbackRequest, at: float, window: float,
                    decide: Callable[[list[float]], float | None]) -> Claim:
        self._reachable()
        if pending.user_id is None:
            raise ValueError("only a signed-in user's request is counted")
        counted = sorted(t for user, t in self._counted.values()
                         if user == pending.user_id and t > at - window)
        wait = decide(counted)
        if wait is not None:
            return Claim(None, wait)
        self.records.append(replace(pending, result=PENDING, http_status=0,
                                    message=PENDING_MESSAGE))
        self._counted[len(self.records)] = (pending.user_id, at)
        return Claim(len(self.records))

    async def record(self, request: CallbackRequest, claimed: int | None = None) -> None:
        self._reachable()
        if self.record_error is not None:
            raise self.record_error
        if claimed is None:
            self.records.append(request)
        else:
            self.records[claimed - 1] = request

    async def recording_of_crm_call(self, crm_call_id: int,
                                    viewer: int | None) -> str | None:
        self._reachable()
        call_id = self._crm_calls.get(crm_call_id)
        return self._visible(call_id, viewer) if call_id is not None else None

    async def recording_of_call(self, call_id: str, viewer: int | None) -> str | None:
        self._reachable()
        return self._visible(call_id, viewer)

    def _visible(self, call_id: str, viewer: int | None) -> str | None:
        recording = self._recordings.get(call_id) or None
        if recording is None or viewer is None or viewer in self.staff:
            return recording
        mine = {"".join(filter(str.isdigit, c.row[2])) for c in self._connections.values()
                if c.owner_id == viewer}
        legs = {"".join(filter(str.isdigit, leg)) for leg in self._legs.get(call_id, ())}
        return recording if mine & legs - {""} else None


# --- Zadarma's API ------------------------------------------------------------------------


@dataclass(frozen=True)
class AskedCallback:
    """One callback dpvoip asked Zadarma for."""

    from_number: str
    to_number: str
    sip: str = ""
    predicted: bool = False

    @property
    def params(self) -> dict[str, str | int]:
        """The parameters as the real client signs and sends them."""
        params: dict[str, str | int] = {"from": self.from_number, "to": self.to_number}
        if self.sip:
            params["sip"] = self.sip
        if self.predicted:
            params["predicted"] = 1
        return params

    @property
    def query(self) -> str:
        """The signed query string, byte for byte as the real client sends it."""
        return php_query(self.params)


def refused(message: str) -> api.ZadarmaRefused:
    """Zadarma said no (``status: error``): its message is shown, answered 502."""
    return api.ZadarmaRefused(message)


def unreachable(reason: str = "Connection refused") -> api.ZadarmaUnreachable:
    """No connection to Zadarma: 502."""
    return api.ZadarmaUnreachable(f"cannot connect to Zadarma: {reason}")


def rate_limited(seconds: float) -> api.ZadarmaRateLimited:
    """Zadarma's rate limit, reset in ``seconds``: 429 with Retry-After."""
    return api.ZadarmaRateLimited(
        f"Zadarma's rate limit is reached; try again in {math.ceil(seconds)} s", seconds)


def timed_out(seconds: float) -> api.ZadarmaTimeout:
    """Zadarma did not answer within the client's deadline: 504."""
    return api.ZadarmaTimeout(f"Zadarma did not answer within {seconds:g} s")


def bad_answer(method: str = "/v1/request/callback/", code: int = 502) -> api.ZadarmaBadAnswer:
    """Something that is not Zadarma's JSON (a proxy's error page): 502."""
    return api.ZadarmaBadAnswer(f"Zadarma answered {method} with HTTP {code} and no JSON")


class MemoryZadarmaApi:
    """Zadarma's REST API as dpvoip uses it (a ``ZadarmaClient``): nothing is sent
    anywhere, every request is kept, and the next answers can be scripted failures."""

    def __init__(self, clock: IReactorTime, *, configured: bool = True,
                 zone: str = "UTC+3") -> None:
        self._clock = clock
        self._configured = configured
        self.zone = zone
        self.callbacks: list[AskedCallback] = []
        self.recordings_asked: list[str] = []
        self._links: dict[str, str] = {}
        self._script: deque[api.ZadarmaApiError] = deque()

    @property
    def configured(self) -> bool:
        return self._configured

    def fail_next(self, error: api.ZadarmaApiError, times: int = 1) -> None:
        """The next ``times`` requests (of any method) fail with ``error``."""
        self._script.extend([error] * times)

    def add_recording(self, recording: str, link: str = "") -> None:
        """Zadarma keeps the recording ``recording`` (at ``link``, or a made-up one)."""
        self._links[recording] = link or (
            f"https://api.zadarma.com/v1/pbx/record/download/{recording}.mp3")

    def _answer(self) -> None:
        if not self._configured:
            raise api.ZadarmaNotConfigured("Zadarma API keys are not configured ([zadarma] key, "
                                       "secret)")
        if self._script:
            raise self._script.popleft()

    async def callback(self, from_number: str, to_number: str, sip: str = "",
                       predicted: bool = False) -> api.CallbackAccepted:
        self._answer()
        self.callbacks.append(AskedCallback(from_number, to_number, sip, predicted))
        return api.CallbackAccepted(from_number.removeprefix("+"), to_number.removeprefix("+"),
                                int(self._clock.seconds()))

    async def recording_link(self, call_id: str = "", pbx_call_id: str = "",
                             lifetime: int = 1800) -> str:
        self._answer()
        asked = call_id or pbx_call_id
        self.recordings_asked.append(asked)
        link = self._links.get(asked)
        if link is None:
            raise api.ZadarmaRefused("Record not found")
        return link

    async def timezone(self) -> str:
        self._answer()
        return self.zone


# --- the durable ingest, as the webhook sees it --------------------------------------------


@dataclass
class MemoryRecorder:
    """Records Zadarma's events (a ``web.zadarma.Recorder``): what the webhook submitted,
    in order, and what it was answered."""

    #: The CRM's names of callers, by the number Zadarma sends (``caller_id``).
    names: Mapping[str, str] = field(default_factory=dict)
    #: The extension of the CRM user who owns a caller, by ``caller_id``.
    owners: Mapping[str, str] = field(default_factory=dict)
    events: list[tuple[ZadarmaEvent, dict[str, str], ZadarmaContext]] = field(
        default_factory=list)
    #: Raised instead of recording when set (``spool.durable.NotRecorded``: a full spool).
    error: Exception | None = None
    _seen: set[tuple[str, str, str, str, str]] = field(default_factory=set)

    def submit_zadarma(self, event: ZadarmaEvent, form: dict[str, str],
                       context: ZadarmaContext) -> Deferred[ZadarmaOutcome]:
        if self.error is not None:
            return fail(self.error)
        key = (event.pbx_call_id, event.kind, event.calltype, event.internal,
               event.destination)  # the journal's unique key
        if key in self._seen:
            return succeed(ZadarmaOutcome(duplicate=True))
        self._seen.add(key)
        self.events.append((event, dict(form), context))
        name = self.names.get(event.caller_id)
        match = (Match(event.caller_id, Client(0, name, None), None, None, None, 1)
                 if name else None)
        return succeed(ZadarmaOutcome(duplicate=False, match=match,
                                      owner_extension=self.owners.get(event.caller_id, "")))
