"""The call rules without a database (behaviour.md sections 2, 3, 5 and 6): whether a call
gets a ticket, joins its number's open one, turns it urgent, whom it is assigned to, the
ticket's words in English and Greek, the call log's lines, and the CRM's sales side."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.config import TicketSettings
from dpvoip.core.call_log import (
    LogLine,
    Remote,
    matched_text,
    remote,
    started_lines,
)
from dpvoip.core.matching import Client, Deal, Match, Person
from dpvoip.core.numbers import Dialling
from dpvoip.core.outcomes import Outcome
from dpvoip.core.sales import SalesTouch, sales_touch
from dpvoip.core.texts import Texts
from dpvoip.core.tickets import (
    MissedCall,
    NewTicket,
    TicketFacts,
    TicketUpdate,
    assignee,
    candidate_users,
    gets_ticket,
    may_get_ticket,
    plan_ticket,
    window,
)

ATHENS = ZoneInfo("Europe/Athens")
GR = Dialling("GR")
EN, EL = Texts("en"), Texts("el")
RULES = TicketSettings()
#: 09:05 in Athens (summer time, UTC+3).
STARTED = datetime(2026, 6, 17, 6, 5, 0, tzinfo=UTC)
CALL = MissedCall(phone="+302101234567", number="+302101234567", started_at=STARTED,
                  own_number="2107654321", extension=None, withheld=False)
WITHHELD = replace(CALL, phone="withheld", number=None, withheld=True)
NOTHING = TicketFacts(open_ticket=None, earlier_missed=0, client_name=None)


def plan(call: MissedCall = CALL, facts: TicketFacts = NOTHING,
         rules: TicketSettings = RULES, texts: Texts = EN) -> NewTicket | TicketUpdate:
    return plan_ticket(call, facts, rules, texts, ATHENS, GR)


class WhoGetsATicketTests(SynchronousTestCase):
    def test_incoming_missed_and_voicemail_calls_of_a_known_number(self) -> None:
        for outcome in (Outcome.MISSED, Outcome.VOICEMAIL):
            self.assertTrue(gets_ticket("incoming", outcome, False, RULES), outcome)

    def test_never_blocked_answered_fax_failed_or_interrupted_calls(self) -> None:
        for outcome in (Outcome.BLOCKED, Outcome.ANSWERED, Outcome.FAX, Outcome.NOT_REACHED,
                        Outcome.INTERRUPTED, Outcome.BUSY, Outcome.FAILED):
            self.assertFalse(gets_ticket("incoming", outcome, False, RULES), outcome)
            self.assertFalse(may_get_ticket(outcome), outcome)

    def test_outgoing_calls_never(self) -> None:
        for outcome in Outcome:
            self.assertFalse(gets_ticket("outgoing", outcome, False, RULES), outcome)

    def test_withheld_callers_only_when_configured(self) -> None:
        self.assertFalse(gets_ticket("incoming", Outcome.MISSED, True, RULES))
        self.assertTrue(gets_ticket("incoming", Outcome.MISSED, True,
                                    replace(RULES, withheld=True)))

    def test_the_facts_are_read_only_for_an_end_that_may_get_a_ticket(self) -> None:
        self.assertEqual([o for o in Outcome if may_get_ticket(o)],
                         [Outcome.MISSED, Outcome.VOICEMAIL])

    def test_the_window_is_the_configured_hours(self) -> None:
        self.assertEqual(window(replace(RULES, group_hours=1.5)).total_seconds(), 5400)


class NewTicketTests(SynchronousTestCase):
    def test_a_first_missed_call_opens_a_high_priority_ticket(self) -> None:
        self.assertEqual(plan(), NewTicket(
            title="MISSED CALL - +302101234567",
            description="Missed call from +302101234567 at 17/06/2026 09:05.",
            status="open", priority="high", assignee=None,
            log="Ticket #{id} created: MISSED CALL - +302101234567",
        ))

    def test_the_clients_name_goes_into_title_and_description(self) -> None:
        ticket = plan(facts=replace(NOTHING, client_name="Papadopoulos AE"))
        assert isinstance(ticket, NewTicket)
        self.assertEqual(ticket.title, "MISSED CALL - +302101234567 - Papadopoulos AE")
        self.assertEqual(ticket.description, "Missed call from +302101234567"
                                             " (Papadopoulos AE) at 17/06/2026 09:05.")
        self.assertEqual(ticket.log_line(42),
                         "Ticket #42 created: MISSED CALL - +302101234567 - Papadopoulos AE")

    def test_the_title_fits_the_crms_200_characters(self) -> None:
        ticket = plan(facts=replace(NOTHING, client_name="A" * 300))
        self.assertEqual(len(ticket.title), 200)
        self.assertTrue(ticket.title.startswith("MISSED CALL - +302101234567 - AAA"))

    def test_a_missed_call_outside_the_window_opens_a_new_ticket(self) -> None:
        # Outside the window the store finds no open ticket, however many calls came.
        ticket = plan(facts=replace(NOTHING, earlier_missed=7))
        assert isinstance(ticket, NewTicket)
        self.assertEqual((ticket.title, ticket.priority), ("MISSED CALL - +302101234567", "high"))

    def test_a_withheld_caller_always_gets_a_ticket_of_its_own(self) -> None:
        ticket = plan(WITHHELD, replace(NOTHING, open_ticket=5, earlier_missed=4))
        assert isinstance(ticket, NewTicket)
        self.assertEqual(ticket.log_action, "ticket_created")
        self.assertEqual(ticket.title, "MISSED CALL - withheld number")
        self.assertEqual(ticket.description,
                         "Missed call from withheld number at 17/06/2026 09:05.")


class GroupingTests(SynchronousTestCase):
    def test_a_missed_call_joins_the_open_ticket_of_its_number(self) -> None:
        update = plan(facts=replace(NOTHING, open_ticket=5, earlier_missed=1))
        self.assertEqual(update,
                         TicketUpdate(ticket=5, title="MISSED CALLS (2x) - +302101234567",
                                      urgent=False,
                                      note="[17/06 09:05] missed call (total 2)",
                                      log="Call joined ticket #5:"
                                          " MISSED CALLS (2x) - +302101234567"))
        self.assertEqual(update.log_action, "ticket_created",
                         "the CRM's model has no 'ticket_updated' action")

    def test_a_joined_ticket_learns_the_calls_client(self) -> None:
        update = plan(facts=replace(NOTHING, open_ticket=5, earlier_missed=2,
                                    client_name="Papadopoulos AE"))
        assert isinstance(update, TicketUpdate)
        self.assertEqual(update.title, "MISSED CALLS (3x) - +302101234567 - Papadopoulos AE")
        self.assertEqual(update.log,
                         "Call joined ticket #5: MISSED CALLS (3x) - +302101234567"
                         " - Papadopoulos AE")
        long = plan(facts=replace(NOTHING, open_ticket=5, client_name="A" * 300))
        self.assertEqual(len(long.title), 200)
        self.assertTrue(long.title.startswith("MISSED CALLS (1x) - +302101234567 - AAA"))

    def test_a_withheld_caller_never_joins_a_ticket_whatever_its_marker(self) -> None:
        # A marker that happens to read like the number of an open ticket changes nothing:
        # the rules look at whether the caller withheld the number, never at the column.
        marked = replace(WITHHELD, phone="+302101234567")
        self.assertIsInstance(plan(marked, replace(NOTHING, open_ticket=5)), NewTicket)

    def test_the_ticket_turns_urgent_at_the_threshold(self) -> None:
        urgent = [plan(facts=replace(NOTHING, open_ticket=5, earlier_missed=n))
                  for n in range(1, 5)]
        self.assertEqual([isinstance(u, TicketUpdate) and u.urgent for u in urgent],
                         [False, True, True, True])

    def test_the_threshold_is_configurable(self) -> None:
        rules = replace(RULES, urgent_at=5)
        urgent = [plan(facts=replace(NOTHING, open_ticket=5, earlier_missed=n), rules=rules)
                  for n in (2, 3, 4)]
        self.assertEqual([isinstance(u, TicketUpdate) and u.urgent for u in urgent],
                         [False, False, True])


class AssignmentTests(SynchronousTestCase):
    rules = replace(RULES, assign_by_extension={"40": "anna"},
                    assign_by_number={"210 765 4321": "bob", "+302109999999": "carl"})
    users = {"anna": 7, "bob": 8}

    def ticket(self, own_number: str = CALL.own_number,
               extension: int | None = None) -> NewTicket:
        ticket = plan(replace(CALL, own_number=own_number, extension=extension),
                      replace(NOTHING, active_users=self.users), self.rules)
        assert isinstance(ticket, NewTicket)
        return ticket

    def test_by_the_extension_first(self) -> None:
        ticket = self.ticket(extension=40)
        self.assertEqual((ticket.status, ticket.assignee), ("assigned", 7))

    def test_by_the_called_own_number_written_any_way(self) -> None:
        for own in ("2107654321", "+302107654321", "00302107654321"):
            ticket = self.ticket(own_number=own, extension=11)
            self.assertEqual((ticket.status, ticket.assignee), ("assigned", 8), own)

    def test_an_inactive_or_unknown_user_leaves_the_ticket_open(self) -> None:
        ticket = self.ticket(own_number="2109999999")
        self.assertEqual((ticket.status, ticket.assignee), ("open", None))
        self.assertEqual(assignee("2109999999", None, self.rules, GR), "carl")

    def test_nobody_without_a_configured_extension_or_number(self) -> None:
        self.assertIsNone(assignee("2100000000", 11, self.rules, GR))
        self.assertIsNone(assignee("", None, self.rules, GR))

    def test_the_users_to_look_up(self) -> None:
        self.assertEqual(candidate_users(self.rules), ("anna", "bob", "carl"))
        self.assertEqual(candidate_users(RULES), ())


class GreekTests(SynchronousTestCase):
    def test_a_new_tickets_words(self) -> None:
        ticket = plan(facts=replace(NOTHING, client_name="Παπαδόπουλος"), texts=EL)
        assert isinstance(ticket, NewTicket)
        self.assertEqual(ticket.title, "ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - +302101234567 - Παπαδόπουλος")
        self.assertEqual(ticket.description, "Αναπάντητη κλήση από +302101234567"
                                             " (Παπαδόπουλος) στις 17/06/2026 09:05.")
        self.assertEqual(ticket.log_line(3), "Δημιουργήθηκε το τίκετ #3: " + ticket.title)

    def test_a_joined_tickets_words(self) -> None:
        update = plan(facts=replace(NOTHING, open_ticket=5, earlier_missed=2), texts=EL)
        assert isinstance(update, TicketUpdate)
        self.assertEqual(update.note, "[17/06 09:05] αναπάντητη κλήση (σύνολο 3)")
        self.assertEqual(update.title, "ΑΝΑΠΑΝΤΗΤΕΣ ΚΛΗΣΕΙΣ (3x) - +302101234567")
        self.assertEqual(update.log, "Η κλήση προστέθηκε στο τίκετ #5:"
                                     " ΑΝΑΠΑΝΤΗΤΕΣ ΚΛΗΣΕΙΣ (3x) - +302101234567")
        self.assertEqual(update.log_action, "ticket_created")

    def test_a_withheld_caller(self) -> None:
        self.assertEqual(plan(WITHHELD, texts=EL).title, "ΑΝΑΠΑΝΤΗΤΗ ΚΛΗΣΗ - απόκρυψη αριθμού")


class SalesSideTests(SynchronousTestCase):
    #: 23:30 UTC is already the next day in Athens.
    now = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)

    def test_an_answered_call_touches_the_person_today_and_writes_one_line(self) -> None:
        self.assertEqual(
            sales_touch("incoming", Outcome.ANSWERED, 95, "Maria Ioannou", self.now, ATHENS,
                        EN),
            SalesTouch(in_touch_on=date(2026, 3, 2),
                       workflow_line="02.03.2026 - Incoming call from Maria Ioannou"
                                     " (answered, 1:35)."))

    def test_a_missed_call_writes_the_line_but_no_touch(self) -> None:
        self.assertEqual(
            sales_touch("incoming", Outcome.MISSED, 0, "Nikos Georgiou", self.now, ATHENS, EN),
            SalesTouch(None, "02.03.2026 - Incoming call from Nikos Georgiou (missed, 0:00)."))

    def test_an_outgoing_call(self) -> None:
        touch = sales_touch("outgoing", Outcome.BUSY, 0, "Maria Ioannou", self.now, ATHENS, EN)
        assert touch is not None
        self.assertEqual(touch.workflow_line,
                         "02.03.2026 - Outgoing call to Maria Ioannou (busy, 0:00).")
        self.assertIsNone(touch.in_touch_on)

    def test_nothing_while_the_call_runs_or_for_a_caller_who_is_no_person(self) -> None:
        self.assertIsNone(sales_touch("incoming", None, 0, "Maria", self.now, ATHENS, EN))
        self.assertIsNone(sales_touch("incoming", Outcome.ANSWERED, 9, None, self.now, ATHENS,
                                      EN))

    def test_in_greek(self) -> None:
        touch = sales_touch("incoming", Outcome.ANSWERED, 65, "Μαρία Ιωάννου", self.now,
                            ATHENS, EL)
        assert touch is not None
        self.assertEqual(touch.workflow_line,
                         "02.03.2026 - Εισερχόμενη κλήση από Μαρία Ιωάννου (απαντήθηκε, 1:05).")
        touch = sales_touch("outgoing", Outcome.NOT_REACHED, 0, "Μαρία", self.now, ATHENS, EL)
        assert touch is not None
        self.assertEqual(touch.workflow_line,
                         "02.03.2026 - Εξερχόμενη κλήση προς Μαρία (δεν απάντησε, 0:00).")


class CallLogTests(SynchronousTestCase):
    client = Match("+302101234567", Client(12, "Papadopoulos AE", None), None, None, None, 1)
    lead = Match("+302101234567", None, Person("lead", 3, "Nikos Georgiou", None),
                 Deal(4, "Deal"), None, 1)
    company = Match("+302101234567", None, None, None, "Company AE", 1)

    def test_the_phone_column(self) -> None:
        self.assertEqual(remote("02101234567", "+302101234567", EN),
                         Remote("+302101234567", "+302101234567", False))
        self.assertEqual(remote(" 12345678901234567890123 ", None, EN).column,
                         "12345678901234567890")

    def test_a_withheld_caller_gets_a_marker_never_a_blank(self) -> None:
        for raw in ("", "anonymous", "0", "sip:anonymous@anonymous.invalid"):
            self.assertEqual(remote(raw, None, EN), Remote("withheld", "withheld number", True))
            self.assertEqual(remote(raw, None, EL),
                             Remote("Απόκρυψη", "απόκρυψη αριθμού", True))
        self.assertEqual(remote("", None, Texts("el", "Ανώνυμος")).column, "Ανώνυμος")
        self.assertEqual(remote("", None, Texts("en", "  hidden ")).column, "hidden")

    def test_an_internal_call_to_an_own_number(self) -> None:
        self.assertEqual(remote("2107654321", None, EN, hairpin=True),
                         Remote("internal", "own number 2107654321", False))
        self.assertEqual(remote("2107654321", None, EL, hairpin=True),
                         Remote("Εσωτερική", "δικό μας αριθμό 2107654321", False))

    def test_a_matched_call_starts_with_two_lines(self) -> None:
        self.assertEqual(started_lines("incoming", "+302101234567", self.client, EN), [
            LogLine("started", "Incoming call from +302101234567 - Papadopoulos AE"),
            LogLine("client_matched", "Matched to client Papadopoulos AE (#12)"),
        ])

    def test_an_unknown_or_withheld_caller_with_one(self) -> None:
        self.assertEqual(started_lines("outgoing", remote("", None, EN).shown, None, EN),
                         [LogLine("started", "Outgoing call to withheld number - unknown")])
        self.assertEqual(started_lines("incoming", "+302101234567", None, EL), [
            LogLine("started", "Εισερχόμενη κλήση από +302101234567 - άγνωστος")])

    def test_whom_the_number_matched(self) -> None:
        self.assertEqual(matched_text(self.lead, EN), "Matched to lead Nikos Georgiou (#3)")
        self.assertEqual(matched_text(self.company, EN), "Matched to company Company AE")

    def test_whom_the_number_matched_in_greek(self) -> None:
        self.assertEqual(matched_text(self.client, EL),
                         "Αντιστοίχιση με πελάτη Papadopoulos AE (#12)")
        self.assertEqual(matched_text(self.lead, EL),
                         "Αντιστοίχιση με δυνητικό πελάτη Nikos Georgiou (#3)")
        self.assertEqual(matched_text(self.company, EL), "Αντιστοίχιση με εταιρεία Company AE")
