"""One captured Zadarma request, turned into other calls: signed webhooks over HTTP (on
loopback) into the daemon as wired and a real PostgreSQL, with the guard at its default
bounds (docs/threat-model.md). Each attack prints what was sent, acknowledged (HTTP 200:
Zadarma's idea of delivered, given to refused events too), stored and refused.

And tickets exactly once on Zadarma's path: concurrent missed calls of one number."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from twisted.internet import defer

from dpvoip.config import Secret, ZadarmaSettings
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from test.test_zadarma_webhook import SECRET, WebhookTestCase

ATHENS = ZoneInfo("Europe/Athens")
OWN = "302107654321"
MARIA = "306912345678"  # a contact with an active deal
VERA = "306955555555"  # Vera Victim, a contact with an active deal of her own


def local(at: datetime) -> str:
    """``at`` as Zadarma writes ``call_start``: the account's local time."""
    return at.astimezone(ATHENS).strftime("%Y-%m-%d %H:%M:%S")


def now_local(seconds_ago: float = 0) -> str:
    return local(datetime.now(UTC) - timedelta(seconds=seconds_ago))


def captured(pbx: str = "in_" + "c" * 40, start: str | None = None,
             caller: str = MARIA) -> dict[str, str]:
    """The request an attacker captured: a real NOTIFY_START, validly signed."""
    return {"event": "NOTIFY_START", "pbx_call_id": pbx, "call_start": start or now_local(),
            "caller_id": caller, "called_did": OWN}


def end(start: dict[str, str], **fields: str) -> dict[str, str]:
    """A NOTIFY_END built from the captured start: the same signed string."""
    return {**start, "event": "NOTIFY_END", "duration": "0", "disposition": "no answer",
            "status_code": "19", "is_recorded": "0", "calltype": "normal", **fields}


class AttackTestCase(WebhookTestCase):
    zadarma = replace(ZadarmaSettings(), secret=Secret(SECRET), timezone="Europe/Athens",
                      create_tickets=True)  # the default freshness window and bounds

    async def _attack(self, forms: list[dict[str, str]]) -> tuple[int, int]:
        before = self.refused()
        acknowledged = 0
        for form in forms:
            code, _ = await self.post(form)
            acknowledged += code == 200
        return acknowledged, self.refused() - before

    def attack(self, forms: list[dict[str, str]]) -> defer.Deferred[tuple[int, int]]:
        return defer.Deferred.fromCoroutine(self._attack(forms))

    def refused(self) -> int:
        counters = self.daemon.ingest.counters
        return sum(getattr(counters, f"zadarma_{reason}") for reason in (
            "stale", "ahead", "bound_elsewhere", "inconsistent", "second_end",
            "journal_full"))

    def figures(self, sent: int, acknowledged: int, stored: int, refused: int,
                **more: Any) -> None:
        extra = "".join(f", {key} {value}" for key, value in more.items())
        print(f"\n{self.id()}: sent {sent}, acknowledged {acknowledged}, stored {stored},"
              f" refused {refused}{extra}")

    def journal(self) -> tuple[int, int]:
        [(rows, size)] = self.crm.query(
            "SELECT count(*), coalesce(sum(octet_length(form::text)), 0)"
            " FROM dpvoip.zadarma_event")
        return int(rows), int(size)

    def workflows(self) -> list[str]:
        return [w for (w,) in self.crm.query("SELECT workflow FROM crm_deal ORDER BY id")]

    def people(self) -> None:
        maria = self.crm.contact("Maria", "Ioannou", mobile="6912345678")
        self.crm.deal("Maria's deal", contact_id=maria, workflow="")
        vera = self.crm.contact("Vera", "Victim", mobile="6955555555")
        self.crm.deal("Vera's deal", contact_id=vera, workflow="")


