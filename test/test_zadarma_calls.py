"""A Zadarma call computed from its events: real event sequences, in every order."""

from __future__ import annotations

import itertools
from datetime import datetime

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.core.outcomes import Outcome
from dpvoip.core.texts import Texts
from dpvoip.zadarma.calls import ZadarmaCall, describe, summarise
from dpvoip.zadarma.events import ZadarmaEvent, parse_event

START = "2024-01-01 10:00:00"
PBX = "in_" + "a" * 40
EN, EL = Texts("en"), Texts("el")


def event(kind: str, **fields: str) -> ZadarmaEvent:
    form = {"event": kind, "pbx_call_id": fields.pop("pbx_call_id", PBX),
            "call_start": START, **fields}
    if kind == "NOTIFY_RECORD":
        del form["call_start"]
    parsed = parse_event(form)
    assert isinstance(parsed, ZadarmaEvent)
    return parsed


INCOMING_ANSWERED = [
    event("NOTIFY_START", caller_id="+302101234567", called_did="302107654321"),
    event("NOTIFY_INTERNAL", caller_id="+302101234567", called_did="302107654321",
          internal="100"),
    event("NOTIFY_ANSWER", caller_id="+302101234567", destination="100", internal="100"),
    event("NOTIFY_END", caller_id="+302101234567", called_did="302107654321", internal="100",
          duration="95", disposition="answered", status_code="16", is_recorded="1",
          call_id_with_rec="1704103200.123456"),
]
INCOMING_MISSED = [
    event("NOTIFY_START", caller_id="6912345678", called_did="302107654321"),
    event("NOTIFY_INTERNAL", caller_id="6912345678", called_did="302107654321",
          internal="100"),
    event("NOTIFY_END", caller_id="6912345678", called_did="302107654321", duration="0",
          disposition="no answer", status_code="19", is_recorded="0"),
]
OUTGOING = [
    event("NOTIFY_OUT_START", internal="101", destination="302310555123",
          caller_id="302107654321"),
    event("NOTIFY_OUT_END", internal="101", destination="302310555123",
          caller_id="302107654321", duration="42", disposition="answered",
          status_code="16", is_recorded="0"),
]
CALLBACK = [
    event("NOTIFY_OUT_START", internal="100", destination="306971234567",
          caller_id="302107654321", calltype="callback_leg1"),
    event("NOTIFY_OUT_START", internal="100", destination="302101234567",
          caller_id="302107654321", calltype="callback_leg2"),
    event("NOTIFY_OUT_END", internal="100", destination="302101234567",
          caller_id="302107654321", duration="61", disposition="answered",
          status_code="16", is_recorded="0", calltype="callback_leg2"),
    event("NOTIFY_OUT_END", internal="100", destination="306971234567",
          caller_id="302107654321", duration="70", disposition="answered",
          status_code="16", is_recorded="0", calltype="callback_leg1"),
]


def every_order(events: list[ZadarmaEvent]) -> set[ZadarmaCall | None]:
    return {summarise(order) for order in itertools.permutations(events)}


