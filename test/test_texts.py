"""One language (issue 13 point 5): every template of the catalog rendered in both
languages, and the texts dpvoip writes into the CRM (notes, log lines, tickets, the
deal's line, the phone_number markers) rendered from the same data in English and Greek,
never mixed."""

from __future__ import annotations

import re
import string
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.config import ConfigError, TicketSettings, from_toml, parse
from dpvoip.core.call_log import (
    answered_line,
    ended_line,
    ended_notes,
    forwarded_line,
    matched_text,
    remote,
    started_lines,
    started_notes,
)
from dpvoip.core.happenings import Ended
from dpvoip.core.matching import Client, Match, Person
from dpvoip.core.numbers import Dialling, normalise
from dpvoip.core.outcomes import Detail, Outcome, Reason, detail_text, notes, outcome_word
from dpvoip.core.sales import sales_touch
from dpvoip.core.texts import LANGUAGES, MARKER_CHARS, Texts
from dpvoip.core.tickets import (
    TICKET_ACTION,
    MissedCall,
    NewTicket,
    TicketFacts,
    TicketUpdate,
    plan_ticket,
)
from dpvoip.zadarma.calls import ZadarmaCall, describe, disposition_word

EN, EL = Texts("en"), Texts("el")
SOURCE = Path(__file__).parent.parent / "dpvoip"

#: A sample for every placeholder of the catalog: Latin letters and digits only, so that
#: taking them out of a Greek text leaves dpvoip's own words alone.
SAMPLES: dict[str, object] = {
    "number": "+302101234567",
    "name": "Papadopoulos AE",
    "kind": "Kindword",
    "id": 42,
    "extension": 11,
    "notes": "Notesvalue",
    "title": "Titlevalue",
    "machine": "Machinevalue",
    "talk": "1:05",
    "count": 3,
    "time": "17/06/2026 09:05",
    "date": "17.06.2026",
    "outcome": "Outcomevalue",
}
#: Latin words a Greek text may hold besides the values: the "x" of "(3x)".
GREEK_ALLOWED = frozenset({"x"})
#: Keys the code builds from a prefix (an outcome's, a reason's, a kind's, a direction's,
#: a Zadarma disposition's name) rather than spelling them out.
BUILT_KEYS = ("outcome_", "detail_", "kind_", "started_", "workflow_", "disposition_")

GREEK = re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]")
LATIN_WORD = re.compile(r"[A-Za-z]+")


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def rendered(language: str, key: str) -> str:
    return Texts(language)(key, **SAMPLES)


def latin_words(text: str, *values: object) -> set[str]:
    """The Latin words of ``text`` once the ``values`` are taken out, but the allowed."""
    for value in sorted(map(str, values), key=len, reverse=True):
        text = text.replace(value, " ")
    return set(LATIN_WORD.findall(text)) - GREEK_ALLOWED


def assert_greek(case: SynchronousTestCase, text: str, *values: object) -> None:
    case.assertEqual(latin_words(text, *values), set(), f"Latin words in Greek: {text!r}")
    case.assertRegex(text, GREEK, f"no Greek in {text!r}")


def assert_english(case: SynchronousTestCase, text: str) -> None:
    case.assertIsNone(GREEK.search(text), f"Greek letters in English: {text!r}")


