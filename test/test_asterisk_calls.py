"""Following Asterisk's calls with plain data: every scenario of the fake Asterisk (the
event bursts of real calls) through the follower, its outcome, direction, number,
extension and talk time; ids stable across a replay; bounds under a flood; the Cdr only
confirming; the settings refusing bad values."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.asterisk.calls import CallFollower, PbxRules
from dpvoip.asterisk.messages import Message, message
from dpvoip.asterisk.settings import ConfigError, read_settings, rules_of
from dpvoip.core.happenings import (
    Answered,
    Ended,
    Forwarded,
    Happening,
    Started,
    Unmatched,
)
from dpvoip.core.outcomes import Outcome, Reason
from dpvoip.testing.asterisk import SCENARIOS, Beat, ChannelTable, Pbx

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def play(beats: list[Beat], follower: CallFollower | None = None,
         start: datetime = T0) -> list[Happening]:
    follower = follower or CallFollower(PbxRules("office"))
    at, out = start, []
    for beat in beats:
        at += timedelta(seconds=beat.delay)
        out += follower.feed(beat.message, at)
    return out


def listed_after(beats: list[Beat], listed_at: datetime, start: datetime = T0
                 ) -> list[Message]:
    """The PBX's ``CoreShowChannels`` at ``listed_at``, once ``beats`` have happened (from
    ``start``) while nobody was listening."""
    table, at = ChannelTable(), start
    for beat in beats:
        at += timedelta(seconds=beat.delay)
        table.follow(beat.fields, at.timestamp())
    return [Message(tuple(fields)) for fields in table.listing("list", listed_at.timestamp())]


def _id(happening: Happening) -> str:
    assert not isinstance(happening, Unmatched)
    return happening.call_id


def scenario(name: str, **params: Any) -> list[Happening]:
    return play(SCENARIOS[name](Pbx(), **params))


class ScenarioTests(SynchronousTestCase):
    def summary(self, happened: list[Happening]) -> tuple[Any, ...]:
        """(direction, remote, answers as (extension, transfer), outcome, talk, extension)."""
        [started] = [h for h in happened if isinstance(h, Started)]
        [ended] = [h for h in happened if isinstance(h, Ended)]
        answers = [(h.extension, h.transfer) for h in happened if isinstance(h, Answered)]
        self.assertEqual({_id(h) for h in happened}, {started.call_id})  # one call
        return (started.direction, started.remote, answers, ended.outcome, ended.duration,
                ended.extension)

    def test_incoming_answered(self) -> None:
        happened = scenario("incoming-answered", caller="6912345678", ext="201", ring=5,
                            talk=65)
        self.assertEqual(self.summary(happened),
                         ("incoming", "6912345678", [(201, False)], Outcome.ANSWERED, 65, 201))
        started = happened[0]
        assert isinstance(started, Started)
        self.assertEqual((started.own_number, started.line, started.at, started.box),
                         ("2107654321", "PJSIP/provider", T0, "office"))
        self.assertTrue(started.call_id.startswith("ast-office-"))

    def test_incoming_missed_the_caller_gave_up(self) -> None:
        self.assertEqual(self.summary(scenario("incoming-missed", ring=20)),
                         ("incoming", "6912345678", [], Outcome.MISSED, 0, 201))

    def test_incoming_voicemail_the_message_length_is_the_talk(self) -> None:
        self.assertEqual(self.summary(scenario("incoming-voicemail", ring=20, talk=15)),
                         ("incoming", "6912345678", [], Outcome.VOICEMAIL, 15, 201))

    def test_incoming_busy_is_a_missed_call_for_the_caller(self) -> None:
        self.assertEqual(self.summary(scenario("incoming-busy")),
                         ("incoming", "6912345678", [], Outcome.MISSED, 0, 201))

    def test_outgoing_answered(self) -> None:
        happened = scenario("outgoing-answered", ext="203", number="2101234567", talk=42)
        self.assertEqual(self.summary(happened),
                         ("outgoing", "2101234567", [(203, False)], Outcome.ANSWERED, 42, 203))
        started = happened[0]
        assert isinstance(started, Started)
        self.assertEqual(started.extension, 203)

    def test_outgoing_not_answered_is_not_reached(self) -> None:
        self.assertEqual(self.summary(scenario("outgoing-unanswered")),
                         ("outgoing", "2101234567", [], Outcome.NOT_REACHED, 0, 201))

    def test_outgoing_busy(self) -> None:
        self.assertEqual(self.summary(scenario("outgoing-busy")),
                         ("outgoing", "2101234567", [], Outcome.BUSY, 0, 201))

    def test_blind_transfer_stays_one_call(self) -> None:
        self.assertEqual(self.summary(scenario("blind-transfer", ring=4, talk=20)),
                         ("incoming", "6912345678", [(201, False), (202, True)],
                          Outcome.ANSWERED, 44, 202))

    def test_attended_transfer_stays_one_call(self) -> None:
        # The consultation (201 calling 202) is a call of its own Linkedid, between the
        # office's phones: not recorded; 202 joining the caller's bridge is a transfer.
        follower = CallFollower(PbxRules("office"))
        happened = play(SCENARIOS["attended-transfer"](Pbx(), ring=4, talk=20), follower)
        self.assertEqual(self.summary(happened),
                         ("incoming", "6912345678", [(201, False), (202, True)],
                          Outcome.ANSWERED, 54, 202))
        self.assertEqual(follower.counters.internal, 1)
        self.assertEqual(follower.followed, (0, 0, 0))

    def test_pickup_is_answered_by_the_phone_that_picked_it_up(self) -> None:
        self.assertEqual(self.summary(scenario("pickup", ext="201", to="205", talk=30)),
                         ("incoming", "6912345678", [(205, False)], Outcome.ANSWERED, 30, 205))

    def test_a_queue_ringing_three_phones_is_one_call(self) -> None:
        self.assertEqual(self.summary(scenario("queue", exts="201,202,203", ext="203",
                                               talk=50)),
                         ("incoming", "6912345678", [(203, False)], Outcome.ANSWERED, 50, 203))

    def test_every_scenario_leaves_nothing_behind_and_the_cdr_agrees(self) -> None:
        for name, build in SCENARIOS.items():
            follower = CallFollower(PbxRules("office"))
            play(build(Pbx()), follower)
            self.assertEqual(follower.followed, (0, 0, 0), name)
            self.assertEqual((follower.counters.cdr_confirmed,
                              follower.counters.cdr_disagreed), (1, 0), name)

    def test_a_call_forwarded_to_a_mobile(self) -> None:
        pbx = Pbx()
        outside = pbx.outside("6912345678")
        mobile = pbx.channel("PJSIP/provider", "from-internal", "6977000000",
                             linkedid=outside.linkedid)
        pbx.new(mobile)
        pbx.dial_begin(outside, mobile, "provider/6977000000")
        pbx.wait(5)
        bridge = pbx.answer(outside, mobile)
        pbx.wait(30)
        pbx.part(bridge, outside, mobile)
        happened = play(pbx.take())
        self.assertIn(Forwarded(_id(happened[0]), "6977000000", T0), happened)
        ended = happened[-1]
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.duration, ended.extension,
                          ended.detail and ended.detail.value),
                         (Outcome.ANSWERED, 30, None, "6977000000"))


class TimesAndIdsTests(SynchronousTestCase):
    def test_the_events_own_timestamps_win_over_arrival(self) -> None:
        pbx = Pbx()
        beats = SCENARIOS["incoming-answered"](pbx, ring=5, talk=65)
        stamped, at = [], 1772442000.0
        for beat in beats:
            at += beat.delay
            stamped.append(Beat(0, (*beat.fields, ("Timestamp", f"{at:.6f}"))))
        happened = play(stamped)  # all arriving at once (a burst after a stall)
        self.assertEqual(happened[0].at, datetime.fromtimestamp(1772442000, UTC))
        ended = happened[-1]
        assert isinstance(ended, Ended)
        self.assertEqual(ended.duration, 65)

    def test_the_same_events_give_the_same_ids_after_a_restart(self) -> None:
        beats = SCENARIOS["incoming-missed"](Pbx(epoch=1772442000))
        first = play(beats)
        again = play(beats, start=T0 + timedelta(hours=1))  # a replay, another follower
        self.assertEqual([_id(h) for h in first], [_id(h) for h in again])
        self.assertEqual(_id(first[0]), "ast-office-1772442000.0")

    def test_a_reconnect_closes_open_calls_as_interrupted(self) -> None:
        follower = CallFollower(PbxRules("office"))
        beats = SCENARIOS["incoming-answered"](Pbx())
        play(beats[:8], follower)
        [ended] = follower.close_all(Reason.LINK_LOST, T0)
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.detail and ended.detail.reason, ended.extension),
                         (Outcome.INTERRUPTED, Reason.LINK_LOST, 201))
        self.assertEqual(follower.followed, (0, 0, 0))
        # The rest of the call's events, for channels it no longer knows: nothing.
        self.assertEqual(play(beats[8:], follower), [])

    def test_after_a_reconnect_a_call_the_pbx_still_has_is_followed_on(self) -> None:
        follower = CallFollower(PbxRules("office"))
        beats = SCENARIOS["incoming-answered"](Pbx())
        before = play(beats[:8], follower)  # ringing, answered: then the link went
        alive = {m.get("Uniqueid") for m in (b.message for b in beats[:8])
                 if m.event == "Newchannel"}
        self.assertEqual(follower.resume(alive, T0), [])
        after = play(beats[8:], follower)
        [ended] = [h for h in after if isinstance(h, Ended)]
        self.assertEqual((ended.outcome, ended.extension), (Outcome.ANSWERED, 201))
        self.assertEqual({_id(h) for h in before + after}, {_id(before[0])})
        self.assertEqual(follower.followed, (0, 0, 0))

    def test_after_a_reconnect_a_call_whose_caller_is_gone_is_closed(self) -> None:
        """Its outside channel is not on the PBX any more: it ended while the link was
        down, and how is not known (an extension's channel still up does not keep it)."""
        follower = CallFollower(PbxRules("office"))
        beats = SCENARIOS["incoming-answered"](Pbx())
        play(beats[:8], follower)
        made = [m for m in (b.message for b in beats[:8]) if m.event == "Newchannel"]
        outside = made[0].get("Uniqueid")  # the trunk's channel comes first
        inside = {m.get("Uniqueid") for m in made} - {outside}
        [ended] = follower.resume(inside, T0)
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.detail and ended.detail.reason),
                         (Outcome.INTERRUPTED, Reason.LINK_LOST))
        self.assertEqual(follower.followed, (0, 0, 0))
        self.assertEqual(follower.resume(set(), T0), [], "nothing left to close")

    def test_a_call_begun_while_the_link_was_down_is_adopted_from_the_list(self) -> None:
        """Ringing when dpvoip logs in again: recorded as if its events had come (the
        same id, caller, number called and start), then followed to its end."""
        beats = SCENARIOS["incoming-missed"](Pbx())
        follower = CallFollower(PbxRules("office"))
        later = T0 + timedelta(seconds=3)
        adopted = follower.adopt(listed_after(beats[:5], later), later)
        self.assertEqual(adopted, play(beats)[:1])
        started = adopted[0]
        assert isinstance(started, Started)
        self.assertEqual((started.remote, started.own_number, started.at),
                         ("6912345678", "2107654321", T0))
        [ended] = play(beats[5:], follower, start=later)
        assert isinstance(ended, Ended)
        self.assertEqual((ended.call_id, ended.outcome, ended.extension),
                         (started.call_id, Outcome.MISSED, 201))
        self.assertEqual(follower.followed, (0, 0, 0))

    def test_an_adopted_call_answered_meanwhile_is_answered_when_listed(self) -> None:
        beats = SCENARIOS["incoming-answered"](Pbx())  # 5 s ringing, then answered
        follower = CallFollower(PbxRules("office"))
        later = T0 + timedelta(seconds=10)
        started, answered = follower.adopt(listed_after(beats[:11], later), later)
        assert isinstance(started, Started) and isinstance(answered, Answered)
        self.assertEqual((started.at, answered.extension, answered.at, answered.transfer),
                         (T0, 201, later, False))
        ended = play(beats[11:], follower, start=later)[-1]
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.duration), (Outcome.ANSWERED, 65))

    def test_a_followed_call_answered_while_the_link_was_down_is_answered(self) -> None:
        beats = SCENARIOS["incoming-answered"](Pbx())
        follower = CallFollower(PbxRules("office"))
        play(beats[:5], follower)  # ringing: then the link went; answered meanwhile
        later = T0 + timedelta(seconds=10)
        listed = listed_after(beats[:11], later)
        self.assertEqual(follower.resume({m.get("Uniqueid") for m in listed}, later), [])
        [answered] = follower.adopt(listed, later)
        assert isinstance(answered, Answered)
        self.assertEqual(answered.extension, 201)
        self.assertEqual(follower.adopt(listed, later), [], "listed twice: nothing new")

    def test_an_outgoing_call_is_adopted_with_the_number_dialled(self) -> None:
        beats = SCENARIOS["outgoing-answered"](Pbx())
        follower = CallFollower(PbxRules("office"))
        later = T0 + timedelta(seconds=3)
        adopted = follower.adopt(listed_after(beats[:4], later), later)
        self.assertEqual(adopted, play(beats)[:1])
        started = adopted[0]
        assert isinstance(started, Started)
        self.assertEqual((started.direction, started.remote, started.extension),
                         ("outgoing", "2101234567", 201))

    def test_an_adopted_caller_in_voicemail_is_a_voicemail(self) -> None:
        """The outside channel moved on in the dialplan: the number called is no longer
        shown, and is not guessed; the voicemail it is in is."""
        beats = SCENARIOS["incoming-voicemail"](Pbx())
        upto = next(n for n, b in enumerate(beats) if b.message.get("Context") == "macro-vm")
        follower = CallFollower(PbxRules("office"))
        later = T0 + timedelta(seconds=30)
        [started] = follower.adopt(listed_after(beats[:upto + 1], later), later)
        assert isinstance(started, Started)
        self.assertEqual((started.remote, started.own_number), ("6912345678", ""))
        ended = play(beats[upto + 1:], follower, start=later)[-1]
        assert isinstance(ended, Ended)
        self.assertEqual(ended.outcome, Outcome.VOICEMAIL)

    def test_a_queue_call_is_adopted_without_the_queue_as_the_number_called(self) -> None:
        """The caller's channel moved on to the queue (``ext-queues``, ``400``): the
        number called is not shown any more, and the queue's number is not taken for it;
        the extension that answered through the queue's Local channels is."""
        beats = SCENARIOS["queue"](Pbx())
        entered = [n for n, b in enumerate(beats) if b.message.event == "BridgeEnter"]
        follower = CallFollower(PbxRules("office"))
        later = T0 + timedelta(seconds=20)
        started, answered = follower.adopt(listed_after(beats[:entered[-1] + 1], later),
                                           later)
        assert isinstance(started, Started) and isinstance(answered, Answered)
        self.assertEqual((started.direction, started.remote, started.own_number),
                         ("incoming", "6912345678", ""))
        self.assertEqual(answered.extension, 202)
        ended = play(beats[entered[-1] + 1:], follower, start=later)[-1]
        assert isinstance(ended, Ended)
        self.assertEqual((ended.outcome, ended.extension), (Outcome.ANSWERED, 202))

    def test_internal_calls_are_not_recorded(self) -> None:
        pbx = Pbx()
        phone = pbx.channel("PJSIP/201", "from-internal", "202", "201")
        pbx.new(phone)
        other = pbx.ring(phone, "202")
        bridge = pbx.answer(phone, other)
        pbx.part(bridge, phone, other)
        follower = CallFollower(PbxRules("office"))
        self.assertEqual(play(pbx.take(), follower), [])
        self.assertEqual(follower.counters.internal, 1)


