"""The guard's rules on plain data (``dpvoip.zadarma.guard``): what one captured signature
can still be turned into. The same attacks, wired through HTTP into PostgreSQL, are in
test_zadarma_attacks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from dpvoip.core.numbers import Dialling
from dpvoip.zadarma.calls import summarise
from dpvoip.zadarma.events import ZadarmaEvent, parse_event
from dpvoip.zadarma.guard import (
    HIDDEN_SHARE,
    CallbackRequest,
    GuardRules,
    Reason,
    admit,
    as_plain,
    bound,
    form_size,
    freshness,
    same_party,
    signed_key,
    verify_callback,
)

ATHENS = ZoneInfo("Europe/Athens")
GR = Dialling("GR")
START = "2026-01-15 10:00:00"  # 08:00 UTC
ARRIVED = datetime(2026, 1, 15, 8, 0, 5, tzinfo=UTC)
RULES = GuardRules()
PBX = "in_" + "a" * 40


def event(kind: str, **fields: str) -> ZadarmaEvent:
    form = {"event": kind, "pbx_call_id": PBX, "call_start": START, **fields}
    parsed = parse_event(form)
    assert isinstance(parsed, ZadarmaEvent)
    return parsed


CALLER = {"caller_id": "+306912345678", "called_did": "302107654321"}
START_EVENT = event("NOTIFY_START", **CALLER)
END = event("NOTIFY_END", **CALLER, duration="95", disposition="answered", internal="100")


def accepted(new: ZadarmaEvent, before: list[ZadarmaEvent], rules: GuardRules = RULES,
             size: int = 300) -> bool:
    return admit(new, size, before, 300 * len(before), rules).accepted


# -- binding --------------------------------------------------------------------------------


def test_one_signed_string_for_every_kind_that_shares_it() -> None:
    start = {"event": "NOTIFY_START", "pbx_call_id": PBX, "call_start": START, **CALLER}
    key = signed_key(start)
    assert key is not None and len(key) == 32
    # END, INTERNAL, IVR sign the same string; so does an outgoing event whose internal and
    # destination are the caller and the number called, and an ANSWER with the DID as its
    # destination: one binding for all of them, whatever the pbx_call_id or kind says.
    for kind, fields in [
        ("NOTIFY_END", {**CALLER, "duration": "10800", "disposition": "answered"}),
        ("NOTIFY_INTERNAL", CALLER),
        ("NOTIFY_IVR", CALLER),
        ("NOTIFY_OUT_END", {"internal": "+306912345678", "destination": "302107654321"}),
        ("NOTIFY_ANSWER", {"caller_id": "+306912345678", "destination": "302107654321"}),
        # the border between caller_id and called_did moved
        ("NOTIFY_START", {"caller_id": "+3069123456783", "called_did": "02107654321"}),
    ]:
        assert signed_key({"event": kind, "pbx_call_id": "in_other", "call_start": START,
                           **fields}) == key, kind
    assert signed_key({**start, "call_start": "2026-01-15 10:00:01"}) != key


def test_a_signed_string_belongs_to_one_call() -> None:
    assert bound(START_EVENT, 0).accepted
    verdict = bound(START_EVENT, 1)
    assert (verdict.accepted, verdict.reason) == (False, Reason.BOUND_ELSEWHERE)


def test_a_withheld_callers_string_is_shared_by_a_few_calls() -> None:
    for hidden in ("0", ""):
        withheld = event("NOTIFY_START", caller_id=hidden, called_did="302107654321")
        assert bound(withheld, HIDDEN_SHARE - 1).accepted
        assert not bound(withheld, HIDDEN_SHARE).accepted
    # an outgoing event's string is never shared
    out = event("NOTIFY_OUT_START", internal="100", destination="0")
    assert not bound(out, 1).accepted


# -- freshness ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arrived", "reason"), [
    (ARRIVED, None),
    (ARRIVED + timedelta(hours=23, minutes=59), None),
    (ARRIVED + timedelta(hours=24, seconds=1), Reason.STALE),
    (datetime(2026, 1, 15, 7, 50, 1, tzinfo=UTC), None),  # 9 min 59 s before call_start
    (datetime(2026, 1, 15, 7, 49, 59, tzinfo=UTC), Reason.AHEAD),
    (datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC), Reason.STALE),
])
def test_call_start_within_the_window_around_the_arrival(arrived: datetime,
                                                        reason: Reason | None) -> None:
    verdict = freshness(START_EVENT.call_start, ATHENS, arrived, RULES)
    assert verdict.reason == reason
    assert verdict.accepted is (reason is None)


def test_freshness_is_read_in_the_accounts_zone() -> None:
    # 10:00 in Athens is 08:00 UTC; in Tokyo, 01:00 UTC: seven hours older.
    rules = GuardRules(max_age=timedelta(hours=5))
    assert freshness(START_EVENT.call_start, ATHENS, ARRIVED, rules).accepted
    assert freshness(START_EVENT.call_start, ZoneInfo("Asia/Tokyo"), ARRIVED,
                     rules).reason == Reason.STALE


def test_a_recording_notice_has_no_start_to_judge() -> None:
    assert freshness(None, ATHENS, ARRIVED, RULES).accepted


# -- one end --------------------------------------------------------------------------------


def test_a_call_ends_once() -> None:
    assert accepted(END, [START_EVENT])
    # the same end again, through another unsigned field (another journal row): a repeat
    again = event("NOTIFY_END", **CALLER, duration="95", disposition="answered",
                  internal="zzz")
    verdict = admit(again, 300, [START_EVENT, END], 600, RULES)
    assert (verdict.accepted, verdict.repeat, verdict.reason) == (False, True, None)
    # an end that disagrees: refused, the first stays
    for fields in ({"duration": "10800", "disposition": "answered"},
                   {"duration": "95", "disposition": "busy"}):
        other = event("NOTIFY_END", **CALLER, internal="zzz", **fields)
        verdict = admit(other, 300, [START_EVENT, END], 600, RULES)
        assert (verdict.accepted, verdict.repeat, verdict.reason) == (
            False, False, Reason.SECOND_END)


def test_another_calltype_is_no_second_leg_of_a_normal_call() -> None:
    for calltype in ("callback_leg2", "a"):
        other = event("NOTIFY_END", **CALLER, duration="10800", disposition="answered",
                      destination="306999999999", calltype=calltype)
        assert admit(other, 300, [START_EVENT, END], 600, RULES).reason == Reason.SECOND_END
        # and a normal end after a callback leg's
        normal_after = admit(END, 300, [START_EVENT, other], 600, RULES)
        assert normal_after.reason == Reason.SECOND_END


def test_a_callbacks_two_legs_end_once_each() -> None:
    legs = callback_events()
    starts, ends = legs[:2], legs[2:]
    assert accepted(ends[0], starts)
    assert accepted(ends[1], [*starts, ends[0]])


# -- consistency ----------------------------------------------------------------------------


def test_the_events_of_a_call_agree_on_what_is_signed() -> None:
    moved = event("NOTIFY_END", caller_id="+3069123456783", called_did="02107654321",
                  duration="10", disposition="answered")
    assert admit(moved, 300, [START_EVENT], 300, RULES).reason == Reason.INCONSISTENT
    # the same caller spelt otherwise (national, international) is the same caller
    national = event("NOTIFY_INTERNAL", caller_id="6912345678", called_did="2107654321",
                     internal="100")
    assert accepted(national, [START_EVENT])
    later = parse_event({"event": "NOTIFY_INTERNAL", "pbx_call_id": PBX,
                         "call_start": "2026-01-15 10:00:01", **CALLER})
    assert isinstance(later, ZadarmaEvent)
    assert admit(later, 300, [START_EVENT], 300, RULES).reason == Reason.INCONSISTENT


def test_a_legs_destination_is_one() -> None:
    legs = callback_events()
    elsewhere = event("NOTIFY_OUT_END", internal="100", destination="306999999999",
                      duration="10800", disposition="answered", calltype="callback_leg2")
    assert admit(elsewhere, 300, legs[:2], 600, RULES).reason == Reason.INCONSISTENT


def test_same_party() -> None:
    assert same_party("+306912345678", "6912345678")
    assert same_party("0", "")
    assert not same_party("0", "6912345678")
    assert not same_party("+306912345678", "+3069123456783")
    assert not same_party("+306912345678", "+30691234567")


# -- the journal's bound --------------------------------------------------------------------


def test_the_journal_of_a_call_is_bounded() -> None:
    rules = GuardRules(journal_events=10, journal_bytes=4000)
    internals = [event("NOTIFY_INTERNAL", **CALLER, internal=str(100 + n)) for n in range(9)]
    new = event("NOTIFY_INTERNAL", **CALLER, internal="999")
    assert admit(new, 300, internals, 2700, rules).accepted
    assert admit(new, 300, [*internals, new], 3000, rules).reason == Reason.JOURNAL_FULL
    assert admit(new, 1400, internals, 2700, rules).reason == Reason.JOURNAL_FULL
    # the call's end is admitted beyond the bound: variants cannot keep it out
    assert admit(END, 300, [START_EVENT, *internals, new], 3300, rules).accepted


def test_form_size_is_its_json() -> None:
    assert form_size({"a": "b"}) == len('{"a": "b"}')
    assert form_size({"a": "é"}) == len('{"a": "é"}'.encode())


# -- callbacks ------------------------------------------------------------------------------


USER, CUSTOMER = "306971234567", "302101234567"


def callback_events(customer: str = CUSTOMER) -> list[ZadarmaEvent]:
    def out(kind: str, leg: str, destination: str, **extra: str) -> ZadarmaEvent:
        return event(kind, internal="100", destination=destination, calltype=leg,
                     caller_id="302107654321", **extra)

    return [out("NOTIFY_OUT_START", "callback_leg1", USER),
            out("NOTIFY_OUT_START", "callback_leg2", customer),
            out("NOTIFY_OUT_END", "callback_leg2", customer, duration="61",
                disposition="answered"),
            out("NOTIFY_OUT_END", "callback_leg1", USER, duration="70",
                disposition="answered")]


REQUEST = CallbackRequest(USER, "+" + CUSTOMER)


def test_a_callback_dpvoip_asked_for_is_verified() -> None:
    legs = callback_events()
    assert verify_callback(legs, [REQUEST], GR) == REQUEST
    assert verify_callback(legs[:1], [REQUEST], GR) == REQUEST  # the user's leg alone
    assert verify_callback(legs[1:2], [REQUEST], GR) == REQUEST  # the customer's alone


def test_a_callback_nobody_asked_for_is_not() -> None:
    legs = callback_events()
    assert verify_callback(legs, [], GR) is None
    assert verify_callback(legs, [CallbackRequest(USER, "+306999999999")], GR) is None
    assert verify_callback(legs, [CallbackRequest("306970000000", "+" + CUSTOMER)],
                           GR) is None
    # a customer leg naming another number besides the one dialled
    extra = event("NOTIFY_OUT_START", internal="100", destination="306999999999",
                  calltype="callback_leg2", caller_id="302107654321")
    assert verify_callback([*legs, extra], [REQUEST], GR) is None
    # callback legs added to an incoming call: never a callback
    leg = event("NOTIFY_END", **CALLER, destination=CUSTOMER, calltype="callback_leg2",
                duration="10800", disposition="answered")
    assert verify_callback([START_EVENT, leg], [REQUEST], GR) is None


def test_an_unverified_callback_is_what_its_events_say() -> None:
    leg = event("NOTIFY_END", **CALLER, destination="306999999999",
                calltype="callback_leg2", duration="10800", disposition="answered")
    forged = summarise([START_EVENT, leg])
    assert forged is not None
    assert (forged.direction, forged.remote, forged.callback) == (
        "outgoing", "306999999999", True)
    plain = summarise(as_plain([START_EVENT, leg]))
    assert plain is not None
    # the signed caller, incoming: not a call to the number the form named
    assert (plain.direction, plain.remote, plain.callback) == (
        "incoming", "+306912345678", False)