class CatalogTests(SynchronousTestCase):
    """Every template of both languages, with sample values."""

    def test_both_languages_have_the_same_keys_and_placeholders(self) -> None:
        self.assertEqual(set(LANGUAGES), {"en", "el"})
        self.assertEqual(set(LANGUAGES["en"]), set(LANGUAGES["el"]))
        for key, english in LANGUAGES["en"].items():
            self.assertEqual(placeholders(english), placeholders(LANGUAGES["el"][key]), key)

    def test_every_template_has_samples_for_its_placeholders(self) -> None:
        for words in LANGUAGES.values():
            for key, template in words.items():
                self.assertLessEqual(placeholders(template), set(SAMPLES), key)

    def test_every_placeholder_is_filled(self) -> None:
        for language, words in LANGUAGES.items():
            for key, template in words.items():
                text = rendered(language, key)
                self.assertNotRegex(text, r"[{}]", f"{language} {key}: {text!r}")
                for name in placeholders(template):
                    self.assertIn(str(SAMPLES[name]), text, f"{language} {key}: {name}")

    def test_no_latin_word_in_any_greek_text(self) -> None:
        for key, template in LANGUAGES["el"].items():
            values = [SAMPLES[name] for name in placeholders(template)]
            assert_greek(self, rendered("el", key), *values)

    def test_no_greek_letter_in_any_english_text(self) -> None:
        for key in LANGUAGES["en"]:
            assert_english(self, rendered("en", key))

    def test_every_greek_text_is_a_translation(self) -> None:
        for key, english in LANGUAGES["en"].items():
            self.assertNotEqual(english, LANGUAGES["el"][key], key)

    def test_every_key_is_used(self) -> None:
        catalog = SOURCE / "core" / "texts.py"
        code = "\n".join(path.read_text("utf-8") for path in SOURCE.rglob("*.py")
                         if path != catalog)
        code += catalog.read_text("utf-8").partition("class Texts")[2]  # not the catalog
        for key in LANGUAGES["en"]:
            self.assertTrue(f'"{key}"' in code or key.startswith(BUILT_KEYS),
                            f"{key} is used nowhere")

    def test_every_key_built_from_a_name_exists(self) -> None:
        for texts in (EN, EL):
            for outcome in Outcome:
                self.assertTrue(outcome_word(outcome, texts))
            for reason in Reason:
                self.assertTrue(detail_text(Detail(reason, "x1"), texts))
            for kind in ("contact", "lead"):
                self.assertTrue(texts.has(f"kind_{kind}"), kind)
            for direction in ("incoming", "outgoing"):
                self.assertTrue(texts.has(f"started_{direction}"), direction)
                self.assertTrue(texts.has(f"workflow_{direction}"), direction)

    def test_the_markers_fit_the_phone_column_and_are_no_numbers(self) -> None:
        for language in LANGUAGES:
            texts = Texts(language)
            for marker in (texts.withheld_marker, texts.internal_marker):
                self.assertLessEqual(len(marker), MARKER_CHARS)
                self.assertTrue(marker.strip())
                self.assertIsNone(normalise(marker, Dialling("GR")), marker)
        self.assertEqual((EN.withheld_marker, EL.withheld_marker), ("withheld", "Απόκρυψη"))
        self.assertEqual((EN.internal_marker, EL.internal_marker), ("internal", "Εσωτερική"))
        self.assertEqual(Texts("el", " Ανώνυμος ").withheld_marker, "Ανώνυμος")


class WithheldLabelSettingTests(SynchronousTestCase):
    def load(self, label: str) -> str:
        config = from_toml(parse(f'[crm]\nwithheld_label = "{label}"\n'))
        return config.crm.withheld_label

    def test_empty_means_by_language(self) -> None:
        self.assertEqual(from_toml({}).crm.withheld_label, "")
        self.assertEqual(self.load("Ανώνυμος"), "Ανώνυμος")

    def test_too_long_blank_or_with_digits_is_refused(self) -> None:
        for label, problem in (("x" * 21, "at most 20"), ("  ", "blank"),
                               ("2101234567", "no digits"), ("caller 0", "no digits")):
            with self.assertRaises(ConfigError) as caught:
                self.load(label)
            self.assertIn("[crm] withheld_label", str(caught.exception))
            self.assertIn(problem, str(caught.exception))


AT = datetime(2026, 6, 17, 6, 5, tzinfo=UTC)