class CapturedSignatureTests(AttackTestCase):
    @defer.inlineCallbacks
    def test_fresh_pbx_call_ids_make_no_new_calls(self) -> Any:
        start = captured()
        self.assertEqual((yield self.post(start))[0], 200)  # the real call
        fakes = []
        for n in range(50):
            pbx = f"in_{n:040x}"
            fakes += [{**start, "pbx_call_id": pbx}, end({**start, "pbx_call_id": pbx})]
        acknowledged, refused = yield self.attack(fakes)
        [(calls,)] = self.crm.query("SELECT count(*) FROM accounting_voipcall")
        [(tickets,)] = self.crm.query("SELECT count(*) FROM accounting_ticket")
        self.figures(len(fakes), acknowledged, calls - 1, refused, tickets=tickets)
        self.assertEqual((calls, tickets, refused), (1, 0, 100))
        self.assertEqual(self.daemon.ingest.counters.zadarma_bound_elsewhere, 100)
        self.assertEqual(acknowledged, 100, "answered 200: Zadarma would only retry")
        self.assertEqual(self.journal()[0], 1)
        self.assertEqual(self.crm.query("SELECT count(*) FROM dpvoip.zadarma_binding"), [(1,)])

    @defer.inlineCallbacks
    def test_an_outgoing_events_string_cannot_start_another_call(self) -> Any:
        # A real outgoing call's captured NOTIFY_OUT_START (internal 100 to Vera), replayed
        # as an incoming NOTIFY_START "from 100" to "306955555555" under a new pbx_call_id.
        out = {"event": "NOTIFY_OUT_START", "pbx_call_id": "out_" + "1" * 40,
               "call_start": now_local(), "internal": "100", "destination": VERA,
               "caller_id": OWN, "calltype": "normal"}
        self.assertEqual((yield self.post(out))[0], 200)
        forged = {"event": "NOTIFY_START", "pbx_call_id": "in_" + "2" * 40,
                  "call_start": out["call_start"], "caller_id": "100", "called_did": VERA}
        acknowledged, refused = yield self.attack([forged])
        [(calls,)] = self.crm.query("SELECT count(*) FROM accounting_voipcall")
        self.figures(1, acknowledged, calls - 1, refused)
        self.assertEqual((calls, refused), (1, 1))

    @defer.inlineCallbacks
    def test_a_finished_call_keeps_its_first_end(self) -> Any:
        self.people()
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        start = captured()
        real_end = end(start, duration="65", disposition="answered", status_code="16",
                       internal="100")
        codes = yield self.send_all([start, real_end])
        self.assertEqual(codes, [200, 200])
        variants = [end(start, duration=str(10800 - n), disposition="answered",
                        status_code="16", internal=f"3{n:02d}") for n in range(20)]
        variants += [end(start, disposition="busy", internal="zzz"),
                     end(start, duration="65", disposition="answered", internal="200")]
        acknowledged, refused = yield self.attack(variants)
        [(duration, notes)] = self.crm.query(
            "SELECT duration_seconds, notes FROM accounting_voipcall")
        counters = self.daemon.ingest.counters
        self.figures(len(variants), acknowledged, self.journal()[0] - 2, refused,
                     repeats=counters.replays_ignored)
        self.assertEqual((duration, notes), (65, "answered, talk 1:05"))
        self.assertEqual(counters.zadarma_second_end, 21, "the one that agrees is a repeat")
        self.assertEqual(self.journal()[0], 2)
        [maria, vera] = self.workflows()
        self.assertRegex(maria, r"^\S+ - Incoming call from Maria Ioannou \(answered, 1:05\)\.$")
        self.assertEqual(vera, "")

    @defer.inlineCallbacks
    def test_a_start_cannot_be_turned_into_a_callback_to_someone_else(self) -> Any:
        self.people()
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        start = captured()
        self.assertEqual((yield self.post(start))[0], 200)
        # "Outgoing call to Vera Victim (answered, 180:00)": the customer leg's destination
        # is not signed in a NOTIFY_END.
        forged = end(start, duration="10800", disposition="answered", status_code="16",
                     calltype="callback_leg2", destination=VERA)
        acknowledged, refused = yield self.attack([forged])
        [(direction, phone, status)] = self.crm.query(
            "SELECT direction, phone_number, status FROM accounting_voipcall")
        counters = self.daemon.ingest.counters
        self.figures(1, acknowledged, self.journal()[0] - 1, refused,
                     unverified_callbacks=counters.zadarma_callback_unverified)
        # Recorded as what its signed fields say (Maria's incoming call), with no CRM
        # writes: no workflow line, no was_in_touch, for Maria or Vera.
        self.assertEqual((direction, phone), ("incoming", "+306912345678"))
        # (It came before the real end: its outcome stands, the residual of the threat
        # model. Only this call's, and with no CRM writes.)
        self.assertEqual(status, "completed")
        self.assertEqual(counters.zadarma_callback_unverified, 1)
        self.assertEqual(self.workflows(), ["", ""])
        self.assertEqual(self.crm.query(
            "SELECT count(*) FROM crm_contact WHERE was_in_touch IS NOT NULL"), [(0,)])
        # and the real end after it is refused: a normal leg after the forged one
        real_end = end(start, duration="30", disposition="answered", internal="100")
        self.assertEqual((yield self.post(real_end))[0], 200)
        self.assertEqual(counters.zadarma_second_end, 1)
        self.assertEqual(self.workflows(), ["", ""])

    @defer.inlineCallbacks
    def test_a_callback_dpvoip_asked_for_is_recorded_as_one(self) -> Any:
        self.people()
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        self.requested("306971234567", "+" + VERA)
        common = {"pbx_call_id": "out_" + "d" * 40, "call_start": now_local(),
                  "internal": "100", "caller_id": OWN}
        legs = [("callback_leg1", "306971234567"), ("callback_leg2", VERA)]
        forms = [{"event": "NOTIFY_OUT_START", **common, "destination": number,
                  "calltype": leg} for leg, number in legs]
        forms += [{"event": "NOTIFY_OUT_END", **common, "destination": number,
                   "calltype": leg, "duration": seconds, "disposition": "answered",
                   "status_code": "16", "is_recorded": "0"}
                  for (leg, number), seconds in zip(legs, ("70", "61"), strict=True)]
        codes = yield self.send_all(forms)
        self.assertEqual(codes, [200] * 4)
        [(direction, phone, notes)] = self.crm.query(
            "SELECT direction, phone_number, notes FROM accounting_voipcall")
        self.assertEqual((direction, phone, notes),
                         ("outgoing", "+" + VERA, "answered, callback, talk 1:01"))
        self.assertRegex(self.workflows()[1],
                         r"^\S+ - Outgoing call to Vera Victim \(answered, 1:01\)\.$")
        self.assertEqual(self.daemon.ingest.counters.zadarma_callback_unverified, 0)

    @defer.inlineCallbacks
    def test_a_callback_nobody_asked_for_gets_no_crm_writes(self) -> Any:
        self.people()
        yield defer.Deferred.fromCoroutine(self.daemon.directory.build())
        # a request for another number, and one for Vera long ago
        self.requested("306971234567", "+302101234567")
        self.requested("306971234567", "+" + VERA, ago=3600)
        common = {"pbx_call_id": "out_" + "e" * 40, "call_start": now_local(),
                  "internal": "100", "caller_id": OWN}
        forms = [{"event": "NOTIFY_OUT_START", **common, "destination": VERA,
                  "calltype": "callback_leg2"},
                 {"event": "NOTIFY_OUT_END", **common, "destination": VERA,
                  "calltype": "callback_leg2", "duration": "10800",
                  "disposition": "answered", "status_code": "16", "is_recorded": "0"}]
        codes = yield self.send_all(forms)
        self.assertEqual(codes, [200, 200])
        [(direction, phone, notes)] = self.crm.query(
            "SELECT direction, phone_number, notes FROM accounting_voipcall")
        # what the signed fields say (an outgoing call to that number), not a callback
        self.assertEqual((direction, phone, notes),
                         ("outgoing", "+" + VERA, "answered, talk 180:00"))
        self.assertEqual(self.workflows(), ["", ""])
        self.assertEqual(self.daemon.ingest.counters.zadarma_callback_unverified, 2)

    @defer.inlineCallbacks
    def test_a_captured_request_goes_stale(self) -> Any:
        old = captured(start=now_local(25 * 3600))
        ahead = captured(pbx="in_" + "f" * 40, start=now_local(-11 * 60))
        acknowledged, refused = yield self.attack([old, end(old), ahead])
        [(calls,)] = self.crm.query("SELECT count(*) FROM accounting_voipcall")
        self.figures(3, acknowledged, calls, refused)
        counters = self.daemon.ingest.counters
        self.assertEqual((calls, counters.zadarma_stale, counters.zadarma_ahead), (0, 2, 1))
        self.assertEqual(self.journal(), (0, 0))

    @defer.inlineCallbacks
    def test_the_journal_of_a_call_is_bounded(self) -> Any:
        start = captured()
        self.assertEqual((yield self.post(start))[0], 200)
        variants = [{**start, "event": "NOTIFY_INTERNAL", "internal": str(1000 + n),
                     "calltype": "normal", "transfer_from": "x" * 150} for n in range(300)]
        cpu = time.process_time()
        acknowledged, refused = yield self.attack(variants)
        cpu = time.process_time() - cpu
        rows, size = self.journal()
        self.figures(len(variants), acknowledged, rows - 1, refused,
                     journal_bytes=size, daemon_and_client_cpu_s=round(cpu, 1))
        self.assertLessEqual(rows, 64)
        self.assertLessEqual(size, 64 * 1024)
        self.assertEqual(refused, 300 - (rows - 1))
        self.assertEqual(self.daemon.ingest.counters.zadarma_journal_full, refused)
        # the call is still the one it was, and its real end still comes in
        self.assertEqual((yield self.post(end(start)))[0], 200)
        [(status,)] = self.crm.query("SELECT status FROM accounting_voipcall")
        self.assertEqual(status, "missed")
        self.assertEqual(self.journal()[0], rows + 1)


