"""What dpvoip needs of the CRM's tables, and what a CRM version offers beyond that.

Pure: the catalogue of the live database is read elsewhere and handed in as
``{table: {column, ...}}``. Django owns these tables; dpvoip only ever checks them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

_CLIENT_PHONES = (
    "tilefono_oikias_1",
    "tilefono_oikias_2",
    "kinito_tilefono",
    "tilefono_epixeirisis_1",
    "tilefono_epixeirisis_2",
)
_PERSON = (
    "id", "first_name", "middle_name", "last_name", "phone", "other_phone", "mobile",
    "update_date", "owner_id", "was_in_touch",
)

#: Every table and column dpvoip reads or writes, in both CRM versions.
REQUIRED: Mapping[str, frozenset[str]] = {
    "accounting_voipcall": frozenset({
        "id", "call_id", "direction", "phone_number", "status", "started_at", "ended_at",
        "duration_seconds", "notes", "ticket_created", "ticket_id", "created_at",
        "updated_at", "client_id", "client_email", "resolution",
    }),
    "accounting_voipcalllog": frozenset({"id", "action", "description", "created_at", "call_id"}),
    "accounting_ticket": frozenset({
        "id", "title", "description", "status", "priority", "notes", "created_at",
        "assigned_at", "resolved_at", "closed_at", "email_sent", "follow_up_scheduled",
        "assigned_to_id", "call_id", "client_id",
    }),
    "accounting_clientprofile": frozenset(
        {"id", "eponimia", "email", "is_active", "updated_at", *_CLIENT_PHONES}
    ),
    "crm_contact": frozenset(_PERSON),
    "crm_lead": frozenset({*_PERSON, "company_name", "company_phone"}),
    "crm_company": frozenset({"id", "full_name", "phone", "update_date", "was_in_touch"}),
    "crm_deal": frozenset(
        {"id", "name", "contact_id", "lead_id", "active", "update_date", "workflow"}
    ),
    "voip_connection": frozenset(
        {"id", "type", "active", "number", "callerid", "provider", "owner_id"}
    ),
    "common_userprofile": frozenset({"user_id", "pbx_number"}),
    "auth_user": frozenset(
        {"id", "username", "first_name", "last_name", "is_active", "password"}
    ),
    "django_session": frozenset({"session_key", "session_data", "expire_date"}),
}

#: Columns newer CRM versions add, which dpvoip fills when they are there.
OPTIONAL: Mapping[str, frozenset[str]] = {
    "accounting_voipcalllog": frozenset({"client_id", "call_reference", "phone_number"}),
}


@dataclass(frozen=True)
class CrmCapabilities:
    """Optional columns present in the attached CRM (the 2026-08 version has all three)."""

    call_log_client_id: bool = False
    call_log_call_reference: bool = False
    call_log_phone_number: bool = False

    @property
    def version(self) -> str:
        if self.call_log_call_reference and self.call_log_phone_number:
            return "2026-08 or newer"
        return "2025-12"


def quote_ident(name: str) -> str:
    """A quoted SQL identifier (PostgreSQL's rule: double quotes, doubled inside)."""
    return '"' + name.replace('"', '""') + '"'


def missing(present: Mapping[str, frozenset[str] | set[str]]) -> list[str]:
    """Everything required that ``present`` lacks, one readable item each, sorted."""
    problems: list[str] = []
    for table in sorted(REQUIRED):
        if table not in present:
            problems.append(f"table {table}")
            continue
        problems.extend(
            f"column {table}.{column}" for column in sorted(REQUIRED[table] - set(present[table]))
        )
    return problems


def capabilities(present: Mapping[str, frozenset[str] | set[str]]) -> CrmCapabilities:
    log_columns = set(present.get("accounting_voipcalllog", ())) & OPTIONAL[
        "accounting_voipcalllog"]
    return CrmCapabilities(
        call_log_client_id="client_id" in log_columns,
        call_log_call_reference="call_reference" in log_columns,
        call_log_phone_number="phone_number" in log_columns,
    )