class NotesTests(SynchronousTestCase):
    """The call's notes line, from the data the sources give, in both languages."""

    cases: list[tuple[Ended, str, str]] = [
        (Ended("c", Outcome.ANSWERED, 65, AT, 11),
         "answered on extension 11, talk 1:05", "απαντήθηκε στο εσωτερικό 11, ομιλία 1:05"),
        (Ended("c", Outcome.ANSWERED, 0, AT, 11),
         "answered on extension 11", "απαντήθηκε στο εσωτερικό 11"),
        (Ended("c", Outcome.MISSED, 0, AT, None), "missed", "αναπάντητη"),
        (Ended("c", Outcome.VOICEMAIL, 35, AT, 40),
         "voicemail (answering machine 1), message 0:35",
         "απάντησε ο τηλεφωνητής 1, μήνυμα 0:35"),
        (Ended("c", Outcome.VOICEMAIL, 0, AT, 6),
         "voicemail (answering machine)", "απάντησε ο τηλεφωνητής"),
        (Ended("c", Outcome.BLOCKED, 0, AT, None),
         "blocked by call barring", "απορρίφθηκε από φραγή κλήσεων"),
        (Ended("c", Outcome.NOT_REACHED, 0, AT, 11), "not reached", "δεν απάντησε"),
        (Ended("c", Outcome.FAX, 60, AT, 5), "fax, talk 1:00", "φαξ, ομιλία 1:00"),
        (Ended("c", Outcome.INTERRUPTED, 0, AT, None, Detail(Reason.LINK_LOST)),
         "interrupted: monitor connection lost",
         "διακόπηκε: χάθηκε η σύνδεση με το τηλεφωνικό κέντρο"),
        (Ended("c", Outcome.INTERRUPTED, 0, AT, 11, Detail(Reason.RESTARTED)),
         "interrupted: dpvoip restarted", "διακόπηκε: επανεκκίνηση της υπηρεσίας κλήσεων"),
        (Ended("c", Outcome.INTERRUPTED, 0, AT, None, Detail(Reason.ID_REUSED)),
         "interrupted: DISCONNECT lost, id reused",
         "διακόπηκε: χάθηκε το τέλος της κλήσης, νέα κλήση στην ίδια σύνδεση"),
        (Ended("c", Outcome.MISSED, 0, AT, None, Detail(Reason.RECOVERED)),
         "missed: recovered after a reconnect",
         "αναπάντητη: ολοκληρώθηκε μετά από επανασύνδεση"),
        (Ended("c", Outcome.ANSWERED, 120, AT, 0, Detail(Reason.FORWARDED, "6971234567")),
         "answered on extension 0: forwarded to 6971234567, talk 2:00",
         "απαντήθηκε στο εσωτερικό 0: προωθήθηκε στο 6971234567, ομιλία 2:00"),
        (Ended("c", Outcome.ANSWERED, 60, AT, 11, Detail(Reason.HAIRPIN)),
         "answered on extension 11: internal call to an own number, talk 1:00",
         "απαντήθηκε στο εσωτερικό 11: εσωτερική κλήση σε δικό μας αριθμό, ομιλία 1:00"),
    ]

    def test_every_outcome_and_detail_in_both_languages(self) -> None:
        for ended, english, greek in self.cases:
            self.assertEqual(ended_notes(ended, EN), english)
            self.assertEqual(ended_notes(ended, EL), greek)
            assert_english(self, english)
            assert_greek(self, greek, "6971234567")

    def test_every_outcome_alone(self) -> None:
        for outcome in Outcome:
            assert_english(self, notes(outcome, EN, 11, 7))
            assert_greek(self, notes(outcome, EL, 11, 7))

    def test_the_talk_time_only_when_there_was_talk(self) -> None:
        self.assertEqual(notes(Outcome.ANSWERED, EN, talk=3605), "answered, talk 60:05")
        self.assertEqual(notes(Outcome.MISSED, EN, talk=0), "missed")

    def test_a_free_detail_of_an_older_version_is_kept_as_it_was(self) -> None:
        self.assertEqual(notes(Outcome.INTERRUPTED, EL, detail=Detail(Reason.TEXT, "boom")),
                         "διακόπηκε: boom")

    def test_the_ended_log_line_carries_the_notes(self) -> None:
        ended = Ended("c", Outcome.ANSWERED, 65, AT, 11)
        self.assertEqual(ended_line(ended_notes(ended, EN), EN).text,
                         "Call ended: answered on extension 11, talk 1:05")
        self.assertEqual(ended_line(ended_notes(ended, EL), EL).text,
                         "Τέλος κλήσης: απαντήθηκε στο εσωτερικό 11, ομιλία 1:05")
        self.assertEqual(ended_line("", EL).action, "ended")


