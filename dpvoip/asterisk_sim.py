"""``dpvoip asterisk-sim``: its options. The fake Asterisk itself is
``dpvoip.testing.asterisk`` (only ``cli.py`` imports the fakes: the layering rule), which
``cli.py`` hands these options to."""

from __future__ import annotations

import argparse

HELP = "a fake Asterisk (AMI) playing scripted calls (demos)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", help="call script (examples: etc/scenarios/asterisk-*.txt)")
    parser.add_argument("--port", type=int, default=5038,
                        help="AMI port to listen on (default 5038; 0: any free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--username", default="dpvoip",
                        help="the manager.conf user it accepts (default dpvoip)")
    parser.add_argument("--secret", default="demo-secret",
                        help="that user's secret (default demo-secret)")
    parser.add_argument("--loop", action="store_true",
                        help="play the script again each time a client logs in")
