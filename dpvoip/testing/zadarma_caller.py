"""Zadarma's PBX as far as its webhooks go: a script of calls sent to dpvoip's
``/voip/zd/`` as Zadarma sends them, every form signed with the account's secret
(zadarma.md 1.2), so that the webhook path can be seen working without an account.

``dpvoip zadarma-call etc/scenarios/zadarma-demo.txt`` plays it; the tests play the same
scripts into a real daemon.

Script format, one event per line (blank lines and ``#`` comment lines are skipped)::

    <delay> <call> <EVENT> [field=value ...]

Wait ``<delay>`` seconds after the previous line, then send ``<EVENT>`` (``NOTIFY_START``,
``NOTIFY_INTERNAL``, ``NOTIFY_ANSWER``, ``NOTIFY_END``, ``NOTIFY_OUT_START``,
``NOTIFY_OUT_END``, ``NOTIFY_RECORD``) of the call named ``<call>`` (any word: the lines of
one call share it). A value with spaces is quoted: ``disposition="no answer"``. The sender
fills in what Zadarma fills in, so that a script says only what differs between calls:

- ``pbx_call_id``: ``in_`` (``out_`` for a call with an ``NOTIFY_OUT_*`` event) and 40
  hex digits, new at every run (a second run is new calls, not repeats);
- ``call_start``: when the call's first line is sent, in the account's time zone
  (``YYYY-MM-DD HH:MM:SS``), the same on every event of the call;
- a field given on an earlier line of the same call, on each later event that Zadarma
  sends it with (zadarma.md 1.3: ``caller_id`` on every event, ``called_did`` on
  NOTIFY_START, NOTIFY_INTERNAL and NOTIFY_END, ...). A field given on a line is always
  sent with that line.

Two halves, as in the Fritz!Box simulator: ``parse_script`` and ``plan`` are pure (text,
a start time, a zone and a source of ids in; the signed-to-be forms out, or a
``ScriptError`` naming the line); ``ZadarmaCaller`` posts them, waiting through an
injected ``sleep`` and sending through an injected treq client.
"""

from __future__ import annotations

import contextlib
import math
import re
import secrets
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from dpvoip.zadarma.signing import webhook_signature

if TYPE_CHECKING:
    from dpvoip.config import Config

#: For each event, the fields Zadarma sends with it (zadarma.md 1.3) that a script may give
#: once per call: they are carried from the call's earlier lines onto this event.
CARRIED: dict[str, tuple[str, ...]] = {
    "NOTIFY_START": ("caller_id", "called_did"),
    "NOTIFY_INTERNAL": ("caller_id", "called_did", "internal", "calltype"),
    "NOTIFY_ANSWER": ("caller_id", "destination", "internal", "calltype"),
    "NOTIFY_END": ("caller_id", "called_did", "internal", "last_internal", "calltype"),
    "NOTIFY_OUT_START": ("caller_id", "destination", "internal", "calltype"),
    "NOTIFY_OUT_END": ("caller_id", "destination", "internal", "calltype"),
    "NOTIFY_RECORD": (),
}
EVENTS = tuple(CARRIED)

#: Fields the sender fills in itself; a script giving one is refused.
FILLED = frozenset({"event", "pbx_call_id", "call_start"})

DEMO_SECRET = "demo-secret"  # noqa: S105 - the demo's published secret
"""What ``dpvoip zadarma-sim`` checks by default, and so what the demo signs with."""

CALL_START = "%Y-%m-%d %H:%M:%S"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_FIELD = re.compile(r"[a-z_]{1,40}")
_MAX_VALUE = 200


class ScriptError(ValueError):
    """A script line that cannot be played; the message names the line and the problem."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}" if line else problem)
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class Line:
    """One scripted event: after ``delay`` seconds, ``event`` of call ``call``."""

    number: int  # in the script's text, for messages
    delay: float
    call: str
    event: str
    fields: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Script:
    lines: tuple[Line, ...]

    @property
    def duration(self) -> float:
        """Seconds from the start to the last event."""
        return sum(line.delay for line in self.lines)


@dataclass(frozen=True)
class Webhook:
    """One event as Zadarma posts it: sent ``delay`` seconds after the previous one, at
    ``at`` (POSIX seconds), the form unsigned (``signed`` adds the header)."""

    delay: float
    at: float
    call: str
    form: dict[str, str]

    @property
    def event(self) -> str:
        return self.form["event"]


def parse_script(text: str) -> Script:
    """The script's lines, or ``ScriptError`` for the first line that cannot be played."""
    lines: list[Line] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        lines.append(_line(number, stripped))
    if not lines:
        raise ScriptError(0, "the script has no events")
    return Script(tuple(lines))