def zadarma(outcome: Outcome, disposition: str, duration: int = 0,
            callback: bool = False) -> ZadarmaCall:
    return ZadarmaCall("in_1", "incoming", "+302101234567", "302107654321", None,
                       outcome is Outcome.ANSWERED, "100", outcome, duration, disposition, "",
                       callback)


class ZadarmaNotesTests(SynchronousTestCase):
    def test_both_languages(self) -> None:
        for call, english, greek in [
            (zadarma(Outcome.ANSWERED, "answered", 95), "answered, talk 1:35",
             "απαντήθηκε, ομιλία 1:35"),
            (zadarma(Outcome.MISSED, "busy", callback=True), "missed (busy), callback",
             "αναπάντητη (κατειλημμένο), επιστροφή κλήσης"),
            (zadarma(Outcome.FAILED, "failed"), "failed", "απέτυχε"),
            (zadarma(Outcome.NOT_REACHED, "no answer"), "not reached (no answer)",
             "δεν απάντησε (χωρίς απάντηση)"),
        ]:
            self.assertEqual((describe(call, EN), describe(call, EL)), (english, greek))

    def test_a_disposition_with_a_comma(self) -> None:
        self.assertEqual(disposition_word("no money, no limit", EL),
                         "ανεπαρκές υπόλοιπο, εξαντλήθηκε το όριο")
        self.assertEqual(disposition_word("no money, no limit", EN), "no money, no limit")


class LogLineTests(SynchronousTestCase):
    client = Match("+302101234567", Client(12, "Papadopoulos AE", None), None, None, None, 1)
    contact = Match("+302101234567", None, Person("contact", 3, "Maria Ioannou", None), None,
                    None, 1)

    def test_the_lines_of_a_call_in_both_languages(self) -> None:
        party = remote("02101234567", "+302101234567", EL)
        self.assertEqual(
            [line.text for line in started_lines("incoming", party.shown, self.client, EL)],
            ["Εισερχόμενη κλήση από +302101234567 - Papadopoulos AE",
             "Αντιστοίχιση με πελάτη Papadopoulos AE (#12)"])
        self.assertEqual(
            [line.text for line in started_lines("outgoing", party.shown, self.contact, EN)],
            ["Outgoing call to +302101234567 - Maria Ioannou",
             "Matched to contact Maria Ioannou (#3)"])
        self.assertEqual(matched_text(self.contact, EL),
                         "Αντιστοίχιση με επαφή Maria Ioannou (#3)")
        self.assertEqual(answered_line(11, False, EL).text, "Απαντήθηκε στο εσωτερικό 11")
        self.assertEqual(answered_line(12, True, EL).text, "Μεταφέρθηκε στο εσωτερικό 12")
        self.assertEqual(answered_line(12, True, EN).text, "Taken over by extension 12")
        self.assertEqual(forwarded_line("6971234567", EL).text, "Προωθήθηκε στο 6971234567")
        self.assertEqual(forwarded_line("6971234567", EN).text, "Forwarded to 6971234567")

    def test_withheld_and_internal_callers(self) -> None:
        withheld = remote("", None, EL)
        self.assertEqual(started_lines("incoming", withheld.shown, None, EL)[0].text,
                         "Εισερχόμενη κλήση από απόκρυψη αριθμού - άγνωστος")
        internal = remote("2107654321", None, EL, hairpin=True)
        self.assertEqual(started_lines("outgoing", internal.shown, None, EL)[0].text,
                         "Εξερχόμενη κλήση προς δικό μας αριθμό 2107654321 - άγνωστος")
        self.assertEqual((started_notes(True, EL), started_notes(False, EL)),
                         ("εσωτερική κλήση σε δικό μας αριθμό", ""))
        self.assertEqual(started_notes(True, EN), "internal call to an own number")


ATHENS = ZoneInfo("Europe/Athens")
CALL = MissedCall("+302101234567", "+302101234567", AT, "2107654321", None, False)
FACTS = TicketFacts(open_ticket=None, earlier_missed=0, client_name=None)


