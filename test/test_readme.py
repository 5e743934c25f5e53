"""What a newcomer reads first: ``dpvoip --help`` and the README.

``--help`` says in one sentence what dpvoip is, before the list of commands. The README
speaks of what dpvoip does, never of the issues it was built in (a reader has no tracker),
and every ``dpvoip`` command and scenario file it tells the reader to use exists.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from dpvoip import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: "issue 12", "Issue #5", "issues 14-16": a tracker's numbers.
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)


def help_text(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main([*argv, "--help"])
    return out.getvalue()


def commands() -> set[str]:
    """The sub-commands ``dpvoip`` has, as its usage line lists them."""
    listed = re.search(r"\{([a-z0-9,-]+)\}", help_text())
    assert listed is not None
    return set(listed.group(1).split(","))


class HelpTests(SynchronousTestCase):
    def test_help_says_in_one_line_what_dpvoip_is_before_the_commands(self) -> None:
        with mock.patch.dict(os.environ, {"COLUMNS": "80"}):  # a plain terminal
            lines = help_text().splitlines()
        self.assertIn(cli.DESCRIPTION, lines)  # whole, not wrapped
        self.assertLess(lines.index(cli.DESCRIPTION), lines.index("positional arguments:"))
        for word in ("records", "Fritz!Box", "Zadarma", "CRM", "click-to-call"):
            self.assertIn(word, cli.DESCRIPTION)
        self.assertTrue(any(line.startswith("Version ") for line in lines))

    def test_the_demo_commands_are_listed(self) -> None:
        self.assertLessEqual({"demo-client", "zadarma-call", "zadarma-sim", "fritz-sim"},
                             commands())


class ReadmeTests(SynchronousTestCase):
    text = README.read_text(encoding="utf-8")

    def test_no_issue_numbers(self) -> None:
        found = [(n, line.strip()) for n, line in enumerate(self.text.splitlines(), start=1)
                 if ISSUE_NUMBER.search(line)]
        self.assertEqual(found, [])

    def test_the_detector_finds_what_it_must(self) -> None:
        for line in ("the foundation (issue 2)", "Issue #17 point 6", "see issues 14"):
            self.assertIsNotNone(ISSUE_NUMBER.search(line), line)
        self.assertIsNone(ISSUE_NUMBER.search("a known issue with 2 boxes"))

    def test_every_dpvoip_command_it_shows_exists(self) -> None:
        shown = set(re.findall(r"(?:\.venv/bin/|`)dpvoip ([a-z][a-z0-9-]+)", self.text))
        self.assertIn("zadarma-call", shown)
        self.assertIn("demo-client", shown)
        self.assertEqual(shown - commands(), set())

    def test_every_scenario_it_names_is_shipped(self) -> None:
        named = set(re.findall(r"etc/scenarios/[\w.-]+\.txt", self.text))
        self.assertIn("etc/scenarios/zadarma-demo.txt", named)
        self.assertEqual({n for n in named if not (ROOT / n).is_file()}, set())

    def test_the_zadarma_demo_says_how_to_let_a_local_sender_in(self) -> None:
        self.assertIn("DPVOIP_ZADARMA_ALLOWED_NETWORKS=185.45.152.40/30,127.0.0.1/32",
                      self.text)