class SummaryTests(SynchronousTestCase):
    def test_an_incoming_answered_call_in_every_order(self) -> None:
        [call] = every_order(INCOMING_ANSWERED)
        assert call is not None
        self.assertEqual((call.direction, call.remote, call.own_number, call.extension),
                         ("incoming", "+302101234567", "302107654321", "100"))
        self.assertEqual((call.outcome, call.duration, describe(call, EN), call.recording),
                         (Outcome.ANSWERED, 95, "answered, talk 1:35", "1704103200.123456"))
        self.assertEqual(describe(call, EL), "απαντήθηκε, ομιλία 1:35")
        self.assertEqual(call.started, datetime(2024, 1, 1, 10, 0, 0))

    def test_an_incoming_missed_call(self) -> None:
        [call] = every_order(INCOMING_MISSED)
        assert call is not None
        self.assertEqual((call.outcome, call.duration, describe(call, EN)),
                         (Outcome.MISSED, 0, "missed (no answer)"))
        self.assertEqual(describe(call, EL), "αναπάντητη (χωρίς απάντηση)")
        self.assertTrue(call.outcome and call.outcome.wants_ticket(call.direction))

    def test_an_outgoing_call(self) -> None:
        [call] = every_order(OUTGOING)
        assert call is not None
        self.assertEqual((call.direction, call.remote, call.extension, call.outcome,
                          call.duration), ("outgoing", "302310555123", "101",
                                           Outcome.ANSWERED, 42))

    def test_a_callback_is_one_outgoing_call_to_the_customer(self) -> None:
        [call] = every_order(CALLBACK)
        assert call is not None
        self.assertEqual((call.direction, call.remote, call.callback, call.duration,
                          describe(call, EN)), ("outgoing", "302101234567", True, 61,
                                                "answered, callback, talk 1:01"))
        self.assertEqual(describe(call, EL), "απαντήθηκε, επιστροφή κλήσης, ομιλία 1:01")

    def test_a_callback_whose_user_never_answers(self) -> None:
        leg1 = [
            CALLBACK[0],
            event("NOTIFY_OUT_END", internal="100", destination="306971234567",
                  caller_id="302107654321", duration="0", disposition="no answer",
                  status_code="19", is_recorded="0", calltype="callback_leg1"),
        ]
        [call] = every_order(leg1)
        assert call is not None
        self.assertEqual((call.remote, call.outcome, describe(call, EN)),
                         ("", Outcome.NOT_REACHED, "not reached (no answer), callback"))
        self.assertEqual(describe(call, EL),
                         "δεν απάντησε (χωρίς απάντηση), επιστροφή κλήσης")

    def test_a_call_in_progress_has_no_outcome(self) -> None:
        call = summarise(INCOMING_ANSWERED[:3])
        assert call is not None
        self.assertIsNone(call.outcome)
        self.assertTrue(call.answered)
        self.assertFalse(call.final)
        self.assertEqual(describe(call, EN), "", "no notes while the call runs")

    def test_a_recording_notice_alone_is_no_call_yet_and_joins_later(self) -> None:
        record = event("NOTIFY_RECORD", call_id_with_rec="1704103200.999")
        self.assertIsNone(summarise([record]))
        call = summarise([record, *INCOMING_MISSED])
        assert call is not None
        self.assertEqual(call.recording, "1704103200.999")

    def test_duplicates_change_nothing(self) -> None:
        once = summarise(INCOMING_ANSWERED)
        self.assertEqual(summarise(INCOMING_ANSWERED + INCOMING_ANSWERED[1:3]), once)

    def test_a_hidden_caller_and_failures(self) -> None:
        hidden = summarise([event("NOTIFY_START", caller_id="0", called_did="302107654321"),
                            event("NOTIFY_END", caller_id="0", called_did="302107654321",
                                  disposition="cancel", duration="0")])
        assert hidden is not None
        self.assertEqual((hidden.remote, hidden.outcome), ("", Outcome.MISSED))
        failed = summarise([event("NOTIFY_OUT_END", internal="101", destination="4420",
                                  disposition="no money", duration="0")])
        assert failed is not None
        self.assertEqual((failed.outcome, failed.outcome.status if failed.outcome else None,
                          describe(failed, EN)), (Outcome.FAILED, "failed", "failed (no money)"))
        self.assertEqual(describe(failed, EL), "απέτυχε (ανεπαρκές υπόλοιπο)")

    def test_every_disposition_zadarma_documents_has_its_words(self) -> None:
        # zadarma.md: the dispositions of NOTIFY_END and NOTIFY_OUT_END.
        for disposition in ("busy", "cancel", "no answer", "failed", "call failed",
                            "no money", "unallocated number", "no limit", "no day limit",
                            "line limit", "no money, no limit"):
            busy = summarise([event("NOTIFY_OUT_END", internal="101", destination="4420",
                                    disposition=disposition, duration="0")])
            assert busy is not None and busy.outcome is not None
            english, greek = describe(busy, EN), describe(busy, EL)
            self.assertTrue(english.endswith(f"({disposition})")
                            or disposition == busy.outcome.value, english)
            self.assertFalse(any("a" <= ch.lower() <= "z" for ch in greek), greek)
        later = summarise([event("NOTIFY_OUT_END", internal="101", destination="4420",
                                 disposition="some new reason", duration="0")])
        assert later is not None
        self.assertEqual(describe(later, EL), "απέτυχε (some new reason)",
                         "a disposition Zadarma adds later is written as it comes")