def _line(number: int, text: str) -> Line:
    try:
        words = shlex.split(text, comments=False)
    except ValueError as error:
        raise ScriptError(number, f"cannot read it ({error})") from None
    if len(words) < 3:
        raise ScriptError(number, "expected '<delay> <call> <EVENT> [field=value ...]'")
    delay_text, call, event, *assignments = words
    try:
        delay = float(delay_text)
    except ValueError:
        raise ScriptError(number, f"{delay_text!r} is not a delay in seconds") from None
    if not math.isfinite(delay) or not 0 <= delay <= 3600:
        raise ScriptError(number, f"delay {delay_text} is not between 0 and 3600 seconds")
    if not _NAME.fullmatch(call):
        raise ScriptError(number, f"{call!r} is not a call name (letters, digits, _ . -)")
    if event not in CARRIED:
        raise ScriptError(number, f"{event!r} is not an event; one of {', '.join(EVENTS)}")
    fields: list[tuple[str, str]] = []
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals or not _FIELD.fullmatch(name):
            raise ScriptError(number, f"{assignment!r} is not field=value")
        if name in FILLED:
            raise ScriptError(number, f"{name} is filled in by the sender; leave it out")
        if any(name == seen for seen, _ in fields):
            raise ScriptError(number, f"{name} is given twice")
        if len(value) > _MAX_VALUE:
            raise ScriptError(number, f"the value of {name} is longer than {_MAX_VALUE}")
        fields.append((name, value))
    return Line(number, delay, call, event, tuple(fields))


def new_call_id() -> str:
    """40 hex digits, as in Zadarma's ``pbx_call_id``."""
    return secrets.token_hex(20)


def plan(script: Script, start: float, zone: tzinfo,
         call_id: Callable[[], str] = new_call_id) -> tuple[Webhook, ...]:
    """The forms Zadarma would post for ``script`` begun at ``start`` (POSIX seconds) on an
    account whose clock runs in ``zone``. Pure, given ``call_id``."""
    outgoing = {line.call for line in script.lines if line.event.startswith("NOTIFY_OUT_")}
    ids: dict[str, str] = {}
    starts: dict[str, str] = {}
    known: dict[str, dict[str, str]] = {}
    webhooks: list[Webhook] = []
    at = start
    for line in script.lines:
        at += line.delay
        if line.call not in ids:
            prefix = "out_" if line.call in outgoing else "in_"
            ids[line.call] = prefix + call_id()
            starts[line.call] = datetime.fromtimestamp(at, zone).strftime(CALL_START)
            known[line.call] = {}
        given = dict(line.fields)
        carried = {name: known[line.call][name] for name in CARRIED[line.event]
                   if name in known[line.call] and name not in given}
        form = {"event": line.event}
        if line.event != "NOTIFY_RECORD":  # the recording notice carries no call_start
            form["call_start"] = starts[line.call]
        form["pbx_call_id"] = ids[line.call]
        form.update(carried)
        form.update(given)
        known[line.call].update(given)
        webhooks.append(Webhook(line.delay, at, line.call, form))
    return tuple(webhooks)


def signed(webhook: Webhook, secret: str) -> tuple[bytes, dict[str, list[str]]]:
    """The body and headers of ``webhook``'s POST, signed with ``secret`` as Zadarma
    signs (the signature is over the values exactly as they are sent)."""
    headers = {"Content-Type": ["application/x-www-form-urlencoded"]}
    signature = webhook_signature(secret, webhook.form)
    if signature is not None:  # every scripted event has one; Zadarma signs them all
        headers["Signature"] = [signature]
    return urlencode(webhook.form).encode("utf-8"), headers


def advice(status: int | None) -> str:
    """What to do about an answer other than 200 (or no answer: ``None``), for a person
    running the demo; '' for 200."""
    if status == 200:
        return ""
    if status is None:
        return "dpvoip did not answer: is it running, and is --url its address?"
    if status == 403:
        return ("dpvoip refused the sender's address: it takes webhooks only from "
                "[zadarma] allowed_networks; for a local demo start it with "
                "DPVOIP_ZADARMA_ALLOWED_NETWORKS=185.45.152.40/30,127.0.0.1/32")
    if status == 401:
        return ("dpvoip refused the signature: give --secret the secret dpvoip has "
                "([zadarma] secret, ZADARMA_SECRET)")
    if status == 404:
        return "no webhook at that address: --url must end in /voip/zd/"
    if status == 503:
        return "dpvoip could not record it now (database away and spool full); try again"
    return "see dpvoip's log for why"


#: Answers after which the caller stops: no dpvoip there, or one that refuses this sender
#: or this secret (each later event would be refused the same way).
HOPELESS = frozenset({None, 401, 403, 404})


@dataclass(frozen=True)
class Delivery:
    """A webhook and what dpvoip answered (``status`` None: no answer at all)."""

    webhook: Webhook
    status: int | None
    body: bytes