class TicketTextTests(SynchronousTestCase):
    def plan(self, texts: Texts, call: MissedCall = CALL,
             facts: TicketFacts = FACTS) -> NewTicket | TicketUpdate:
        return plan_ticket(call, facts, TicketSettings(), texts, ATHENS, Dialling("GR"))

    def test_a_new_ticket(self) -> None:
        english = self.plan(EN, facts=replace(FACTS, client_name="Papadopoulos AE"))
        greek = self.plan(EL, facts=replace(FACTS, client_name="Papadopoulos AE"))
        assert isinstance(english, NewTicket) and isinstance(greek, NewTicket)
        self.assertEqual((english.title, english.description, english.log_line(7)), (
            "MISSED CALL - +302101234567 - Papadopoulos AE",
            "Missed call from +302101234567 (Papadopoulos AE) at 17/06/2026 09:05.",
            "Ticket #7 created: MISSED CALL - +302101234567 - Papadopoulos AE"))
        self.assertEqual((greek.title, greek.description, greek.log_line(7)), (
            "ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - +302101234567 - Papadopoulos AE",
            "Αναπάντητη κλήση από +302101234567 (Papadopoulos AE) στις 17/06/2026 09:05.",
            "Δημιουργήθηκε το τίκετ #7: ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - +302101234567 - Papadopoulos AE"))
        for text in (greek.title, greek.description, greek.log_line(7)):
            assert_greek(self, text, "+302101234567", "Papadopoulos AE", "17/06/2026 09:05")

    def test_a_call_joining_an_open_ticket(self) -> None:
        facts = replace(FACTS, open_ticket=5, earlier_missed=2, client_name="Papadopoulos AE")
        english, greek = self.plan(EN, facts=facts), self.plan(EL, facts=facts)
        assert isinstance(english, TicketUpdate) and isinstance(greek, TicketUpdate)
        self.assertEqual((english.title, english.note, english.log, english.urgent), (
            "MISSED CALLS (3x) - +302101234567 - Papadopoulos AE",
            "[17/06 09:05] missed call (total 3)",
            "Call joined ticket #5: MISSED CALLS (3x) - +302101234567 - Papadopoulos AE",
            True))
        self.assertEqual((greek.title, greek.note, greek.log), (
            "ΑΝΑΠΑΝΤΗΤΕΣ ΚΛΗΣΕΙΣ (3x) - +302101234567 - Papadopoulos AE",
            "[17/06 09:05] αναπάντητη κλήση (σύνολο 3)",
            "Η κλήση προστέθηκε στο τίκετ #5: ΑΝΑΠΑΝΤΗΤΕΣ ΚΛΗΣΕΙΣ (3x) - +302101234567"
            " - Papadopoulos AE"))
        self.assertEqual({english.log_action, greek.log_action}, {TICKET_ACTION})
        self.assertEqual(TICKET_ACTION, "ticket_created")

    def test_a_withheld_caller(self) -> None:
        withheld = MissedCall(EL.withheld_marker, None, AT, "2107654321", None, True)
        ticket = self.plan(EL, call=withheld, facts=replace(FACTS, open_ticket=5))
        assert isinstance(ticket, NewTicket)
        self.assertEqual((ticket.title, ticket.description), (
            "ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - απόκρυψη αριθμού",
            "Αναπάντητη κλήση από απόκρυψη αριθμού στις 17/06/2026 09:05."))


class SalesLineTests(SynchronousTestCase):
    def test_both_languages_and_every_outcome(self) -> None:
        for outcome in Outcome:
            for direction in ("incoming", "outgoing"):
                english = sales_touch(direction, outcome, 65, "Maria Ioannou", AT, ATHENS, EN)
                greek = sales_touch(direction, outcome, 65, "Maria Ioannou", AT, ATHENS, EL)
                assert english is not None and greek is not None
                assert_english(self, english.workflow_line)
                assert_greek(self, greek.workflow_line, "Maria Ioannou", "17.06.2026", "1:05")
        greek = sales_touch("incoming", Outcome.ANSWERED, 65, "Μαρία", AT, ATHENS, EL)
        assert greek is not None
        self.assertEqual(greek.workflow_line,
                         "17.06.2026 - Εισερχόμενη κλήση από Μαρία (απαντήθηκε, 1:05).")
