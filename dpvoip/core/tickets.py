"""Missed-call tickets (behaviour.md section 5): whether a call gets one, whether it joins
an open ticket of its number, when that ticket turns urgent, who it is assigned to, and
the words it carries. Pure: the store reads the facts (``TicketFacts``) and turns the
plan returned here (``NewTicket`` or ``TicketUpdate``) into its statement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Protocol

from dpvoip.core.numbers import Dialling, normalise
from dpvoip.core.outcomes import Outcome
from dpvoip.core.texts import Texts

#: The ticket statuses that still count as open: a missed call may join such a ticket.
OPEN_STATUSES = ("open", "assigned", "in_progress")
#: Where a new ticket's id goes in its log line (the id is known once the row exists).
TICKET_ID = "{id}"
#: The call-log action of a ticket's line, also when the call joins an open ticket: the
#: CRM's model has no other choice for it (the text says which).
TICKET_ACTION = "ticket_created"
#: The CRM's ticket title is at most 200 characters.
TITLE_CHARS = 200


class TicketRules(Protocol):
    """The ticket settings the rules read (``config.TicketSettings``)."""

    @property
    def withheld(self) -> bool: ...
    @property
    def group_hours(self) -> float: ...
    @property
    def urgent_at(self) -> int: ...
    @property
    def assign_by_number(self) -> Mapping[str, str]: ...
    @property
    def assign_by_extension(self) -> Mapping[str, str]: ...


def may_get_ticket(outcome: Outcome) -> bool:
    """Whether a call that ends so could get a ticket, its direction and number not read
    yet: only then is it worth reading the facts (and locking the number) first."""
    return outcome.wants_ticket("incoming")


def gets_ticket(direction: str, outcome: Outcome, withheld: bool, rules: TicketRules) -> bool:
    """An incoming call ending missed or in the voicemail, from a caller who did not
    withhold the number (a withheld caller only when the settings say so). Never a
    blocked, answered, fax or outgoing call."""
    return outcome.wants_ticket(direction) and (not withheld or rules.withheld)


def window(rules: TicketRules) -> timedelta:
    """How far before a call's start an open ticket of its number is joined, and its
    missed calls are counted."""
    return timedelta(hours=rules.group_hours)


def candidate_users(rules: TicketRules) -> tuple[str, ...]:
    """Every CRM username the settings may assign a ticket to (the store reads which of
    them are active users, and their ids, along with the other facts)."""
    return tuple(sorted({*rules.assign_by_extension.values(),
                         *rules.assign_by_number.values()}))


def assignee(own_number: str, extension: int | None, rules: TicketRules,
             where: Dialling) -> str | None:
    """The CRM username a ticket goes to: by the extension that rang or took the call
    first, else by the own number that was called (both sides normalised), else nobody."""
    if extension is not None and str(extension) in rules.assign_by_extension:
        return rules.assign_by_extension[str(extension)]
    if own_number and rules.assign_by_number:
        wanted = normalise(own_number, where) or own_number
        for configured, user in rules.assign_by_number.items():
            if (normalise(configured, where) or configured) == wanted:
                return user
    return None


@dataclass(frozen=True)
class MissedCall:
    """The call a ticket is about, as recorded."""

    phone: str  # the call row's phone_number (the marker when withheld)
    number: str | None  # E.164, None when withheld or not a number
    started_at: datetime  # aware
    own_number: str  # the office's number that was called
    extension: int | None  # the extension that rang or took it (the answering machine)
    withheld: bool  # the caller withheld the number (``numbers.is_withheld`` of the raw)


@dataclass(frozen=True)
class TicketFacts:
    """What the database knows that the decision needs, read under the number's lock."""

    open_ticket: int | None  # the newest open ticket of the number created in the window
    earlier_missed: int  # the number's other missed incoming calls started in the window
    client_name: str | None  # the call's accounting client's name, when it has one
    active_users: Mapping[str, int] = field(default_factory=dict)  # username -> id


@dataclass(frozen=True)
class NewTicket:
    """Create a ticket for the call (status open, or assigned when it has an assignee)."""

    title: str
    description: str
    status: str
    priority: str
    assignee: int | None  # the CRM user's id
    log: str  # the 'ticket_created' line, ``TICKET_ID`` standing for the new id

    @property
    def log_action(self) -> str:
        return TICKET_ACTION

    def log_line(self, ticket_id: int) -> str:
        return self.log.replace(TICKET_ID, str(ticket_id), 1)


@dataclass(frozen=True)
class TicketUpdate:
    """Join the open ticket of the number: new title (with the client's name when the
    call has a client), a note line, urgent or unchanged."""

    ticket: int
    title: str
    urgent: bool  # escalate the priority to 'urgent' (else leave it as it is)
    note: str  # one line appended to the ticket's notes
    log: str  # the call-log line: the call joined the ticket

    @property
    def log_action(self) -> str:
        """The CRM's action choice (it has no 'ticket_updated')."""
        return TICKET_ACTION


TicketPlan = NewTicket | TicketUpdate


def titled(title: str, client_name: str | None) -> str:
    """``title``, with the client's name whenever the call has a client, cut to fit."""
    return (title if client_name is None else f"{title} - {client_name}")[:TITLE_CHARS]


def missed_title(number: str, client_name: str | None, texts: Texts) -> str:
    """A new ticket's title: ``MISSED CALL - {number}`` (``ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ``)."""
    return titled(texts("ticket_title", number=number), client_name)


def grouped_title(count: int, number: str, client_name: str | None, texts: Texts) -> str:
    """The title of a ticket that ``count`` missed calls of ``number`` have joined."""
    return titled(texts("ticket_title_grouped", count=count, number=number), client_name)


def plan_ticket(call: MissedCall, facts: TicketFacts, rules: TicketRules, texts: Texts,
                zone: tzinfo, where: Dialling) -> TicketPlan:
    """What the missed ``call`` does to the tickets: join its number's open ticket, or
    open a new one. A withheld caller always gets a ticket of its own. Times in the texts
    are the call's start in the office's ``zone``. Which ticket is joined never depends
    on titles (the store finds it by the calls' numbers), so their language may change."""
    shown = texts("withheld") if call.withheld else call.phone
    local = call.started_at.astimezone(zone)
    if call.number is not None and not call.withheld and facts.open_ticket is not None:
        count = 1 + facts.earlier_missed
        title = grouped_title(count, shown, facts.client_name, texts)
        return TicketUpdate(
            ticket=facts.open_ticket, title=title, urgent=count >= rules.urgent_at,
            note=texts("ticket_note", time=f"{local:%d/%m %H:%M}", count=count),
            log=texts("ticket_joined", id=facts.open_ticket, title=title),
        )
    title = missed_title(shown, facts.client_name, texts)
    user = assignee(call.own_number, call.extension, rules, where)
    user_id = facts.active_users.get(user) if user is not None else None
    time = f"{local:%d/%m/%Y %H:%M}"
    description = (texts("ticket_description", number=shown, time=time)
                   if facts.client_name is None else
                   texts("ticket_description_client", number=shown, name=facts.client_name,
                         time=time))
    return NewTicket(
        title=title,
        description=description,
        status="open" if user_id is None else "assigned",
        priority="high",
        assignee=user_id,
        log=texts("ticket_created", id=TICKET_ID, title=title),
    )
