"""Click-to-call: a CRM user asks their connection's provider (Zadarma, ...) to ring their
phone, then the client.

Every check that protects the company's money happens here, before a provider is asked:
the connection must be the user's own and active, its ``provider`` one dpvoip has (as in
the CRM, the column chooses the provider: ``providers.choice``), the number must pass the
dialling policy, the user must be within their rate. Every request, refused or not, is
recorded in ``dpvoip.callback_request``; the user's rate is counted there too, so that it
holds across every dpvoip instance on the database (``window_wait`` is its rule, the
store's ``claim`` applies it one request of a user at a time). The web routes only
translate HTTP to and from this; the tables and the providers are reached through the
``CallbackStore`` and the ``ProviderChoice`` it is given (``store.callbacks`` and the
configured providers in the daemon, ``testing.memory`` in the route tests). A database
that does not answer comes out as ``DatabaseUnreachable``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from dpvoip.click_to_call.errors import from_database
from dpvoip.click_to_call.logins import CrmUser
from dpvoip.click_to_call.ports import CallbackStore, ZadarmaCalls
from dpvoip.core.dialling_policy import DiallingPolicy
from dpvoip.core.errors import summary
from dpvoip.core.numbers import Dialling
from dpvoip.providers.choice import ProviderChoice
from dpvoip.providers.interface import DialRequest, ProviderError, RecordingGone
from dpvoip.store.callbacks import CallbackRequest
from dpvoip.zadarma.dialling import ZadarmaDialler, ZadarmaRecordings

log = Logger()

_ID = re.compile(r"[0-9]{1,9}")
#: The provider ``ClickToCall`` given Zadarma's API alone dials through (the ``[zadarma]``
#: section's; the CRM's connections say ``Zadarma``).
ZADARMA = "zadarma"


#: The per-user limit's window: ``[click_to_call] per_user_per_minute`` in any minute.
WINDOW = 60.0


def window_wait(counted: Sequence[float], now: float, limit: int,
                window: float = WINDOW) -> float | None:
    """The per-user limit's rule: None when one more request at ``now`` is allowed, given
    ``counted``, the times of the user's requests already counted (by any instance); else
    the seconds until it would be (> 0).

    A sliding window, as ``core.rate_limit.RateLimiter`` (fixed buckets would let twice the
    limit through around a boundary): a request counted at ``t`` counts until
    ``t + window``, exclusive. The times come from the instances' clocks: one ahead of
    ``now`` by less than a window counts (nothing is let through early), one ahead by a
    window or more does not (a clock set back since, a host with a wrong clock), rather
    than refusing the user until the clock catches up."""
    live = sorted(t for t in counted if now - window < t < now + window)
    if len(live) < limit:
        return None
    free_at = live[len(live) - limit] + window
    wait = free_at - now
    while now + wait < free_at:  # rounding: waiting ``wait`` must be enough
        wait = math.nextafter(wait, math.inf)
    return wait


def _text(value: str) -> str:
    """What PostgreSQL can store of user input: a NUL would make the INSERT fail and the
    attempt go unrecorded."""
    return value.replace("\x00", "\ufffd")


@dataclass(frozen=True)
class Connection:
    id: int
    type: str
    number: str
    callerid: str
    provider: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "number": self.number,
                "callerid": self.callerid, "provider": self.provider}


@dataclass(frozen=True)
class CallbackOutcome:
    """What the user is told: ``status`` is the HTTP status of the answer."""

    status: int
    message: str
    number: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


class NoRecording(Exception):
    pass


#: Who may have a call's recording: staff and the users whose connection was a leg of it
#: (the default), or every signed-in user (``[click_to_call] recordings``).
STAFF_OR_OWN, ANY_USER = "staff-or-own", "any-user"
RECORDINGS = (STAFF_OR_OWN, ANY_USER)

#: A call named in a path: the CRM's id (digits, a bigint), or dpvoip's own
#: (``zd-…``, ``fb-…``): printable ASCII, no longer than a call id can be.
_CALL = re.compile(r"[0-9]{1,18}|[!-~]{1,64}")


def valid_call(call: str) -> bool:
    return _CALL.fullmatch(call) is not None


class BadCallId(ValueError):
    """A call id no call can have (a NUL, a control character, non-ASCII, too long)."""

    def __init__(self, call: str) -> None:
        super().__init__(f"call {call[:40]!a} is not a call id (the CRM's number of "
                         "the call, or dpvoip's id)")


def zadarma_only(api: ZadarmaCalls | None) -> ProviderChoice:
    """Zadarma's API as the one provider, ``zadarma`` (a ``ClickToCall`` given the API)."""
    if api is None:
        return ProviderChoice()
    return ProviderChoice([(ZADARMA, ZadarmaDialler(api))], [ZadarmaRecordings(api)])


