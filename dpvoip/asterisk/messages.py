"""The Asterisk Manager Interface's framing, pure: lines in, messages out, actions to bytes.

What goes over the wire (Asterisk 18-22, docs.asterisk.org "Asterisk 20 Documentation >
API Documentation > AMI Actions / AMI Events"): a banner line on connect
(``Asterisk Call Manager/5.0.3``), then messages of ``Key: Value`` lines ended by an empty
line, all CRLF. A message is an event (``Event:``), a response to an action
(``Response:``, with the action's ``ActionID`` when one was given) or, rarely, neither.
Keys may repeat (``ChanVariable``, ``Output``); their order is kept.

Bounded: a message longer than ``max_lines`` lines or ``max_bytes`` bytes is refused
(``Refused``) and its lines are dropped as they come, up to its end, so that a peer
sending lines without an empty one cannot grow the reader without end. The protocol caps
a single line (``protocols.ami.MAX_LINE``).

An action's values are refused when they hold CR or LF (they would start another line,
and so another header or action, in the PBX): the error names the key, never the value,
which may be a secret.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

BANNER_PREFIX = "Asterisk Call Manager/"
MAX_LINES = 512
MAX_BYTES = 64 * 1024


class NotAsterisk(ValueError):
    """The peer's first line is not an AMI banner: not an Asterisk at this address."""


@dataclass(frozen=True)
class Message:
    """One AMI message: its ``Key: Value`` pairs in the order they came."""

    fields: tuple[tuple[str, str], ...]

    @cached_property
    def _index(self) -> dict[str, str]:
        index: dict[str, str] = {}
        for key, value in self.fields:  # the first of a repeated key, as Asterisk reads
            index.setdefault(key.lower(), value)
        return index

    def get(self, key: str, default: str = "") -> str:
        """The value of ``key`` (case-insensitive: Asterisk reads keys so), its first."""
        return self._index.get(key.lower(), default)

    def get_all(self, key: str) -> list[str]:
        """Every value of a repeated key, in order."""
        wanted = key.lower()
        return [value for name, value in self.fields if name.lower() == wanted]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._index

    @property
    def event(self) -> str:
        return self.get("Event")

    @property
    def response(self) -> str:
        return self.get("Response")

    @property
    def action_id(self) -> str:
        return self.get("ActionID")

    @property
    def is_event(self) -> bool:
        return "Event" in self

    @property
    def is_response(self) -> bool:
        return "Response" in self and "Event" not in self


def message(*pairs: tuple[str, str], **named: str) -> Message:
    """A message from pairs (repeatable keys) and keywords (``Event="Hangup"``)."""
    return Message(tuple(pairs) + tuple(named.items()))


@dataclass(frozen=True)
class Refused:
    """A message that broke the bounds (``reason``), dropped whole."""

    reason: str
    lines: int


@dataclass
class MessageReader:
    """Lines (without their CRLF) in, messages out. The first line must be the banner."""

    max_lines: int = MAX_LINES
    max_bytes: int = MAX_BYTES
    banner: str | None = None
    _lines: list[tuple[str, str]] = field(default_factory=list)
    _bytes: int = 0
    _refusing: str = ""
    _refused_lines: int = 0
    #: Lines inside a message that were not ``Key: Value`` (kept as a value of key '').
    odd_lines: int = 0

    @property
    def version(self) -> str:
        """The AMI version the banner gave (``5.0.3``), '' before it."""
        return (self.banner or "").removeprefix(BANNER_PREFIX).strip()

    def feed(self, line: str) -> Message | Refused | None:
        """The message ``line`` ends (an empty line), a ``Refused`` one, or None."""
        if self.banner is None:
            if not line.startswith(BANNER_PREFIX):
                raise NotAsterisk(f"the first line is not an Asterisk Manager banner: "
                                  f"{line[:60]!r}")
            self.banner = line
            return None
        if not line:
            return self._end()
        if self._refusing:
            self._refused_lines += 1
            return None
        key, colon, value = line.partition(":")
        if not colon:
            self.odd_lines += 1
            key, value = "", line
        self._lines.append((key.strip(), value.strip()))
        self._bytes += len(line) + 2
        if len(self._lines) > self.max_lines:
            self._refuse(f"more than {self.max_lines} lines")
        elif self._bytes > self.max_bytes:
            self._refuse(f"more than {self.max_bytes} bytes")
        return None

    def _refuse(self, reason: str) -> None:
        self._refusing = reason
        self._refused_lines = len(self._lines)
        self._lines, self._bytes = [], 0

    def _end(self) -> Message | Refused | None:
        if self._refusing:
            refused = Refused(self._refusing, self._refused_lines)
            self._refusing, self._refused_lines = "", 0
            return refused
        if not self._lines:
            return None  # a stray empty line between messages
        done = Message(tuple(self._lines))
        self._lines, self._bytes = [], 0
        return done

    @property
    def pending_lines(self) -> int:
        """Lines held for the message under way (bounded by ``max_lines``)."""
        return len(self._lines)


def action(name: str, fields: Iterable[tuple[str, str]] = (), action_id: str = "") -> bytes:
    """An action as bytes: ``Action: name``, ``ActionID`` when given, then ``fields`` in
    order (a key may repeat: ``Variable``), then the empty line."""
    pairs: list[tuple[str, str]] = [("Action", name)]
    if action_id:
        pairs.append(("ActionID", action_id))
    pairs.extend(fields)
    return encode(pairs)


def md5_key(challenge: str, secret: str) -> str:
    """The ``Key`` of an MD5 login: the hex MD5 of the ``Challenge`` answer followed by
    the secret (the Login action's documentation, Asterisk 20)."""
    return hashlib.md5((challenge + secret).encode("utf-8"),
                       usedforsecurity=False).hexdigest()


def encode(pairs: Sequence[tuple[str, str]]) -> bytes:
    """Pairs as an AMI message (also the fake Asterisk's events and responses)."""
    out = []
    for key, value in pairs:
        if not key or any(c in key for c in ":\r\n") or "\r" in value or "\n" in value:
            raise ValueError(f"AMI field {key.strip()[:40]!r}: a key or value holding a "
                             "line break (or a key with a colon) cannot be sent")
        out.append(f"{key}: {value}\r\n")
    out.append("\r\n")
    return "".join(out).encode("utf-8")