class BoundsTests(SynchronousTestCase):
    def test_a_flood_of_fresh_ids_keeps_the_follower_bounded(self) -> None:
        follower = CallFollower(PbxRules("office", max_open=32, max_channels=64))
        pbx = Pbx()
        ended = 0
        for n in range(5000):
            outside = pbx.channel(pbx.trunk, "from-trunk", "2107654321", f"69{n:08d}")
            pbx.new(outside)
            pbx.ring(outside, "201")
            for happening in play(pbx.take(), follower):
                ended += isinstance(happening, Ended)
            calls, channels, _ = follower.followed
            self.assertLessEqual(calls, 32)
            self.assertLessEqual(channels, 64)
        self.assertEqual(follower.counters.evicted, ended)
        self.assertGreater(ended, 4900)
        self.assertEqual(follower.open_calls, follower.followed[0])

    def test_bridges_and_late_cdrs_are_bounded_too(self) -> None:
        follower = CallFollower(PbxRules("office", max_open=8, max_channels=16))
        for n in range(1000):
            follower.feed(message(Event="BridgeEnter", BridgeUniqueid=f"b{n}",
                                  Uniqueid="none"), T0)
            follower.feed(message(Event="Cdr", UniqueID=f"{n}.0", Disposition="ANSWERED"), T0)
        self.assertLessEqual(follower.followed[2], 16)
        self.assertEqual(follower.counters.cdr_unknown, 1000)

    def test_events_of_unknown_channels_and_other_events_change_nothing(self) -> None:
        follower = CallFollower(PbxRules("office"))
        for event in (message(Event="Hangup", Uniqueid="1.1"),
                      message(Event="DialBegin", Uniqueid="1.1", DestUniqueid="1.2"),
                      message(Event="VarSet", Variable="X", Value="1"),
                      message(Event="Newchannel"),  # no ids at all
                      message(Response="Success")):
            self.assertEqual(follower.feed(event, T0), [])
        self.assertEqual(follower.followed, (0, 0, 0))


