"""The CRM's own rules, applied to the rows dpvoip wrote: every value that the CRM's code
would change when it saves the row (its ``save()``, its ``auto_now`` columns) or reject
when a user saves it unchanged in the admin (the model's field validation and ``clean()``,
which a ModelForm runs), as one finding per value.

Each rule names the CRM code it comes from. "2025-12" is jimmi21/LogistikoCRM at 8e80048,
"2026-08" is Lone-side/LogistikoCRM at fc3a110 (the newest fork); a rule that only the
newest CRM has is applied only to a database with the newest CRM's tables (recognised by
the call log's snapshot column ``call_reference``). Nothing here copies the CRM's code: the
rules are restated on rows read with SQL.

Which rows: every row of ``accounting_voipcall``, ``accounting_voipcalllog`` and
``accounting_ticket`` (in a test database dpvoip is the only writer of those), and the
``crm_contact`` / ``crm_lead`` / ``crm_deal`` rows whose ``was_in_touch`` or ``workflow``
changed since a ``sales_snapshot`` taken before the scenario (without one, those tables
are not checked).

A finding reads ``table id=N column: value 'x', expected 'y' (rule; CRM source)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg2
import psycopg2.extras

# -- the CRM's choices (accounting/models.py, identical in both versions) ---------------------

#: VoIPCall.DIRECTION_CHOICES
DIRECTIONS = frozenset({"incoming", "outgoing"})
#: VoIPCall.STATUS_CHOICES
CALL_STATUSES = frozenset({"active", "completed", "missed", "failed"})
#: VoIPCall.RESOLUTION_CHOICES (the field is blank=True: '' passes too)
RESOLUTIONS = frozenset({"pending", "closed", "follow_up"})
#: VoIPCallLog.ACTION_CHOICES: no ``ticket_updated`` (the old CRM's accounting/tasks.py
#: writes it, but its own model's validation refuses it)
ACTIONS = frozenset({"started", "ended", "ticket_created", "client_matched", "status_changed"})
#: Ticket.STATUS_CHOICES
TICKET_STATUSES = frozenset({"open", "assigned", "in_progress", "resolved", "closed"})
#: Ticket.PRIORITY_CHOICES
PRIORITIES = frozenset({"low", "medium", "high", "urgent"})

_MODELS = "accounting/models.py"
_VALIDATION = "Django full_clean()/ModelForm field validation"


# -- Django's EmailValidator (django/core/validators.py, Django 5.2), restated -----------------

_EMAIL_USER = re.compile(
    r"(^[-!#$%&'*+/=?^_`{}|~0-9A-Z]+(\.[-!#$%&'*+/=?^_`{}|~0-9A-Z]+)*\Z"
    r'|^"([\001-\010\013\014\016-\037!#-\[\]-\177]|\\[\001-\011\013\014\016-\177])*"\Z)',
    re.IGNORECASE,
)
_EMAIL_DOMAIN = re.compile(
    r"((?:[A-Z0-9](?:[A-Z0-9-]{0,61}[A-Z0-9])?\.)+)(?:[A-Z0-9-]{2,63}(?<!-))\Z",
    re.IGNORECASE,
)
_EMAIL_LITERAL = re.compile(r"\[([A-F0-9:.]+)\]\Z", re.IGNORECASE)


def valid_email(value: str) -> bool:
    """What Django's ``EmailValidator`` accepts (an ``EmailField``'s form and model
    validation): at most 320 characters, a dot-atom or quoted local part, a domain name
    (IDNA-encoded), ``localhost`` or an address literal."""
    if not value or "@" not in value or len(value) > 320:
        return False
    user, domain = value.rsplit("@", 1)
    if not _EMAIL_USER.match(user):
        return False
    if domain == "localhost" or _EMAIL_LITERAL.match(domain):
        return True
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return bool(_EMAIL_DOMAIN.match(domain))


# -- the CRM's sales rows before the scenario ---------------------------------------------------

SALES_TABLES = ("crm_contact", "crm_lead", "crm_deal")


@dataclass(frozen=True)
class SalesRow:
    """What dpvoip may change on a contact, lead or deal, and its ``update_date``."""

    was_in_touch: date | None  # contacts and leads
    workflow: str | None  # deals
    update_date: datetime


@dataclass(frozen=True)
class SalesSnapshot:
    """Every contact, lead and deal as it was, and the database's time when read."""

    taken_at: datetime
    rows: Mapping[tuple[str, int], SalesRow]


