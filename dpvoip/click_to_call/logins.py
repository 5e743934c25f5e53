"""Who is asking: the CRM's session cookie, the CRM's JWT, or one of dpvoip's API tokens.

The thin edge around ``crm.logins`` (which checks signatures): it reads the session row,
the user and the token through the ``AccountStore`` it is given (``store.accounts`` in the
daemon, ``testing.memory.MemoryAccounts`` in the route tests). A request with no
credential at all is ``NotSignedIn`` with ``presented=False`` (the page shows a sign-in
hint); one whose credential is refused says why, without repeating the credential.

A CRM that keeps its sessions in Redis (``REDIS_CACHE_URL``) is read through the
``SessionCache`` it is given (``store.session_cache``; decoded by ``crm.redis_sessions``).
The session cookie is then looked up in Redis first and in ``django_session`` only when
Redis has no such session; a session found in Redis decides, refused or not. Redis not
answering refuses the login as the database not answering does (503: nothing was
decided), with a log line that names neither the session key nor the password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dpvoip.click_to_call.errors import DatabaseUnreachable, from_database
from dpvoip.click_to_call.ports import AccountStore, SessionCache
from dpvoip.config import Secret
from dpvoip.crm.logins import (
    LoginRefused,
    SessionLogin,
    api_token_hash,
    bearer_token,
    looks_like_api_token,
    read_jwt,
    read_session,
    session_hash_matches,
)
from dpvoip.crm.redis_sessions import ClassRefused, read_cached_session
from dpvoip.store.accounts import Account
from dpvoip.store.session_cache import SessionCacheUnreachable

log = Logger(namespace="dpvoip.logins")

_SESSION_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


class NotSignedIn(Exception):
    def __init__(self, message: str, presented: bool) -> None:
        super().__init__(message)
        self.message = message
        self.presented = presented


@dataclass(frozen=True)
class CrmUser:
    id: int
    username: str
    name: str
    via: str  # "session", "jwt" or "token": a cookie login must pass the origin check


class Logins:
    def __init__(self, accounts: AccountStore, secret_key: Secret, jwt_key: Secret,
                 cookie_name: str, clock: Any, sessions: SessionCache | None = None) -> None:
        self._accounts = accounts
        self._secret_key = secret_key
        self._jwt_key = jwt_key
        self._cookie = cookie_name.encode()
        self._clock = clock
        self._sessions = sessions  # the CRM's sessions in Redis, when it keeps them there

    async def identify(self, request: IRequest) -> CrmUser:
        header = request.getHeader(b"Authorization")
        # Another scheme (Basic auth of a proxy in front of the CRM) is not ours: the
        # session cookie then decides.
        token = bearer_token(header) if header is not None else None
        if token is not None:
            if looks_like_api_token(token):
                return await self._by_api_token(token)
            return await self._by_jwt(token)
        cookie = request.getCookie(self._cookie)
        if cookie:
            return await self._by_session(cookie.decode("latin-1"))
        raise NotSignedIn("not signed in to the CRM", False)

    def _keys(self) -> str:
        key = self._secret_key.reveal()
        if not key:
            raise NotSignedIn("the CRM's SECRET_KEY is not configured in dpvoip ([crm] "
                              "secret_key): CRM logins cannot be checked", True)
        return key

    async def _by_session(self, session_key: str) -> CrmUser:
        secret = self._keys()
        if not 8 <= len(session_key) <= 40 or not set(session_key) <= _SESSION_KEY_CHARS:
            raise NotSignedIn("the CRM session cookie is malformed; sign in again", True)
        session = await self._cached_session(session_key)
        if session is None:
            session = await self._stored_session(session_key, secret)
        user, password = await self._user(session.user_id)
        if not session_hash_matches(secret, password, session.auth_hash):
            raise NotSignedIn("the password changed since this session signed in; sign in "
                              "again", True)
        return CrmUser(user.id, user.username, user.name, "session")

    async def _cached_session(self, session_key: str) -> SessionLogin | None:
        """The login of the session in the CRM's Redis; None when there is no Redis or it
        has no such session (then ``django_session`` is asked)."""
        if self._sessions is None:
            return None
        try:
            value = await self._sessions.cached_session(session_key)
        except SessionCacheUnreachable as error:
            log.error("CRM session login refused: the CRM's Redis did not answer ({why})",
                      why=str(error))
            raise DatabaseUnreachable(f"the CRM's Redis: {error}") from None
        if value is None:
            return None
        try:
            return read_cached_session(value)
        except ClassRefused as refused:
            # The CRM puts plain values in its sessions: this is data it did not write
            # (or a CRM that started keeping objects there). Worth an administrator's look.
            log.warn("CRM session from Redis refused: {why}", why=str(refused))
            raise NotSignedIn("the CRM session is not valid (it holds more than plain "
                              "data); sign in again", True) from None
        except LoginRefused as refused:
            raise NotSignedIn(f"the CRM session is not valid ({refused})", True) from None

    async def _stored_session(self, session_key: str, secret: str) -> SessionLogin:
        """The login of the session row in ``django_session``, signature checked."""
        data = await from_database(self._accounts.session_data(session_key))
        if data is None:
            raise NotSignedIn("the CRM session has expired or was signed out; sign in again",
                              True)
        try:
            return read_session(data, secret)
        except LoginRefused as refused:
            raise NotSignedIn(f"the CRM session is not valid ({refused})", True) from None

    async def _by_jwt(self, token: str) -> CrmUser:
        keys = [k for k in (self._jwt_key.reveal(), self._secret_key.reveal()) if k]
        if not keys:
            self._keys()  # says what is missing
        try:
            user_id = read_jwt(token, keys, self._clock.seconds())
        except LoginRefused as refused:
            raise NotSignedIn(f"the access token is not accepted ({refused})", True) from None
        user, _ = await self._user(user_id)
        return CrmUser(user.id, user.username, user.name, "jwt")

    async def _by_api_token(self, token: str) -> CrmUser:
        account = await from_database(self._accounts.use_token(api_token_hash(token)))
        if account is None:
            raise NotSignedIn("the dpvoip API token is unknown or revoked", True)
        if not account.is_active:
            raise NotSignedIn("the CRM user of this token is not active", True)
        return _crm_user(account, "token")

    async def _user(self, user_id: int) -> tuple[CrmUser, str]:
        account = await from_database(self._accounts.account(user_id))
        if account is None:
            raise NotSignedIn("the CRM user no longer exists", True)
        if not account.is_active:
            raise NotSignedIn("the CRM user is not active", True)
        return _crm_user(account, ""), account.password or ""


def _crm_user(account: Account, via: str) -> CrmUser:
    return CrmUser(account.id, account.username,
                   _name(account.first_name, account.last_name, account.username), via)


def _name(first: str, last: str, username: str) -> str:
    return f"{first} {last}".strip() or username
