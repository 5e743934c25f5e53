"""Every word dpvoip writes into the CRM, per language: call notes, call-log lines, ticket
titles, descriptions and notes, the deal's workflow line, and the markers of the call
row's phone_number for a withheld caller and an internal call.

One catalog per language, with the same keys; ``Texts`` is one language of it, chosen by
``[crm] language``, so that a row never mixes two languages. The Greek is as an office in
Greece writes it, with the CRM's own words where it has them ('Αναπάντητη', 'τίκετ',
'Εσωτερική'). Only values (numbers, names, times, Zadarma's own words for a disposition
it adds later) are written as they come. ``test/test_texts.py`` renders every template
of both languages.
"""

from __future__ import annotations

from collections.abc import Mapping

_EN: Mapping[str, str] = {
    # -- the remote party, in texts and in the call row's phone_number ----------------------
    "unknown": "unknown",
    "withheld": "withheld number",
    "withheld_marker": "withheld",
    "internal_marker": "internal",
    "own_number": "own number {number}",
    # -- the call log ----------------------------------------------------------------------
    "started_incoming": "Incoming call from {number} - {name}",
    "started_outgoing": "Outgoing call to {number} - {name}",
    "client_matched": "Matched to {kind} {name} (#{id})",
    "company_matched": "Matched to company {name}",
    "kind_client": "client",
    "kind_contact": "contact",
    "kind_lead": "lead",
    "answered": "Answered on extension {extension}",
    "transferred": "Taken over by extension {extension}",
    "forwarded": "Forwarded to {number}",
    "ended": "Call ended: {notes}",
    "ticket_created": "Ticket #{id} created: {title}",
    "ticket_joined": "Call joined ticket #{id}: {title}",
    # -- the call's notes: the outcome, its detail, the talk time ----------------------------
    "outcome_answered": "answered",
    "outcome_missed": "missed",
    "outcome_voicemail": "voicemail",
    "outcome_blocked": "blocked",
    "outcome_not_reached": "not reached",
    "outcome_fax": "fax",
    "outcome_interrupted": "interrupted",
    "outcome_busy": "busy",
    "outcome_failed": "failed",
    "answered_on": "answered on extension {extension}",
    "voicemail_on": "voicemail ({machine})",
    "machine": "answering machine",
    "machine_numbered": "answering machine {number}",
    "blocked_by_barring": "blocked by call barring",
    "with_talk": "{notes}, talk {talk}",
    "with_message": "{notes}, message {talk}",
    "detail_link_lost": "monitor connection lost",
    "detail_restarted": "dpvoip restarted",
    "detail_id_reused": "DISCONNECT lost, id reused",
    "detail_recovered": "recovered after a reconnect",
    "detail_forwarded": "forwarded to {number}",
    "detail_hairpin": "internal call to an own number",
    "detail_call_list": "from the box's call list",
    # A finished call's outcome corrected by the box's call list, and its ticket's note.
    "corrected": "Corrected from the box's call list: {notes}",
    "ticket_note_blocked": "[{time}] the call of {date} was blocked by the box (its call"
                           " list): not a missed call",
    # Zadarma: its disposition when it says more than the outcome, and a callback.
    "with_callback": "{notes}, callback",
    "disposition_busy": "busy",
    "disposition_cancel": "cancel",
    "disposition_no_answer": "no answer",
    "disposition_failed": "failed",
    "disposition_call_failed": "call failed",
    "disposition_no_money": "no money",
    "disposition_unallocated_number": "unallocated number",
    "disposition_no_limit": "no limit",
    "disposition_no_day_limit": "no day limit",
    "disposition_line_limit": "line limit",
    "disposition_no_money_no_limit": "no money, no limit",
    # -- missed-call tickets -----------------------------------------------------------------
    "ticket_title": "MISSED CALL - {number}",
    "ticket_title_grouped": "MISSED CALLS ({count}x) - {number}",
    "ticket_description": "Missed call from {number} at {time}.",
    "ticket_description_client": "Missed call from {number} ({name}) at {time}.",
    "ticket_note": "[{time}] missed call (total {count})",
    # -- the deal's workflow (the CRM's sales side) ------------------------------------------
    "workflow_incoming": "{date} - Incoming call from {name} ({outcome}, {talk}).",
    "workflow_outgoing": "{date} - Outgoing call to {name} ({outcome}, {talk}).",
}