def _read(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    connection = psycopg2.connect(dsn)
    try:
        connection.autocommit = True
        with connection.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
            cursor.execute(sql, params)
            return [dict(row) for row in cursor.fetchall()] if cursor.description else []
    finally:
        connection.close()


def sales_snapshot(dsn: str) -> SalesSnapshot:
    """The contacts, leads and deals before a scenario (``crm_findings(before=...)``)."""
    [now] = _read(dsn, "SELECT now() AS now")
    rows: dict[tuple[str, int], SalesRow] = {}
    for table in SALES_TABLES:
        touched = "NULL::date AS was_in_touch, workflow" if table == "crm_deal" \
            else "was_in_touch, NULL::text AS workflow"
        for row in _read(dsn, f"SELECT id, {touched}, update_date FROM {table}"):
            rows[(table, int(row["id"]))] = SalesRow(row["was_in_touch"], row["workflow"],
                                                     row["update_date"])
    return SalesSnapshot(now["now"], rows)


# -- the checker --------------------------------------------------------------------------------


def _columns(dsn: str, table: str, schema: str = "public") -> set[str]:
    return {row["column_name"] for row in _read(
        dsn, "SELECT column_name FROM information_schema.columns"
             " WHERE table_schema = %s AND table_name = %s", (schema, table))}


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


class Findings:
    """The findings, each naming the table, the row's id, the column, the value and what
    the CRM expects there, and the rule."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, table: str, row_id: Any, column: str, value: Any, expected: str,
            rule: str) -> None:
        self.found.append(f"{table} id={row_id} {column}: value {_show(value)},"
                          f" expected {expected} ({rule})")


def newest_crm(dsn: str) -> bool:
    """The database holds the 2026-08 CRM's tables (the call log's snapshot columns)."""
    return "call_reference" in _columns(dsn, "accounting_voipcalllog")


def crm_findings(dsn: str, before: SalesSnapshot | None = None) -> list[str]:
    """Every value in the CRM's tables at ``dsn`` that the CRM's own code would change or
    refuse (see the module's docstring); ``before``: the sales rows before the scenario,
    to check the ``update_date`` of those dpvoip changed. Empty: nothing to change."""
    findings = Findings()
    newest = newest_crm(dsn)
    calls = {row["id"]: row for row in _read(dsn, "SELECT * FROM accounting_voipcall ORDER BY id")}
    tickets = {row["id"]: row for row in _read(dsn, "SELECT * FROM accounting_ticket ORDER BY id")}
    logs = _read(dsn, "SELECT * FROM accounting_voipcalllog ORDER BY id")
    for call in calls.values():
        _call_rules(findings, call, tickets, newest)
    for log in logs:
        _log_rules(findings, log, calls.get(log["call_id"]), newest)
    for ticket in tickets.values():
        _ticket_rules(findings, ticket, calls.get(ticket["call_id"]), newest)
    if before is not None:
        _sales_rules(findings, dsn, before)
    return findings.found


def _text_field(findings: Findings, table: str, row: Mapping[str, Any], column: str,
                max_length: int, blank: bool, rule: str) -> None:
    """A CharField's validation: required unless blank=True, at most max_length."""
    value = row[column]
    if value is None or (not blank and value == ""):
        findings.add(table, row["id"], column, value, "a non-blank value",
                     f"{rule} blank=False; {_VALIDATION}")
    elif len(value) > max_length:
        findings.add(table, row["id"], column, value, f"at most {max_length} characters",
                     f"{rule} max_length={max_length}; {_VALIDATION}")


def _choice(findings: Findings, table: str, row: Mapping[str, Any], column: str,
            choices: frozenset[str], blank: bool, rule: str) -> None:
    value = row[column]
    if value in choices or (blank and value == ""):
        return
    findings.add(table, row["id"], column, value, f"one of {sorted(choices)}",
                 f"{rule}; {_VALIDATION}")


def _call_rules(findings: Findings, call: Mapping[str, Any],
                tickets: Mapping[int, Mapping[str, Any]], newest: bool) -> None:
    table, row_id = "accounting_voipcall", call["id"]
    started, ended = call["started_at"], call["ended_at"]
    # VoIPCall.save() (both versions): `if self.ended_at and self.started_at:
    # self.duration_seconds = int((ended_at - started_at).total_seconds())`. An unchanged
    # Save in the admin, or any save() by the CRM, rewrites any other value.
    if started is not None and ended is not None:
        expected = int((ended - started).total_seconds())
        if call["duration_seconds"] != expected:
            findings.add(table, row_id, "duration_seconds", call["duration_seconds"],
                         f"{expected} = int(ended_at - started_at)",
                         f"VoIPCall.save() recomputes it; {_MODELS}")
        # The duration VoIPCall.save() computes, shown by VoIPCall.duration_formatted,
        # is negative when the end is before the start: no CRM path writes that.
        if ended < started:
            findings.add(table, row_id, "ended_at", ended,
                         f"not before started_at {started.isoformat()}",
                         f"VoIPCall.save()'s duration would be negative; {_MODELS}")
    # The model's fields, as the admin's ModelForm (VoIPCallAdmin.fieldsets, both
    # versions: phone_number, direction, status, client_email, started_at, ...) and
    # full_clean() validate them.
    _text_field(findings, table, call, "call_id", 50, False, "VoIPCall.call_id")
    _text_field(findings, table, call, "phone_number", 20, False, "VoIPCall.phone_number")
    _choice(findings, table, call, "direction", DIRECTIONS, False,
            "VoIPCall.DIRECTION_CHOICES")
    _choice(findings, table, call, "status", CALL_STATUSES, False, "VoIPCall.STATUS_CHOICES")
    _choice(findings, table, call, "resolution", RESOLUTIONS, True,
            "VoIPCall.RESOLUTION_CHOICES, blank=True")
    email = call["client_email"]
    if email not in (None, "") and (len(email) > 254 or not valid_email(email)):
        findings.add(table, row_id, "client_email", email, "a valid email, '' or NULL",
                     f"VoIPCall.client_email EmailField (EmailValidator, max_length=254);"
                     f" {_VALIDATION}")
    if call["ticket_id"] is not None and len(call["ticket_id"]) > 100:
        findings.add(table, row_id, "ticket_id", call["ticket_id"], "at most 100 characters",
                     f"VoIPCall.ticket_id max_length=100; {_VALIDATION}")
    # auto_now / auto_now_add: every save sets updated_at to a time after created_at.
    if call["updated_at"] < call["created_at"]:
        findings.add(table, row_id, "updated_at", call["updated_at"],
                     f"not before created_at {call['created_at'].isoformat()}",
                     f"VoIPCall.updated_at auto_now, created_at auto_now_add; {_MODELS}")
    # The call's ticket flags: the CRM sets ticket_created=True and ticket_id=str(ticket.id)
    # together (2025-12: accounting/tasks.py create_missed_call_ticket, api_voip.py,
    # views/voip.py; 2026-08: services/call_assignment.py create_ticket_for_call) and resets
    # both together when the ticket goes (accounting/signals.py
    # cleanup_orphan_call_on_ticket_delete, both versions).
    linked = call["ticket_id"]
    if call["ticket_created"] != (linked is not None):
        findings.add(table, row_id, "ticket_created", call["ticket_created"],
                     f"{linked is not None} (ticket_id is {linked!r})",
                     "ticket_created and ticket_id are set and reset together;"
                     " accounting/signals.py cleanup_orphan_call_on_ticket_delete")
    if linked is not None and not (linked.isdigit() and int(linked) in tickets):
        findings.add(table, row_id, "ticket_id", linked, "the id of an existing ticket",
                     "ticket_id = str(ticket.id); services/call_assignment.py"
                     " create_ticket_for_call, accounting/tasks.py")
    if newest:
        # 2026-08 VoIPCall.clean(): when the ticket linked to the call (Ticket.call) has a
        # client, the call's client is that client (ValidationError otherwise, raised by
        # the admin's form on an unchanged Save).
        own = [t for t in tickets.values() if t["call_id"] == row_id]
        if own and own[0]["client_id"] is not None and call["client_id"] != own[0]["client_id"]:
            findings.add(table, row_id, "client_id", call["client_id"],
                         f"{own[0]['client_id']} (the client of ticket {own[0]['id']})",
                         f"VoIPCall.clean() call-ticket client invariant; {_MODELS} 2026-08")


def _log_rules(findings: Findings, log: Mapping[str, Any], call: Mapping[str, Any] | None,
               newest: bool) -> None:
    table, row_id = "accounting_voipcalllog", log["id"]
    # VoIPCallLog.action CharField(choices=ACTION_CHOICES) (both versions).
    _choice(findings, table, log, "action", ACTIONS, False, "VoIPCallLog.ACTION_CHOICES")
    _text_field(findings, table, log, "action", 50, False, "VoIPCallLog.action")
    if call is not None and log["created_at"] < call["created_at"]:
        # created_at auto_now_add on both: the CRM writes a log line of a call (its FK)
        # after the call row exists.
        findings.add(table, row_id, "created_at", log["created_at"],
                     f"not before its call's created_at {call['created_at'].isoformat()}",
                     f"VoIPCallLog/VoIPCall.created_at auto_now_add; {_MODELS}")
    if not newest:
        return
    # 2026-08: the snapshot columns.
    if call is None:
        if (log["call_reference"] == "" and log["phone_number"] == ""
                and log["client_id"] is None):
            findings.add(table, row_id, "call_reference", log["call_reference"],
                         "some attribution (call, client, call_reference or phone_number)",
                         "audit_voipcalllog_snapshots: orphan-without-attribution;"
                         " accounting/management/commands/audit_voipcalllog_snapshots.py")
        return
    # VoIPCallLog.save() copies the call's client_id (always), call_id and phone_number
    # at insert; services/call_assignment.py change_call_client and
    # sync_ticket_call_client bring every log row's client along when the call's client
    # changes; the audit command reports client-mismatch (NULL = NULL matches).
    if log["client_id"] != call["client_id"]:
        findings.add(table, row_id, "client_id", log["client_id"],
                     f"{call['client_id']!r} (its call's client_id)",
                     "VoIPCallLog.save() snapshot, change_call_client;"
                     " audit_voipcalllog_snapshots: client-mismatch")
    if log["call_reference"] == "":
        findings.add(table, row_id, "call_reference", "", repr(call["call_id"]),
                     "audit_voipcalllog_snapshots: missing-call-reference")
    elif log["call_reference"] != call["call_id"]:
        findings.add(table, row_id, "call_reference", log["call_reference"],
                     f"{call['call_id']!r} (its call's call_id)",
                     "VoIPCallLog.save() snapshot `str(call.call_id)`; migration 10025"
                     " backfill")
    if log["phone_number"] != call["phone_number"]:
        findings.add(table, row_id, "phone_number", log["phone_number"],
                     f"{call['phone_number']!r} (its call's phone_number)",
                     "VoIPCallLog.save() snapshot `call.phone_number`; migration 10025"
                     " backfill; issue 13 point 3")


def _ticket_rules(findings: Findings, ticket: Mapping[str, Any],
                  call: Mapping[str, Any] | None, newest: bool) -> None:
    table, row_id = "accounting_ticket", ticket["id"]
    # Ticket's fields, as TicketAdmin's form (title, status, priority, ...) validates them.
    _text_field(findings, table, ticket, "title", 200, False, "Ticket.title")
    _choice(findings, table, ticket, "status", TICKET_STATUSES, False,
            "Ticket.STATUS_CHOICES")
    _choice(findings, table, ticket, "priority", PRIORITIES, False, "Ticket.PRIORITY_CHOICES")
    if call is None:
        return
    if ticket["created_at"] < call["created_at"]:
        # created_at auto_now_add on both; the CRM makes a ticket for a call that exists.
        findings.add(table, row_id, "created_at", ticket["created_at"],
                     f"not before its call's created_at {call['created_at'].isoformat()}",
                     f"Ticket/VoIPCall.created_at auto_now_add; {_MODELS}")
    # The ticket's own call carries it: create_ticket_for_call (2026-08) and the old
    # CRM's tasks.py set call.ticket_created = True, call.ticket_id = str(ticket.id).
    if not call["ticket_created"] or call["ticket_id"] != str(row_id):
        findings.add("accounting_voipcall", call["id"], "ticket_id", call["ticket_id"],
                     f"'{row_id}' with ticket_created true (ticket {row_id} has call_id"
                     f" {call['id']})",
                     "services/call_assignment.py create_ticket_for_call, accounting/tasks.py")
    if newest and call["client_id"] is not None and ticket["client_id"] != call["client_id"]:
        # 2026-08 Ticket.clean(): when the linked call has a client, the ticket has the
        # same client, never another and never none.
        findings.add(table, row_id, "client_id", ticket["client_id"],
                     f"{call['client_id']} (the client of its call {call['id']})",
                     f"Ticket.clean() ticket-call client invariant; {_MODELS} 2026-08")


def _sales_rules(findings: Findings, dsn: str, before: SalesSnapshot) -> None:
    """common/models.py Base.update_date is ``auto_now=True`` (both versions): every save
    of a contact, lead or deal (BaseContact.was_in_touch_today(), add_to_workflow() and a
    save) sets it to the time of that save. So a row whose ``was_in_touch`` or
    ``workflow`` changed during the scenario must have a newer ``update_date`` than
    before, not before the scenario began, and not before the end of the last call that
    changed it (what dpvoip's own schema links to it: Zadarma calls, answered ones for a
    contact's or lead's ``was_in_touch``, every finished one for a deal's workflow)."""
    ends = _change_times(dsn)
    for table in SALES_TABLES:
        touched = "NULL::date AS was_in_touch, workflow" if table == "crm_deal" \
            else "was_in_touch, NULL::text AS workflow"
        for row in _read(dsn, f"SELECT id, {touched}, update_date FROM {table} ORDER BY id"):
            old = before.rows.get((table, int(row["id"])))
            if old is None or (row["was_in_touch"], row["workflow"]) == (
                    old.was_in_touch, old.workflow):
                continue
            column = "workflow" if table == "crm_deal" else "was_in_touch"
            changed = f"{column} changed"
            rule = "Base.update_date auto_now=True; common/models.py"
            value = row["update_date"]
            if value <= old.update_date:
                findings.add(table, row["id"], "update_date", value,
                             f"later than {old.update_date.isoformat()} ({changed})", rule)
                continue
            bound = max([before.taken_at, *ends.get((table, int(row["id"])), [])])
            if value < bound:
                findings.add(table, row["id"], "update_date", value,
                             f"not before {bound.isoformat()}, when the row was changed"
                             f" ({changed})", rule)


def _change_times(dsn: str) -> dict[tuple[str, int], list[datetime]]:
    """When dpvoip changed each contact, lead and deal at the latest: the end of each
    finished Zadarma call its own schema links to them (answered ones only for contacts
    and leads). Empty when dpvoip's schema does not have the links."""
    if not {"contact_id", "lead_id", "deal_id", "source"} <= _columns(
            dsn, "call_detail", "dpvoip"):
        return {}
    times: dict[tuple[str, int], list[datetime]] = {}
    for row in _read(
            dsn, "SELECT d.contact_id, d.lead_id, d.deal_id, c.status, c.ended_at"
                 " FROM dpvoip.call_detail d JOIN accounting_voipcall c"
                 " ON c.call_id = d.call_id WHERE d.source = 'zadarma'"
                 " AND c.ended_at IS NOT NULL"):
        answered = row["status"] == "completed"
        for table, key, counts in (("crm_contact", "contact_id", answered),
                                   ("crm_lead", "lead_id", answered),
                                   ("crm_deal", "deal_id", True)):
            if counts and row[key] is not None:
                times.setdefault((table, int(row[key])), []).append(row["ended_at"])
    return times
