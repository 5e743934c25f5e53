"""What the CRM's logins are made of, as stored: Django's session rows, its users, and the
dpvoip API tokens in use.

``click_to_call.logins`` decides who is asking (signatures, hashes, expiry, the reasons
for a refusal); this module only reads the rows it needs, so that every statement about
the CRM's accounts lives in the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpvoip.crm.schema import quote_ident
from dpvoip.store.database import Store


@dataclass(frozen=True)
class Account:
    """A CRM user (``auth_user``). ``password`` is Django's password hash, read only where
    a session must be checked against it (None otherwise)."""

    id: int
    username: str
    first_name: str
    last_name: str
    is_active: bool
    password: str | None = None


class Accounts:
    """The CRM's account tables in ``crm_schema`` and dpvoip's ``api_token``."""

    def __init__(self, store: Store, crm_schema: str) -> None:
        self._store = store
        self._crm = quote_ident(crm_schema)

    async def session_data(self, session_key: str) -> str | None:
        """The encoded data of the unexpired Django session ``session_key``, else None."""
        rows = await self._store.read(
            f"SELECT s.session_data FROM {self._crm}.django_session s"
            " WHERE s.session_key = %s AND s.expire_date > now()",
            (session_key,),
        )
        if not rows:
            return None
        data: str = rows[0][0]
        return data

    async def account(self, user_id: int) -> Account | None:
        """The CRM user ``user_id`` with its password hash, else None."""
        rows = await self._store.read(
            f"SELECT id, username, first_name, last_name, is_active, password"
            f" FROM {self._crm}.auth_user WHERE id = %s",
            (user_id,),
        )
        return Account(*rows[0]) if rows else None

    async def use_token(self, token_sha256: str) -> Account | None:
        """The CRM user of the live (unrevoked) API token whose SHA-256 is ``token_sha256``,
        its use noted (``last_used_at``) in the same statement; None for an unknown or
        revoked token, or one whose user is gone."""
        rows = await self._store.write_one(
            "WITH t AS (UPDATE dpvoip.api_token SET last_used_at = now()"
            "  WHERE token_sha256 = %s AND revoked_at IS NULL RETURNING user_id)"
            f" SELECT u.id, u.username, u.first_name, u.last_name, u.is_active"
            f" FROM t JOIN {self._crm}.auth_user u ON u.id = t.user_id",
            (token_sha256,),
        )
        return Account(*rows[0]) if rows else None