class CdrTests(SynchronousTestCase):
    def test_a_cdr_that_disagrees_is_told_and_never_recorded(self) -> None:
        told: list[tuple[str, str, Outcome]] = []
        follower = CallFollower(PbxRules("office"), lambda *args: told.append(args))
        pbx = Pbx()
        beats = SCENARIOS["incoming-missed"](pbx, cdr=False)
        happened = play(beats, follower)
        first = beats[0].message.get("Uniqueid")
        extra = follower.feed(message(Event="Cdr", UniqueID=first, Disposition="ANSWERED"),
                              T0)
        self.assertEqual(extra, [])
        self.assertEqual(told, [(_id(happened[0]), "ANSWERED", Outcome.MISSED)])
        self.assertEqual(follower.counters.cdr_disagreed, 1)

    def test_a_cdr_of_another_leg_is_not_the_calls(self) -> None:
        follower = CallFollower(PbxRules("office"))
        beats = SCENARIOS["incoming-answered"](Pbx(), cdr=False)
        play(beats, follower)
        follower.feed(message(Event="Cdr", UniqueID="1700000000.1", Disposition="BUSY"), T0)
        self.assertEqual((follower.counters.cdr_confirmed, follower.counters.cdr_disagreed),
                         (0, 0))


class RulesTests(SynchronousTestCase):
    def test_trunks_phones_and_local_channels(self) -> None:
        rules = PbxRules("office")
        self.assertTrue(rules.is_trunk("PJSIP/provider-0000002a"))
        self.assertFalse(rules.is_trunk("PJSIP/201-0000002a"))
        self.assertTrue(rules.is_trunk("PJSIP/201-0000002a", "from-pstn"))
        self.assertFalse(rules.is_trunk("Local/201@from-queue-00000003;1"))
        self.assertEqual(rules.extension_of("Local/201@from-queue-00000003;2"), "201")
        self.assertEqual(rules.extension_of("SIP/2001-0a1b"), "2001")
        named = PbxRules("office", trunk_patterns=("PJSIP/gw-*",))
        self.assertFalse(named.is_trunk("PJSIP/other-0001"))
        self.assertTrue(named.is_trunk("PJSIP/gw-0001"))


