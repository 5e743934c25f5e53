"""The fake Asterisk's scripts: the shipped scenario files parse and play to calls, a bad
line is refused naming it, and ``dpvoip asterisk-sim`` says so and exits 2."""

from __future__ import annotations

import contextlib
import io
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from dpvoip import cli
from dpvoip.asterisk.calls import CallFollower, PbxRules
from dpvoip.core.happenings import Ended, Started
from dpvoip.core.outcomes import Outcome
from dpvoip.testing.asterisk import Await, Pbx, Play, ScriptError, parse_script

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "etc" / "scenarios"


class ScriptTests(SynchronousTestCase):
    def outcomes(self, name: str) -> list[tuple[str, Outcome]]:
        steps = parse_script((SCENARIOS / name).read_text(encoding="utf-8"))
        follower, pbx = CallFollower(PbxRules("office")), Pbx()
        at, out = datetime(2026, 3, 2, tzinfo=UTC), []
        for step in steps:
            if isinstance(step.action, Play):
                for beat in step.action.beats(pbx):
                    at += timedelta(seconds=beat.delay)
                    out += follower.feed(beat.message, at)
        directions = {h.call_id: h.direction for h in out if isinstance(h, Started)}
        return [(directions[h.call_id], h.outcome) for h in out if isinstance(h, Ended)]

    def test_the_demo(self) -> None:
        self.assertEqual(self.outcomes("asterisk-demo.txt"), [
            ("incoming", Outcome.ANSWERED), ("incoming", Outcome.MISSED),
            ("incoming", Outcome.VOICEMAIL), ("outgoing", Outcome.ANSWERED),
            ("incoming", Outcome.ANSWERED)])

    def test_every_outcome(self) -> None:
        self.assertEqual([o for _, o in self.outcomes("asterisk-every-outcome.txt")], [
            Outcome.ANSWERED, Outcome.MISSED, Outcome.VOICEMAIL, Outcome.MISSED,
            Outcome.ANSWERED, Outcome.NOT_REACHED, Outcome.BUSY, Outcome.ANSWERED,
            Outcome.ANSWERED, Outcome.ANSWERED, Outcome.ANSWERED])

    def test_await_and_parameters(self) -> None:
        steps = parse_script("# a comment\n\n0 !await\n1.5 queue exts=201,202 ring=3\n")
        self.assertEqual(steps[0].action, Await())
        self.assertEqual(steps[1].delay, 1.5)
        self.assertEqual(steps[1].action, Play("queue", (("exts", "201,202"), ("ring", 3.0))))

    def test_bad_lines_are_refused_naming_them(self) -> None:
        for text, problem in [
            ("soon incoming-answered", "line 1: 'soon' is not a delay"),
            ("0 dance", "line 1: unknown scenario 'dance'"),
            ("# first\n1 incoming-missed ring=long", "line 2: ring='long' is not a number"),
            ("0 incoming-missed colour=red", "line 1: unknown key 'colour'"),
            ("0 incoming-missed caller=69;rm", "line 1: caller='69;rm'"),
            ("-1 incoming-missed", "line 1: the delay must be between"),
        ]:
            with self.assertRaises(ScriptError) as raised:
                parse_script(text)
            self.assertIn(problem, str(raised.exception))

    def test_the_command_refuses_a_bad_script(self) -> None:
        err = io.StringIO()
        with tempfile.TemporaryDirectory() as folder:
            bad = Path(folder) / "bad.txt"
            bad.write_text("0 dance\n", encoding="utf-8")
            with contextlib.redirect_stderr(err):
                self.assertEqual(cli.main(["asterisk-sim", str(bad), "--port", "0"]), 2)
        self.assertIn("unknown scenario 'dance'", err.getvalue())
