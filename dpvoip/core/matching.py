"""The phone directory's rules: which CRM columns hold numbers, and who a number belongs to.

Pure: the index (``directory_index.py``) reads rows and hands them in. Choosing among
several records that share a number is deterministic: an active accounting client first,
then the most recently updated record, then the lowest id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from dpvoip.core.numbers import Dialling, normalise, normalise_once


@dataclass(frozen=True)
class Source:
    """One CRM table the directory reads numbers from."""

    name: str
    table: str
    updated: str
    phones: tuple[str, ...]


SOURCES: tuple[Source, ...] = (
    Source("client", "accounting_clientprofile", "updated_at", (
        "tilefono_oikias_1", "tilefono_oikias_2", "kinito_tilefono",
        "tilefono_epixeirisis_1", "tilefono_epixeirisis_2",
    )),
    Source("contact", "crm_contact", "update_date", ("phone", "other_phone", "mobile")),
    Source("lead", "crm_lead", "update_date", ("phone", "other_phone", "mobile", "company_phone")),
    Source("company", "crm_company", "update_date", ("phone",)),
)
SOURCE_BY_NAME = {source.name: source for source in SOURCES}


def entries(
    source: Source, record_id: int, phones: Sequence[str | None], where: Dialling
) -> list[tuple[str, int, str, str, str]]:
    """(source, record id, column, E.164, the column's text) for every phone column of one
    row that normalises: the text is kept so that a lookup finding it unchanged need not
    parse it again (``confirmed``)."""
    found: list[tuple[str, int, str, str, str]] = []
    for column, raw in zip(source.phones, phones, strict=True):
        number = normalise_once(raw, where)
        if number is not None and raw is not None:
            found.append((source.name, record_id, column, number, raw))
    return found


@dataclass(frozen=True)
class Candidate:
    """A live CRM record whose phone column still holds the number looked up."""

    source: str
    record_id: int
    name: str
    email: str | None
    active: bool
    updated: datetime
    owner_id: int | None = None
    deal_id: int | None = None
    deal_name: str | None = None

    def rank(self) -> tuple[int, float, int]:
        active_client = self.source == "client" and self.active
        return (0 if active_client else 1, -self.updated.timestamp(), self.record_id)


@dataclass(frozen=True)
class Client:
    id: int
    name: str
    email: str | None


@dataclass(frozen=True)
class Person:
    """A CRM contact or lead."""

    kind: str
    id: int
    name: str
    owner_id: int | None


@dataclass(frozen=True)
class Deal:
    id: int
    name: str


@dataclass(frozen=True)
class Match:
    """Who a number belongs to, as far as the CRM knows."""

    number: str
    client: Client | None
    person: Person | None
    deal: Deal | None
    company_name: str | None
    candidates: int

    @property
    def display_name(self) -> str:
        """The name for the phones' display and the call log."""
        if self.client is not None:
            return self.client.name
        if self.person is not None:
            return self.person.name
        return self.company_name or ""

    @property
    def ambiguous(self) -> bool:
        return self.candidates > 1


def choose(number: str, candidates: Iterable[Candidate]) -> Match | None:
    """The deterministic match among live ``candidates``; None when there is none."""
    unique = {(c.source, c.record_id): c for c in candidates}
    if not unique:
        return None
    ordered = sorted(unique.values(), key=Candidate.rank)
    clients = [c for c in ordered if c.source == "client"]
    people = [c for c in ordered if c.source in ("contact", "lead")]
    companies = [c for c in ordered if c.source == "company"]
    client = Client(clients[0].record_id, clients[0].name, clients[0].email) if clients else None
    person = deal = None
    if people:
        best = people[0]
        person = Person(best.source, best.record_id, best.name, best.owner_id)
        if best.deal_id is not None:
            deal = Deal(best.deal_id, best.deal_name or "")
    return Match(
        number=number,
        client=client,
        person=person,
        deal=deal,
        company_name=companies[0].name if companies else None,
        candidates=len(unique),
    )


def confirmed(number: str, raw_phone: str | None, where: Dialling,
              indexed: str | None) -> bool:
    """Whether the live column still holds ``number`` (an edit after indexing undoes a hit).
    ``indexed``: the column's text when the index normalised it to ``number`` (None for an
    entry indexed before the text was kept); the same text now is the same number, without
    parsing it again (a lookup's dearest step when callers seldom repeat)."""
    if indexed is not None and raw_phone == indexed:
        return True
    return normalise(raw_phone, where) == number