class ClickToCall:
    """``providers``: the configured providers (``ProviderChoice``), or Zadarma's API
    alone (then every connection of the ``Zadarma`` provider dials through it).

    ``per_user``: requests one user may make in any ``WINDOW`` (a minute), on all the
    instances together; every POST counts, refused or not, except one refused for being
    over the limit. The count is in the database: when it cannot be read the request is
    refused (``DatabaseUnreachable``, a 503) and nothing is dialled."""

    def __init__(self, records: CallbackStore, providers: ProviderChoice | ZadarmaCalls | None,
                 policy: DiallingPolicy, where: Dialling, per_user: int, clock: Any,
                 recordings: str = STAFF_OR_OWN) -> None:
        if per_user < 1:
            raise ValueError(f"per_user must be at least 1, not {per_user}")
        if recordings not in RECORDINGS:
            raise ValueError(f"recordings must be one of {RECORDINGS}")
        self._recordings = recordings
        self._records = records
        self._providers = (providers if isinstance(providers, ProviderChoice)
                           else zadarma_only(providers))
        self._policy = policy
        self._where = where
        self._per_user = per_user
        self._clock = clock

    async def connections(self, user: CrmUser) -> list[Connection]:
        rows = await from_database(self._records.connections(user.id))
        return [Connection(*row) for row in rows]

    async def dial(self, user: CrmUser, connection_id: str, number: str, sip: str = "",
                   predicted: bool = False) -> CallbackOutcome:
        now = self._clock.seconds()
        asked = CallbackOutcome(0, "")
        claim = await from_database(self._records.claim(
            self._request(user, None, connection_id, number, None, asked), now, WINDOW,
            lambda counted: window_wait(counted, now, self._per_user)))
        if claim.wait is not None:
            outcome = CallbackOutcome(
                429, f"too many calls requested; try again in {math.ceil(claim.wait)} s",
                retry_after=claim.wait)
            await self._record(user, None, connection_id, number, None, outcome)
            return outcome
        connection: Connection | None = None
        dialled: str | None = None
        try:
            outcome, connection, dialled = await self._dial(
                user, connection_id, number, sip, predicted)
        except ProviderError as error:  # Zadarma's ZadarmaApiError among them
            outcome = CallbackOutcome(error.status, error.message, retry_after=error.retry_after)
        await self._record(user, connection, connection_id, number, dialled, outcome,
                           claimed=claim.request_id)
        return outcome

    async def _dial(self, user: CrmUser, connection_id: str, number: str, sip: str,
                    predicted: bool) -> tuple[CallbackOutcome, Connection | None, str | None]:
        if not _ID.fullmatch(connection_id.strip()):
            return CallbackOutcome(400, "choose one of your connections (callerid)"), None, None
        connection = await self._own_connection(user, int(connection_id))
        if connection is None:
            return CallbackOutcome(
                403, f"connection {int(connection_id)} is not one of your active connections"
            ), None, None
        chosen = self._providers.for_connection(connection.provider)
        if chosen is None:  # nothing dialled through another provider: its calls cost
            log.warn("click-to-call for {user} refused: connection {id} names the provider "
                     "{provider!r}, which is not configured ([[provider]] names: {names})",
                     user=user.username, id=connection.id,
                     provider=connection.provider[:40],
                     names=", ".join(self._providers.names) or "none")
            return CallbackOutcome(
                400, self._providers.refusal(connection.id, connection.provider)), \
                connection, None
        verdict = self._policy.check(number, self._where)
        if verdict.number is None:
            return CallbackOutcome(400, verdict.refusal or "not a number that may be dialled"), \
                connection, None
        call = DialRequest(connection.number, verdict.number, sip, predicted,
                           connection.type, user.username)
        refusal = chosen.dialler.refusal(call)
        if refusal is not None:
            return CallbackOutcome(400, refusal), connection, verdict.number
        await chosen.dialler.dial(call)
        log.info("click-to-call for {user}: {ring} then {number}", user=user.username,
                 ring=call.ring_first, number=verdict.number, provider=chosen.name)
        return CallbackOutcome(200, "Expect a call to your smartphone", verdict.number), \
            connection, verdict.number

    async def _own_connection(self, user: CrmUser, connection_id: int) -> Connection | None:
        row = await from_database(self._records.own_connection(connection_id, user.id))
        return Connection(*row) if row is not None else None

    async def refused(self, user: CrmUser | None, connection_id: str, number: str,
                      outcome: CallbackOutcome) -> CallbackOutcome:
        """Record a request refused before it reached the checks above (no login, a
        cross-site post): those are the ones an administrator most wants to see."""
        await self._record(user, None, connection_id, number, None, outcome)
        return outcome

    @staticmethod
    def _request(user: CrmUser | None, connection: Connection | None, connection_id: str,
                 number: str, dialled: str | None, outcome: CallbackOutcome
                 ) -> CallbackRequest:
        given_id = connection_id.strip()
        return CallbackRequest(
            user_id=user.id if user else None,
            login=user.via if user else "none",
            connection_id=connection.id if connection else (
                int(given_id) if _ID.fullmatch(given_id) else None),
            from_number=connection.number if connection else None,
            number_given=_text(number[:64]),
            number_dialled=dialled,
            result="dialled" if outcome.ok else "refused",
            http_status=outcome.status,
            message=_text(outcome.message[:300]),
        )

    async def _record(self, user: CrmUser | None, connection: Connection | None,
                      connection_id: str, number: str, dialled: str | None,
                      outcome: CallbackOutcome, claimed: int | None = None) -> None:
        try:
            await self._records.record(
                self._request(user, connection, connection_id, number, dialled, outcome),
                claimed)
        except Exception as error:  # the answer must still reach the user
            log.error("click-to-call request of {user} not recorded: {error}",
                      user=user.username if user else "an unknown user",
                      error=summary(error))

    async def recording_link(self, user: CrmUser, call: str) -> str:
        """A fresh link to the recording of the call (the CRM's call id, or dpvoip's), for
        a user who may hear it: with ``recordings = "staff-or-own"`` (the default) CRM
        staff, or a user one of whose connections was a leg of the call; with
        ``"any-user"`` any signed-in user. A call the user may not hear is answered as one
        without a recording: whether it exists is not told."""
        if not valid_call(call):
            raise BadCallId(call)
        viewer = user.id if self._recordings == STAFF_OR_OWN else None
        if re.fullmatch(r"[0-9]{1,18}", call):
            recording = await from_database(
                self._records.recording_of_crm_call(int(call), viewer))
        else:
            recording = await from_database(self._records.recording_of_call(call, viewer))
        if not recording:
            raise NoRecording("this call has no recording")
        gone = "this call has no recording"
        for links in self._providers.recordings:  # the provider that keeps it answers
            try:
                return await links.recording_link(recording)
            except RecordingGone as missing:
                gone = str(missing)
        raise NoRecording(gone)