_EL: Mapping[str, str] = {
    "unknown": "άγνωστος",
    "withheld": "απόκρυψη αριθμού",
    "withheld_marker": "Απόκρυψη",
    "internal_marker": "Εσωτερική",
    "own_number": "δικό μας αριθμό {number}",
    "started_incoming": "Εισερχόμενη κλήση από {number} - {name}",
    "started_outgoing": "Εξερχόμενη κλήση προς {number} - {name}",
    "client_matched": "Αντιστοίχιση με {kind} {name} (#{id})",
    "company_matched": "Αντιστοίχιση με εταιρεία {name}",
    "kind_client": "πελάτη",
    "kind_contact": "επαφή",
    "kind_lead": "δυνητικό πελάτη",
    "answered": "Απαντήθηκε στο εσωτερικό {extension}",
    "transferred": "Μεταφέρθηκε στο εσωτερικό {extension}",
    "forwarded": "Προωθήθηκε στο {number}",
    "ended": "Τέλος κλήσης: {notes}",
    "ticket_created": "Δημιουργήθηκε το τίκετ #{id}: {title}",
    "ticket_joined": "Η κλήση προστέθηκε στο τίκετ #{id}: {title}",
    "outcome_answered": "απαντήθηκε",
    "outcome_missed": "αναπάντητη",
    "outcome_voicemail": "τηλεφωνητής",
    "outcome_blocked": "φραγή",
    "outcome_not_reached": "δεν απάντησε",
    "outcome_fax": "φαξ",
    "outcome_interrupted": "διακόπηκε",
    "outcome_busy": "κατειλημμένο",
    "outcome_failed": "απέτυχε",
    "answered_on": "απαντήθηκε στο εσωτερικό {extension}",
    "voicemail_on": "απάντησε ο {machine}",
    "machine": "τηλεφωνητής",
    "machine_numbered": "τηλεφωνητής {number}",
    "blocked_by_barring": "απορρίφθηκε από φραγή κλήσεων",
    "with_talk": "{notes}, ομιλία {talk}",
    "with_message": "{notes}, μήνυμα {talk}",
    "detail_link_lost": "χάθηκε η σύνδεση με το τηλεφωνικό κέντρο",
    "detail_restarted": "επανεκκίνηση της υπηρεσίας κλήσεων",
    "detail_id_reused": "χάθηκε το τέλος της κλήσης, νέα κλήση στην ίδια σύνδεση",
    "detail_recovered": "ολοκληρώθηκε μετά από επανασύνδεση",
    "detail_forwarded": "προωθήθηκε στο {number}",
    "detail_hairpin": "εσωτερική κλήση σε δικό μας αριθμό",
    "detail_call_list": "από τη λίστα κλήσεων του τηλεφωνικού κέντρου",
    "corrected": "Διόρθωση από τη λίστα κλήσεων του τηλεφωνικού κέντρου: {notes}",
    "ticket_note_blocked": "[{time}] η κλήση της {date} ήταν φραγή από το τηλεφωνικό"
                           " κέντρο (λίστα κλήσεων), όχι αναπάντητη",
    "with_callback": "{notes}, επιστροφή κλήσης",
    "disposition_busy": "κατειλημμένο",
    "disposition_cancel": "ακυρώθηκε",
    "disposition_no_answer": "χωρίς απάντηση",
    "disposition_failed": "αποτυχία",
    "disposition_call_failed": "αποτυχία κλήσης",
    "disposition_no_money": "ανεπαρκές υπόλοιπο",
    "disposition_unallocated_number": "ανύπαρκτος αριθμός",
    "disposition_no_limit": "εξαντλήθηκε το όριο",
    "disposition_no_day_limit": "εξαντλήθηκε το ημερήσιο όριο",
    "disposition_line_limit": "όλες οι γραμμές κατειλημμένες",
    "disposition_no_money_no_limit": "ανεπαρκές υπόλοιπο, εξαντλήθηκε το όριο",
    "ticket_title": "ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - {number}",
    "ticket_title_grouped": "ΑΝΑΠΑΝΤΗΤΕΣ ΚΛΗΣΕΙΣ ({count}x) - {number}",
    "ticket_description": "Αναπάντητη κλήση από {number} στις {time}.",
    "ticket_description_client": "Αναπάντητη κλήση από {number} ({name}) στις {time}.",
    "ticket_note": "[{time}] αναπάντητη κλήση (σύνολο {count})",
    "workflow_incoming": "{date} - Εισερχόμενη κλήση από {name} ({outcome}, {talk}).",
    "workflow_outgoing": "{date} - Εξερχόμενη κλήση προς {name} ({outcome}, {talk}).",
}

LANGUAGES: Mapping[str, Mapping[str, str]] = {"en": _EN, "el": _EL}
#: The longest withheld marker: the CRM's phone_number is varchar(20).
MARKER_CHARS = 20


