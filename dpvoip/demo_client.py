"""``dpvoip demo-client``: one CRM client with the demos' number, so that their calls show a
name, a client link and a ticket for someone, without writing SQL against a table of eight
NOT NULL columns and no database defaults.

The row is the one the CRM's own code writes for ``ClientProfile(afm=..., eponimia=...,
kinito_tilefono=..., email=...)`` (``accounting/models.py`` of both CRM versions): every
text field that has ``default=''`` written as '' (Django never leaves them NULL), the
choice ``eidos_ipoxreou`` at its default ``professional``, ``agrotis`` false, ``is_active``
true, both timestamps now; dates and the links to a company or contact NULL. Its tax number
(``afm``, unique) is a made-up one that passes the CRM's checksum and marks the demo
client: a second run updates that client instead of adding another.

Pure: the checks and the row (``demo_row``). The command itself (``add_demo_client``) runs
through the store it is given: the row written (``dpvoip.store.demo``), the phone directory
brought up to date, and the number looked up as a call from it would be.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `dpvoip --help` reads this module's defaults
    from dpvoip.core.numbers import Dialling

DEMO_AFM = "123456783"
"""The demo client's tax number: nine digits whose last is the CRM's checksum of the first
eight (``validate_afm`` in the CRM), so the CRM's forms accept the row as it is."""

DEMO_NUMBER = "6912345678"
"""The mobile that calls in both demos (etc/scenarios/demo.txt, zadarma-demo.txt)."""

DEMO_NAME = "Demo client"
DEMO_EMAIL = "demo@example.com"

#: ``ClientProfile``'s text fields declared ``null=True, default=''`` in both CRM versions.
BLANK_TEXT = (
    "doy", "onoma", "onoma_patros", "arithmos_taftotitas", "eidos_taftotitas",
    "prosopikos_arithmos", "amka", "am_ika", "arithmos_gemi", "arithmos_dypa", "filo",
    "diefthinsi_katoikias", "arithmos_katoikias", "poli_katoikias", "dimos_katoikias",
    "nomos_katoikias", "tk_katoikias", "tilefono_oikias_1", "tilefono_oikias_2",
    "kinito_tilefono", "diefthinsi_epixeirisis", "arithmos_epixeirisis", "poli_epixeirisis",
    "dimos_epixeirisis", "nomos_epixeirisis", "tk_epixeirisis", "tilefono_epixeirisis_1",
    "tilefono_epixeirisis_2", "email", "trapeza", "iban", "katigoria_vivlion",
    "nomiki_morfi", "afm_sizigou", "afm_foreas", "am_klidi",
    # Only in the 2025-12 CRM (the newest keeps these credentials in another table).
    "onoma_xristi_taxisnet", "kodikos_taxisnet", "onoma_xristi_ika_ergodoti",
    "kodikos_ika_ergodoti", "onoma_xristi_gemi", "kodikos_gemi",
)

#: The columns' sizes in both CRM versions (varchar(n)).
MAX_PHONE, MAX_NAME, MAX_EMAIL = 20, 200, 254
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class DemoClientError(ValueError):
    """Options the demo client cannot be written with; nothing was changed."""


@dataclass(frozen=True)
class DemoClient:
    number: str  # as it goes into the CRM (free text there)
    e164: str  # as dpvoip matches it
    name: str
    email: str


def afm_valid(afm: str) -> bool:
    """The CRM's check of a Greek tax number: nine digits, the last the checksum."""
    if len(afm) != 9 or not afm.isdigit():
        return False
    total = sum(int(afm[i]) << (8 - i) for i in range(8))
    return total % 11 % 10 == int(afm[8])


def checked(number: str, name: str, email: str, where: Dialling,
            own_numbers: Iterable[str] = ()) -> DemoClient:
    """The demo client the options describe, or ``DemoClientError`` saying what is wrong."""
    from dpvoip.core.numbers import normalise

    number, name, email = number.strip(), name.strip(), email.strip()
    e164 = normalise(number, where)
    if e164 is None:
        raise DemoClientError(f"{number!r} is not a number dpvoip matches calls against")
    if len(number) > MAX_PHONE:
        raise DemoClientError(f"{number!r} is longer than the CRM's {MAX_PHONE} characters "
                              "for a phone; write it without spaces")
    own = {normalise(raw, where) for raw in own_numbers}
    if e164 in own:
        raise DemoClientError(f"{e164} is one of the office's own numbers, which dpvoip never "
                              "matches to a client")
    if not name or len(name) > MAX_NAME:
        raise DemoClientError(f"the name must be 1 to {MAX_NAME} characters")
    if email and (len(email) > MAX_EMAIL or not _EMAIL.fullmatch(email)):
        raise DemoClientError(f"{email!r} is not an email address")
    return DemoClient(number, e164, name, email)


def demo_row(client: DemoClient, columns: Iterable[str]) -> dict[str, object]:
    """The row the CRM writes for this client, limited to the table's ``columns`` (the
    timestamps are the store's: the database's now)."""
    present = set(columns)
    row: dict[str, object] = {name: "" for name in BLANK_TEXT if name in present}
    row.update(afm=DEMO_AFM, eponimia=client.name, kinito_tilefono=client.number,
               email=client.email, eidos_ipoxreou="professional", agrotis=False,
               is_active=True)
    return row


async def add_demo_client(store: Any, config: Any, number: str, name: str, email: str,
                          out: Callable[[str], None] = print) -> int:
    """The command's body on a connected ``store``: 0 when a call from the number now
    matches the demo client, 1 (with the reason on ``out``) otherwise."""
    from dpvoip.core.numbers import Dialling
    from dpvoip.service import own_numbers
    from dpvoip.store.demo import client_columns, put_client
    from dpvoip.store.directory import DirectoryIndex
    from dpvoip.store.migrations import SchemaMismatch, prepare

    schema = config.database.crm_schema
    where = Dialling(config.directory.region)
    try:
        client = checked(number, name, email, where, own_numbers(config))
    except DemoClientError as error:
        out(f"dpvoip: demo-client: {error}")
        return 1
    try:  # standalone: the CRM tables made if this database has none yet
        await store.write(lambda cursor: prepare(cursor, standalone=config.standalone,
                                                 crm_schema=schema))
    except SchemaMismatch as error:
        out(f"dpvoip: {error}")
        return 1
    row = demo_row(client, await client_columns(store, schema))
    client_id, created = await put_client(store, schema, row)
    out(f"{'created' if created else 'updated'} CRM client {client_id}: {client.name}, "
        f"mobile {client.number}, tax number {DEMO_AFM}")
    index = DirectoryIndex(store, schema, where, own_numbers(config))
    if await index.needs_build():
        await index.build()
    else:
        await index.refresh()
    match = await index.lookup(client.e164)
    if match is None or match.client is None or match.client.id != client_id:
        found = "nothing" if match is None else match.display_name
        out(f"dpvoip: demo-client: a call from {client.e164} matches {found}, not the demo "
            "client (does another CRM record have that number?)")
        return 1
    out(f"a call from {client.e164} now matches: {match.display_name}")
    return 0
