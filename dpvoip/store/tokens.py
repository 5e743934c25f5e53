"""dpvoip's own API tokens, for scripts and CRMs that keep sessions where dpvoip cannot
read them (Redis): issued for a CRM user, stored only as a hash, revocable.

The token is shown once, at creation; the database holds its SHA-256, so a copy of the
database does not give anyone a working token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dpvoip.crm.logins import new_api_token
from dpvoip.crm.schema import quote_ident
from dpvoip.store.database import Store


class TokenError(Exception):
    pass


@dataclass(frozen=True)
class TokenInfo:
    id: int
    username: str
    label: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


async def create_token(store: Store, crm_schema: str, username: str,
                       label: str = "") -> tuple[int, str]:
    """(id, token) for the CRM user ``username``; the token is not stored, only its hash."""
    token, digest = new_api_token()
    rows = await store.write_one(
        "INSERT INTO dpvoip.api_token (user_id, label, token_sha256)"
        f" SELECT u.id, %s, %s FROM {quote_ident(crm_schema)}.auth_user u"
        " WHERE u.username = %s AND u.is_active RETURNING id",
        (label, digest, username),
    )
    if not rows:
        raise TokenError(f"no active CRM user named {username!r}")
    return int(rows[0][0]), token


async def list_tokens(store: Store, crm_schema: str) -> list[TokenInfo]:
    rows = await store.read(
        "SELECT t.id, coalesce(u.username, '(user ' || t.user_id || ' deleted)'), t.label,"
        " t.created_at, t.last_used_at, t.revoked_at FROM dpvoip.api_token t"
        f" LEFT JOIN {quote_ident(crm_schema)}.auth_user u ON u.id = t.user_id ORDER BY t.id"
    )
    return [TokenInfo(*row) for row in rows]


async def revoke_token(store: Store, token_id: int) -> bool:
    """True when the token was live and is now revoked."""
    rows = await store.write_one(
        "UPDATE dpvoip.api_token SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL"
        " RETURNING id",
        (token_id,),
    )
    return bool(rows)
