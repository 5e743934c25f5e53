"""The words dpvoip writes into the CRM: call log lines and ticket texts, per language.

Ticket titles keep the form the CRM's users know (``MISSED CALL - {number}``) in every
language: people search for them.
"""

from __future__ import annotations

from collections.abc import Mapping

_EN: Mapping[str, str] = {
    "started_incoming": "Incoming call from {number} - {name}",
    "started_outgoing": "Outgoing call to {number} - {name}",
    "unknown": "unknown",
    "withheld": "withheld number",
    "client_matched": "Matched to {kind} {name} (#{id})",
    "answered": "Answered on extension {extension}",
    "transferred": "Taken over by extension {extension}",
    "forwarded": "Forwarded to {number}",
    "status_changed": "Status {old} -> {new}",
    "ended": "Call ended: {notes}, talk time {talk}",
    "missed": "Missed call from {number}",
    "ticket_created": "Ticket #{id} created: {title}",
    "ticket_updated": "Ticket #{id} updated: {title}",
    "ticket_description": "Missed call from {number}{client} at {time}.",
    "ticket_note": "[{time}] missed call (total {count})",
}

_EL: Mapping[str, str] = {
    "started_incoming": "Εισερχόμενη κλήση από {number} - {name}",
    "started_outgoing": "Εξερχόμενη κλήση προς {number} - {name}",
    "unknown": "άγνωστος",
    "withheld": "απόκρυψη αριθμού",
    "client_matched": "Αντιστοίχιση με {kind} {name} (#{id})",
    "answered": "Απάντηση στο εσωτερικό {extension}",
    "transferred": "Μεταφορά στο εσωτερικό {extension}",
    "forwarded": "Προώθηση στο {number}",
    "status_changed": "Κατάσταση {old} -> {new}",
    "ended": "Τέλος κλήσης: {notes}, διάρκεια ομιλίας {talk}",
    "missed": "Αναπάντητη κλήση από {number}",
    "ticket_created": "Δημιουργία αιτήματος #{id}: {title}",
    "ticket_updated": "Ενημέρωση αιτήματος #{id}: {title}",
    "ticket_description": "Αναπάντητη κλήση από {number}{client} στις {time}.",
    "ticket_note": "[{time}] αναπάντητη κλήση (σύνολο {count})",
}

LANGUAGES: Mapping[str, Mapping[str, str]] = {"en": _EN, "el": _EL}


class Texts:
    def __init__(self, language: str = "en") -> None:
        self._words = LANGUAGES[language]

    def __call__(self, key: str, **values: object) -> str:
        return self._words[key].format(**values)


def missed_title(number: str, client_name: str | None) -> str:
    """A new ticket's title; with the client's name whenever the call has a client (the
    CRM's column is at most 200 characters)."""
    title = f"MISSED CALL - {number}"
    return (title if client_name is None else f"{title} - {client_name}")[:200]


def grouped_title(count: int, number: str) -> str:
    """The title of a ticket that ``count`` missed calls of ``number`` have joined."""
    return f"MISSED CALLS ({count}x) - {number}"[:200]