class ZadarmaCaller:
    """Posts planned webhooks to ``url`` one after the other, each after its delay.

    ``http`` is a treq-like client (``treq`` itself, or ``treq.testing.StubTreq``);
    ``sleep(seconds)`` waits (``deferLater`` on a reactor or a ``Clock``; an immediate
    one sends everything at once). Every delivery goes to ``report`` as it happens.
    """

    def __init__(self, url: str, secret: str, http: Any,
                 sleep: Callable[[float], Awaitable[object]],
                 report: Callable[[Delivery], None] = lambda delivery: None,
                 pool: Any = None) -> None:
        self.url = url
        self._secret = secret
        self._http = http
        self._sleep = sleep
        self._report = report
        self._pool = pool

    async def play(self, webhooks: Sequence[Webhook]) -> list[Delivery]:
        deliveries = []
        for webhook in webhooks:
            if webhook.delay > 0:
                await self._sleep(webhook.delay)
            delivery = await self.send(webhook)
            self._report(delivery)
            deliveries.append(delivery)
            if delivery.status in HOPELESS:
                break  # every later event would get the same answer
        return deliveries

    async def send(self, webhook: Webhook) -> Delivery:
        body, headers = signed(webhook, self._secret)
        extra = {} if self._pool is None else {"pool": self._pool}
        try:
            response = await self._http.post(self.url, data=body, headers=headers, **extra)
            content: bytes = await response.content()
        except Exception as error:  # any failure to reach dpvoip is reported
            return Delivery(webhook, None, str(error).encode("utf-8", "replace"))
        return Delivery(webhook, int(response.code), content)


def shown(delivery: Delivery, zone: tzinfo) -> str:
    """One line about a delivery for the terminal: when, which call, the event, its fields,
    dpvoip's answer (and what to do when it was not 200)."""
    form = delivery.webhook.form
    fields = " ".join(f"{k}={shlex.quote(v)}" for k, v in form.items()
                      if k not in FILLED)
    when = datetime.fromtimestamp(delivery.webhook.at, zone).strftime("%H:%M:%S")
    answer = "no answer" if delivery.status is None else str(delivery.status)
    text = delivery.body.decode("utf-8", "replace").strip()
    line = f"{when} {delivery.webhook.call} {form['event']} {fields} -> {answer}"
    if text:
        line += f" {text[:200]}"
    hint = advice(delivery.status)
    return f"{line}\n  {hint}" if hint else line


async def call(reactor: Any, script: Script, url: str, secret: str, zone: tzinfo,
               wait: bool = True, out: Callable[[str], None] = print) -> int:
    """``dpvoip zadarma-call``: play ``script`` to ``url`` in real time (``wait``) or all
    at once (then its calls are dated as if they had just happened). 0 when dpvoip took
    every event, else 1."""
    import treq
    from twisted.internet.task import deferLater
    from twisted.web.client import HTTPConnectionPool

    now = reactor.seconds()
    webhooks = plan(script, now if wait else now - script.duration, zone)
    pool = HTTPConnectionPool(reactor, persistent=False)

    def sleep(seconds: float) -> Awaitable[object]:
        return deferLater(reactor, seconds if wait else 0)

    caller = ZadarmaCaller(url, secret, treq, sleep,
                           report=lambda delivery: out(shown(delivery, zone)), pool=pool)
    out(f"sending {len(webhooks)} Zadarma events of "
        f"{len({w.call for w in webhooks})} calls to {url}"
        + (f" over {script.duration:.0f} s" if wait else ""))
    try:
        deliveries = await caller.play(webhooks)
    finally:
        await pool.closeCachedConnections()
    taken = sum(1 for d in deliveries if d.status == 200)
    out(f"{taken} of {len(webhooks)} events taken")
    return 0 if taken == len(webhooks) else 1


def command(path: str, config: Config, url: str, secret: str | None, zone: str | None,
            wait: bool) -> int:
    """The body of ``dpvoip zadarma-call``: the script read, the secret and the zone taken
    from the options, else from dpvoip's own configuration (the same file and
    environment the daemon reads), else the ``zadarma-sim`` demo's; then played."""
    import sys
    from pathlib import Path
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from twisted.internet import task
    from twisted.internet.defer import Deferred

    try:
        script = parse_script(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        print(f"dpvoip: cannot read {path}: {error.strerror}", file=sys.stderr)
        return 2
    except (ScriptError, UnicodeDecodeError) as error:
        print(f"dpvoip: {path}: {error}", file=sys.stderr)
        return 2
    name = zone or config.zadarma.timezone or config.crm.timezone
    try:
        account_zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        print(f"dpvoip: {name!r} is not a time zone (e.g. Europe/Athens)", file=sys.stderr)
        return 2
    key = secret or config.zadarma.secret.reveal() or DEMO_SECRET
    outcome = [1]

    async def main(reactor: Any) -> None:
        outcome[0] = await call(reactor, script, url, key, account_zone, wait,
                                out=lambda text: print(text, flush=True))

    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    return outcome[0]