class CapturedSignatureTests2025(CapturedSignatureTests):
    crm_version = "2025-12"


# -- tickets exactly once ---------------------------------------------------------------------


def event(form: dict[str, str]) -> ZadarmaEvent:
    parsed = parse_event(form)
    assert isinstance(parsed, ZadarmaEvent)
    return parsed


class ConcurrentTicketTests(AttackTestCase):
    """Five missed Zadarma calls of one number ending at the same moment, for several
    numbers at once, five rounds (new numbers each round): one ticket per number, always.
    The events go straight into the ingest (all at once: the web would serialise nothing
    either) on a pool of eight connections."""

    pool_size = 8
    ROUNDS, NUMBERS, CALLS = 5, 4, 5

    async def _round(self, round_: int) -> list[tuple[str, int]]:
        numbers = [f"69{round_:02d}{n:06d}" for n in range(self.NUMBERS)]
        calls = []
        for number in numbers:
            for k in range(self.CALLS):
                # one caller, five calls a second apart: five signed strings
                start = {"event": "NOTIFY_START", "pbx_call_id": f"in_{number}{k:030d}",
                         "call_start": now_local(30 - k), "caller_id": number,
                         "called_did": OWN}
                calls.append((start, end(start)))
        # every start first, then every end at once
        await defer.gatherResults([defer.Deferred.fromCoroutine(self._submit(s))
                                   for s, _ in calls])
        await defer.gatherResults([defer.Deferred.fromCoroutine(self._submit(e))
                                   for _, e in calls])
        found = self.crm.query(
            "SELECT d.remote_number, count(DISTINCT t.id) FROM dpvoip.call_detail d"
            " JOIN accounting_ticket t ON t.id = d.ticket_id WHERE d.remote_number ="
            " ANY(%s) GROUP BY d.remote_number ORDER BY 1",
            (["+30" + n for n in numbers],))
        return [(str(number), int(count)) for number, count in found]

    async def _submit(self, form: dict[str, str]) -> None:
        await self.daemon.ingest.submit_zadarma(event(form), form,
                                                self.daemon.zadarma.context)

    @defer.inlineCallbacks
    def test_concurrent_missed_calls_of_one_number_make_one_ticket(self) -> Any:
        problems = []
        sent = tickets = 0
        for round_ in range(self.ROUNDS):
            per_number = yield defer.Deferred.fromCoroutine(self._round(round_))
            sent += self.NUMBERS * self.CALLS
            tickets += sum(count for _, count in per_number)
            if len(per_number) != self.NUMBERS or any(c != 1 for _, c in per_number):
                problems.append(f"round {round_}: tickets per number {per_number}")
        [(linked,)] = self.crm.query(
            "SELECT count(*) FROM accounting_voipcall WHERE ticket_created")
        duplicated = tickets - self.ROUNDS * self.NUMBERS
        print(f"\n{self.id()}: calls sent {sent}, numbers {self.ROUNDS * self.NUMBERS},"
              f" tickets {tickets}, duplicated {duplicated}, calls linked {linked}")
        self.assertEqual(problems, [])
        self.assertEqual(linked, sent, "every missed call is linked to its number's ticket")
        [(titles,)] = self.crm.query(
            "SELECT count(*) FROM accounting_ticket WHERE title LIKE 'MISSED CALLS (5x)%%'")
        self.assertEqual(titles, self.ROUNDS * self.NUMBERS)


class ConcurrentTicketTests2025(ConcurrentTicketTests):
    crm_version = "2025-12"