class Texts:
    """One language of the catalog, and the markers the call row's phone_number gets.

    ``withheld_label`` is ``[crm] withheld_label``: the marker written for a withheld
    caller ('' for the language's own word, ``withheld`` / ``Απόκρυψη``). The marker is
    only ever written; whether a caller is withheld is decided on the number itself.
    """

    def __init__(self, language: str = "en", withheld_label: str = "") -> None:
        self.language = language
        self._words = LANGUAGES[language]
        label = withheld_label.strip()
        self.withheld_marker = label[:MARKER_CHARS] if label else self._words[
            "withheld_marker"]
        self.internal_marker = self._words["internal_marker"]

    def __call__(self, key: str, **values: object) -> str:
        return self._words[key].format(**values)

    def has(self, key: str) -> bool:
        return key in self._words



# -- the live page (``GET /voip/``) and the screen pop (``/voip/popup.js``) ----------------
# Words shown to the office, never written into the CRM; the same keys in both languages
# (``test/test_live_page.py`` checks it). Outcomes and the withheld caller are the
# catalog's own words above (``outcome_*``, ``withheld``), so that the page and the call's
# notes say the same.

_PAGE_EN: Mapping[str, str] = {
    "title": "Calls, live",
    "in_progress": "Calls in progress",
    "recent": "Today's calls",
    "tickets": "Open missed-call tickets",
    "boxes": "Fritz!Box lines",
    "none_in_progress": "No call in progress.",
    "none_recent": "No call yet today.",
    "none_tickets": "No open ticket.",
    "none_boxes": "No Fritz!Box has reported yet.",
    "col_time": "Time",
    "col_direction": "Direction",
    "col_number": "Number",
    "col_client": "Client",
    "col_extension": "Extension",
    "col_line": "Line",
    "col_state": "State",
    "col_outcome": "Outcome",
    "col_duration": "Duration",
    "col_count": "Missed calls",
    "col_opened": "Opened",
    "state_ringing": "ringing",
    "state_answered": "in conversation",
    "direction_incoming": "incoming",
    "direction_outgoing": "outgoing",
    "box_connected": "connected",
    "box_disconnected": "disconnected",
    "box_since": "since {time}",
    "live": "live",
    "reconnecting": "reconnecting…",
    "popup_ringing": "Incoming call",
    "popup_unknown": "unknown caller",
    "popup_open_client": "Open the client",
    "popup_close": "Close",
    "popup_enable": "Desktop notifications",
    "popup_answered": "answered",
    "signed_out": "Sign in to the CRM to see the calls.",
    "sign_in": "Sign in",
    "unavailable": "The CRM database is not reachable; try again shortly.",
}

_PAGE_EL: Mapping[str, str] = {
    "title": "Κλήσεις, ζωντανά",
    "in_progress": "Κλήσεις σε εξέλιξη",
    "recent": "Σημερινές κλήσεις",
    "tickets": "Ανοιχτά τίκετ αναπάντητων κλήσεων",
    "boxes": "Γραμμές Fritz!Box",
    "none_in_progress": "Καμία κλήση σε εξέλιξη.",
    "none_recent": "Καμία κλήση σήμερα ακόμη.",
    "none_tickets": "Κανένα ανοιχτό τίκετ.",
    "none_boxes": "Κανένα Fritz!Box δεν έχει αναφερθεί ακόμη.",
    "col_time": "Ώρα",
    "col_direction": "Κατεύθυνση",
    "col_number": "Αριθμός",
    "col_client": "Πελάτης",
    "col_extension": "Εσωτερικό",
    "col_line": "Γραμμή",
    "col_state": "Κατάσταση",
    "col_outcome": "Αποτέλεσμα",
    "col_duration": "Διάρκεια",
    "col_count": "Αναπάντητες",
    "col_opened": "Άνοιξε",
    "state_ringing": "χτυπάει",
    "state_answered": "σε συνομιλία",
    "direction_incoming": "εισερχόμενη",
    "direction_outgoing": "εξερχόμενη",
    "box_connected": "συνδεδεμένο",
    "box_disconnected": "αποσυνδεδεμένο",
    "box_since": "από {time}",
    "live": "ζωντανά",
    "reconnecting": "επανασύνδεση…",
    "popup_ringing": "Εισερχόμενη κλήση",
    "popup_unknown": "άγνωστος καλών",
    "popup_open_client": "Άνοιγμα πελάτη",
    "popup_close": "Κλείσιμο",
    "popup_enable": "Ειδοποιήσεις στην επιφάνεια εργασίας",
    "popup_answered": "απαντήθηκε",
    "signed_out": "Συνδεθείτε στο CRM για να δείτε τις κλήσεις.",
    "sign_in": "Σύνδεση",
    "unavailable": "Η βάση δεδομένων του CRM δεν απαντά· δοκιμάστε ξανά σε λίγο.",
}

PAGE_WORDS: Mapping[str, Mapping[str, str]] = {"en": _PAGE_EN, "el": _PAGE_EL}
