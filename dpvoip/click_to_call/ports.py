"""What click-to-call needs from the world, as ``typing.Protocol``s: the CRM's accounts (who
is asking) and its cached sessions, the click-to-call tables, and the providers that dial.

Why here, beside their consumers: ``Logins`` and ``ClickToCall`` say what they use, and
nothing more, so that anything with those methods will do. The composition root hands
them the real ones (``store.accounts.Accounts``, ``store.session_cache.RedisSessionCache``,
``store.callbacks.CallbackRecords``, the configured providers' ``Dialler`` objects and
``RecordingLinks`` in a ``providers.choice.ProviderChoice``); the route tests hand them
the in-memory fakes of ``dpvoip.testing.memory``. mypy checks that both kinds fit.

A provider's dialling and recording links are the provider interface's
(``dpvoip.providers.interface``); Zadarma's API as they use it is ``ZadarmaCalls``
(``dpvoip.zadarma.dialling``), which ``ClickToCall`` still accepts alone: it then dials
every connection of the ``Zadarma`` provider through it.

Every method returns an ``Awaitable``: the real classes are coroutines, a fake may answer
at once (an ``async def``) or with a ``Deferred``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from dpvoip.providers.interface import Dialler, RecordingLinks
from dpvoip.store.accounts import Account
from dpvoip.store.callbacks import CallbackRequest, Claim, ConnectionRow
from dpvoip.zadarma.account import ZadarmaAccountApi
from dpvoip.zadarma.dialling import ZadarmaCalls

__all__ = ["AccountStore", "CallbackStore", "Dialler", "RecordingLinks", "SessionCache",
           "ZadarmaCalls", "ZadarmaClient"]


class AccountStore(Protocol):
    """The CRM's logins as stored: Django's sessions, its users, dpvoip's API tokens."""

    def session_data(self, session_key: str) -> Awaitable[str | None]:
        """The encoded data of the unexpired session ``session_key``, else None."""
        ...

    def account(self, user_id: int) -> Awaitable[Account | None]:
        """The user ``user_id`` with its password hash, else None (active or not)."""
        ...

    def use_token(self, token_sha256: str) -> Awaitable[Account | None]:
        """The user of the live API token with this SHA-256 (its use noted), else None for
        an unknown or revoked token. The user may be inactive: the caller decides."""
        ...


class SessionCache(Protocol):
    """The CRM's sessions as Django's cache backend keeps them (in Redis, when the CRM has
    ``REDIS_CACHE_URL``): ``store.session_cache.RedisSessionCache``."""

    def cached_session(self, session_key: str) -> Awaitable[bytes | None]:
        """The raw value stored for session ``session_key``, else None (Redis drops an
        expired session). ``store.session_cache.SessionCacheUnreachable`` when the cache
        does not answer."""
        ...


class CallbackStore(Protocol):
    """The click-to-call tables: connections, the record of requests, recordings."""

    def connections(self, owner_id: int) -> Awaitable[list[ConnectionRow]]:
        """The active connections of user ``owner_id``, oldest (lowest id) first."""
        ...

    def own_connection(self, connection_id: int, owner_id: int,
                       ) -> Awaitable[ConnectionRow | None]:
        """Connection ``connection_id`` if it is active and ``owner_id``'s, else None."""
        ...

    def claim(self, pending: CallbackRequest, at: float, window: float,
              decide: Callable[[list[float]], float | None]) -> Awaitable[Claim]:
        """Count a request of ``pending.user_id`` at ``at`` against the per-user limit that
        every instance on the database shares: with the times (ascending) of the user's
        requests counted after ``at - window``, ``decide`` (pure) returns None to allow it
        (its row is then kept as ``pending`` and counted: ``Claim.request_id``) or the
        seconds to wait (nothing kept: ``Claim.wait``). One user's claims are taken one
        at a time, whichever instance makes them."""
        ...

    def record(self, request: CallbackRequest, claimed: int | None = None) -> Awaitable[None]:
        """Keep the record of one request, dialled or refused: over the row of its claim
        (``claimed``, the ``Claim.request_id``), or as a new row (a request never counted)."""
        ...

    def recording_of_crm_call(self, crm_call_id: int,
                              viewer: int | None) -> Awaitable[str | None]:
        """Zadarma's recording id of the CRM's call ``crm_call_id``, else None; with
        ``viewer`` (a CRM user's id), None also when that user may not hear it (staff, or
        one of their connections was a leg of the call)."""
        ...

    def recording_of_call(self, call_id: str, viewer: int | None) -> Awaitable[str | None]:
        """Zadarma's recording id of dpvoip's call ``call_id``, else None (and with
        ``viewer``, as ``recording_of_crm_call``)."""
        ...


class ZadarmaClient(ZadarmaCalls, ZadarmaAccountApi, Protocol):
    """Everything dpvoip asks Zadarma's API: what ``ZadarmaApi`` and its fake both are."""