class SettingsTests(SynchronousTestCase):
    def test_read_with_defaults(self) -> None:
        settings = read_settings({"name": "office", "host": "pbx.lan", "secret": "s3cret"})
        self.assertEqual((settings.port, settings.auth, settings.tls), (5038, "md5", False))
        self.assertEqual(rules_of(settings).name, "office")
        self.assertNotIn("s3cret", repr(settings))

    def test_bad_values_are_refused_naming_the_key(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"port": 70000}, "port: must be between 1 and 65535"),
            ({"auth": "sha1"}, "auth: must be one of"),
            ({"secret": ""}, "secret: is not valid"),
            ({"extension_pattern": "(unclosed"}, "extension_pattern: is not a regular"),
            ({"keepalive_seconds": "often"}, "keepalive_seconds: expected a number"),
            ({"colour": "blue"}, "unknown key 'colour'"),
            ({"reconnect_initial_seconds": 30, "reconnect_max_seconds": 5},
             "reconnect_max_seconds"),
        ]
        check: Callable[[dict[str, Any]], Any] = read_settings
        for given, expected in cases:
            values = {"name": "office", "secret": "s3cret\u00e9", **given}
            with self.assertRaises(ConfigError) as raised:
                check(values)
            self.assertIn(expected, str(raised.exception))
            self.assertIn("asterisk office", str(raised.exception))
            self.assertNotIn("s3cret", str(raised.exception))

    def test_a_missing_secret(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            read_settings({"name": "office"})
        self.assertEqual(str(raised.exception),
                         "asterisk office secret: must be set (the manager.conf user's secret)")

    def test_a_secret_with_a_line_break_is_refused_without_showing_it(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            read_settings({"secret": "abc\r\nAction: Originate"})
        self.assertNotIn("abc", str(raised.exception))
