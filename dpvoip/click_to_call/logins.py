"""Who is asking: the CRM's session cookie, the CRM's JWT, or one of dpvoip's API tokens.

The thin edge around ``crm.logins`` (which checks signatures): it reads the session row,
the user and the token through the ``AccountStore`` it is given (``store.accounts`` in the
daemon, ``testing.memory.MemoryAccounts`` in the route tests). A request with no
credential at all is ``NotSignedIn`` with ``presented=False`` (the page shows a sign-in
hint); one whose credential is refused says why, without repeating the credential.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.web.iweb import IRequest

from dpvoip.click_to_call.errors import from_database
from dpvoip.click_to_call.ports import AccountStore
from dpvoip.config import Secret
from dpvoip.crm.logins import (
    LoginRefused,
    api_token_hash,
    bearer_token,
    looks_like_api_token,
    read_jwt,
    read_session,
    session_hash_matches,
)
from dpvoip.store.accounts import Account

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
                 cookie_name: str, clock: Any) -> None:
        self._accounts = accounts
        self._secret_key = secret_key
        self._jwt_key = jwt_key
        self._cookie = cookie_name.encode()
        self._clock = clock

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
        data = await from_database(self._accounts.session_data(session_key))
        if data is None:
            raise NotSignedIn("the CRM session has expired or was signed out; sign in again",
                              True)
        try:
            session = read_session(data, secret)
        except LoginRefused as refused:
            raise NotSignedIn(f"the CRM session is not valid ({refused})", True) from None
        user, password = await self._user(session.user_id)
        if not session_hash_matches(secret, password, session.auth_hash):
            raise NotSignedIn("the password changed since this session signed in; sign in "
                              "again", True)
        return CrmUser(user.id, user.username, user.name, "session")

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
