"""A fake Asterisk: the Manager Interface as Asterisk speaks it, playing scripted calls.

dpvoip's AMI client connects to it as to port 5038 of a real Asterisk: the banner line,
``Login`` with a plain secret or after ``Challenge`` with an MD5 key (success, or
``Authentication failed`` and the connection closed, as Asterisk does), ``Ping``/``Pong``,
``Logoff``, ``Originate`` (queued, then the originated call's events and its
``OriginateResponse``), and the events of calls, to every logged-in connection whose
``Events`` mask lets them through.

Two halves, like the Fritz!Box simulator. The calls are pure: ``Pbx`` hands out channels
with fresh ``Uniqueid``/``Linkedid`` and each scenario function (``SCENARIOS``) returns the
events of one real call's channels, in the order Asterisk 18-22 sends them (the fields as
docs.asterisk.org documents them for Asterisk 20; the order as the bridging core makes
it: the called channel is created before ``DialBegin``, answers before ``DialEnd``, the
caller's channel is answered and both enter a bridge; the callee hangs up before the
caller's channel, which finishes its dialplan; ``Cdr`` last), each with the seconds to
wait before it. ``FakeAsterisk`` does the I/O and takes its time from the injected
reactor (a ``Clock`` in tests). ``serve`` is ``dpvoip asterisk-sim``.

Script format, one step per line (blank lines and ``#`` comments are skipped)::

    <delay> <scenario> [key=value ...]   wait <delay> s, then play the scenario's call
    <delay> !await                       wait until a client has logged in
    <delay> !close                       close every connection (Asterisk restarting)

Calls are played one after the other, each with its own timing (``ring``, ``talk``...).
The scenarios and their keys: ``incoming-answered``, ``incoming-missed``,
``incoming-voicemail``, ``incoming-busy``, ``outgoing-answered``,
``outgoing-unanswered``, ``outgoing-busy``, ``blind-transfer``, ``attended-transfer``,
``pickup``, ``queue`` (see their functions: ``caller``, ``number``, ``ext``, ``to``,
``exts``, ``ring``, ``talk``, ``did``, ``cdr``).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from dpvoip.asterisk.messages import Message, MessageReader, Refused, encode, md5_key

log = Logger()

DEMO_SECRET = "demo-secret"  # noqa: S105 - the simulator's documented demo login
BANNER = "Asterisk Call Manager/9.0.0"
"""What Asterisk 20 says first (its AMI version)."""

_STATES = {0: "Down", 4: "Ring", 5: "Ringing", 6: "Up", 7: "Busy"}
Pairs = tuple[tuple[str, str], ...]


class ScriptError(ValueError):
    """A script line that cannot be played; the message names the line and the problem."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line


# -- channels and their events (pure) ------------------------------------------------------


@dataclass
class Chan:
    """A channel as its events show it."""

    name: str
    uid: str
    linkedid: str
    context: str
    exten: str
    caller: str = ""
    caller_name: str = ""
    connected: str = ""
    state: int = 0
    priority: int = 1

    def fields(self, prefix: str = "") -> list[tuple[str, str]]:
        unknown = "<unknown>"
        return [(prefix + key, value) for key, value in (
            ("Channel", self.name), ("ChannelState", str(self.state)),
            ("ChannelStateDesc", _STATES.get(self.state, "Unknown")),
            ("CallerIDNum", self.caller or unknown),
            ("CallerIDName", self.caller_name or unknown),
            ("ConnectedLineNum", self.connected or unknown),
            ("ConnectedLineName", unknown), ("Language", "en"), ("AccountCode", ""),
            ("Context", self.context), ("Exten", self.exten),
            ("Priority", str(self.priority)), ("Uniqueid", self.uid),
            ("Linkedid", self.linkedid))]


@dataclass(frozen=True)
class Beat:
    """Wait ``delay`` seconds after the previous beat, then send the event ``fields``."""

    delay: float
    fields: Pairs

    @property
    def message(self) -> Message:
        return Message(self.fields)


@dataclass
class Pbx:
    """Hands out channels with fresh ids and writes the events of calls.

    ``trunk``: the provider's channel prefix; ``did``: the office's number called."""

    epoch: int = 1700000000
    trunk: str = "PJSIP/provider"
    did: str = "2107654321"
    internal: str = "from-internal"
    incoming: str = "from-trunk"
    _seq: int = 0
    _bridges: int = 0
    beats: list[Beat] = field(default_factory=list)
    _wait: float = 0.0

    def channel(self, name: str, context: str, exten: str, caller: str = "",
                linkedid: str | None = None, caller_name: str = "") -> Chan:
        uid = f"{self.epoch}.{self._seq}"
        suffix = f"{self._seq + 1:08x}"
        self._seq += 1
        return Chan(f"{name}-{suffix}", uid, linkedid or uid, context, exten, caller,
                    caller_name)

    def local(self, extension: str, context: str, linkedid: str) -> tuple[Chan, Chan]:
        """The two halves of a Local channel (queues, ring groups)."""
        uid = f"{self.epoch}.{self._seq}"
        suffix = f"{self._seq + 1:08x}"
        self._seq += 2
        name = f"Local/{extension}@{context}-{suffix}"
        one = Chan(name + ";1", uid, linkedid, context, extension)
        two = Chan(name + ";2", f"{self.epoch}.{self._seq - 1}", linkedid, context,
                   extension)
        return one, two

    def bridge(self) -> str:
        self._bridges += 1
        return f"{self._bridges:08x}-b7e1-4c5a-9d2e-{self.epoch % 10**12:012d}"

    def wait(self, seconds: float) -> None:
        self._wait += seconds

    def emit(self, event: str, *parts: Sequence[tuple[str, str]],
             privilege: str = "call,all") -> None:
        pairs: list[tuple[str, str]] = [("Event", event), ("Privilege", privilege)]
        for part in parts:
            pairs.extend(part)
        self.beats.append(Beat(self._wait, tuple(pairs)))
        self._wait = 0.0

    def take(self) -> list[Beat]:
        beats, self.beats = self.beats, []
        return beats

    # -- the building blocks of a call --------------------------------------------------

    def new(self, chan: Chan) -> None:
        self.emit("Newchannel", chan.fields())

    def state(self, chan: Chan, state: int) -> None:
        chan.state = state
        self.emit("Newstate", chan.fields())

    def dial_begin(self, caller: Chan, dest: Chan, dial_string: str) -> None:
        self.emit("DialBegin", caller.fields(), dest.fields("Dest"),
                  [("DialString", dial_string)])

    def dial_end(self, caller: Chan, dest: Chan, status: str) -> None:
        self.emit("DialEnd", caller.fields(), dest.fields("Dest"), [("DialStatus", status)])

    def enter(self, bridge: str, chan: Chan, count: int, swap: str = "") -> None:
        self.emit("BridgeEnter", _bridge_fields(bridge, count), chan.fields(),
                  [("SwapUniqueid", swap)] if swap else [])

    def leave(self, bridge: str, chan: Chan, count: int) -> None:
        self.emit("BridgeLeave", _bridge_fields(bridge, count), chan.fields())

    def hangup(self, chan: Chan, cause: int = 16, text: str = "Normal Clearing") -> None:
        self.emit("Hangup", chan.fields(), [("Cause", str(cause)), ("Cause-txt", text)])

    def cdr(self, source: Chan, dest: Chan | None, disposition: str, duration: float,
            billable: float, application: str = "Dial") -> None:
        self.emit("Cdr", [
            ("AccountCode", ""), ("Source", source.caller), ("Destination", source.exten),
            ("DestinationContext", source.context), ("CallerID", f'"" <{source.caller}>'),
            ("Channel", source.name), ("DestinationChannel", dest.name if dest else ""),
            ("LastApplication", application), ("LastData", ""),
            ("StartTime", ""), ("AnswerTime", ""), ("EndTime", ""),
            ("Duration", str(round(duration))), ("BillableSeconds", str(round(billable))),
            ("Disposition", disposition), ("AMAFlags", "DOCUMENTATION"),
            ("UniqueID", source.uid), ("UserField", "")], privilege="cdr,all")

    def ring(self, caller: Chan, ext: str, dial_string: str = "",
             context: str = "from-internal") -> Chan:
        """``caller`` dials phone ``ext``: its channel created, the dial begun, ringing."""
        phone = self.channel(f"PJSIP/{ext}", context, ext, ext, caller.linkedid)
        phone.connected = caller.caller
        self.new(phone)
        self.dial_begin(caller, phone, dial_string or ext)
        self.state(phone, 5)
        if caller.state != 6:
            self.state(caller, 5)
        return phone

    def answer(self, caller: Chan, callee: Chan) -> str:
        """``callee`` answers: the dial ends, the caller is answered, both are bridged."""
        self.state(callee, 6)
        self.dial_end(caller, callee, "ANSWER")
        if caller.state != 6:
            self.state(caller, 6)
        bridge = self.bridge()
        self.emit("BridgeCreate", _bridge_fields(bridge, 0))
        self.enter(bridge, caller, 1)
        self.enter(bridge, callee, 2)
        return bridge

    def part(self, bridge: str, first: Chan, second: Chan) -> None:
        """``first`` hangs up on ``second``: both leave the bridge, both hang up."""
        self.leave(bridge, first, 1)
        self.leave(bridge, second, 0)
        self.emit("BridgeDestroy", _bridge_fields(bridge, 0))
        self.hangup(first)
        self.hangup(second)

    def outside(self, caller: str, did: str = "") -> Chan:
        """An incoming call's channel from the trunk."""
        chan = self.channel(self.trunk, self.incoming, did or self.did, caller)
        chan.state = 4
        self.new(chan)
        return chan


def _bridge_fields(bridge: str, count: int) -> list[tuple[str, str]]:
    return [("BridgeUniqueid", bridge), ("BridgeType", "basic"),
            ("BridgeTechnology", "simple_bridge"), ("BridgeCreator", "<unknown>"),
            ("BridgeName", "<unknown>"), ("BridgeNumChannels", str(count)),
            ("BridgeVideoSourceMode", "none")]


class ChannelTable:
    """The channels a PBX has up, kept from the events it sends (pure), and listed as
    ``CoreShowChannels`` lists them: each one's fields as its last event showed them, its
    dialplan application, the bridge it is in and its age (``Duration``)."""

    _KEPT = ("Channel", "ChannelState", "ChannelStateDesc", "CallerIDNum", "CallerIDName",
             "ConnectedLineNum", "ConnectedLineName", "Language", "AccountCode", "Context",
             "Exten", "Priority", "Uniqueid", "Linkedid")

    def __init__(self) -> None:
        self._up: dict[str, dict[str, str]] = {}
        self._made: dict[str, float] = {}

    def clear(self) -> None:
        self._up.clear()
        self._made.clear()

    def follow(self, pairs: Sequence[tuple[str, str]], now: float) -> None:
        event = dict(pairs)
        uid, kind = event.get("Uniqueid", ""), event.get("Event")
        if kind == "Newchannel":
            self._up[uid] = {key: event.get(key, "") for key in self._KEPT}
            self._up[uid].update(Application="", ApplicationData="", BridgeId="")
            self._made[uid] = now
            return
        fields = self._up.get(uid)
        if fields is None:
            return
        if kind == "Hangup":
            del self._up[uid], self._made[uid]
            return
        for key in self._KEPT:
            if key in event and key not in ("Uniqueid", "Channel"):
                fields[key] = event[key]
        if kind == "Rename":
            fields["Channel"] = event.get("Newname", fields["Channel"])
        elif kind == "Newexten":
            fields["Application"] = event.get("Application", "")
            fields["ApplicationData"] = event.get("AppData", "")
        elif kind == "BridgeEnter":
            fields["BridgeId"] = event.get("BridgeUniqueid", "")
        elif kind == "BridgeLeave":
            fields["BridgeId"] = ""

    def listing(self, action_id: str, now: float) -> list[list[tuple[str, str]]]:
        """The ``CoreShowChannel`` events of an answer to ``CoreShowChannels``."""
        listed = []
        for uid, fields in self._up.items():
            age = max(0, int(now - self._made[uid]))
            duration = f"{age // 3600:02d}:{age // 60 % 60:02d}:{age % 60:02d}"
            listed.append([("Event", "CoreShowChannel"), ("ActionID", action_id),
                           *fields.items(), ("Duration", duration)])
        return listed


# -- scenarios: one real call each ---------------------------------------------------------


def incoming_answered(pbx: Pbx, caller: str = "6912345678", ext: str = "201",
                      ring: float = 5, talk: float = 65, cdr: bool = True,
                      **_: str) -> list[Beat]:
    """A caller rings extension ``ext``, which answers and talks ``talk`` s; the caller
    hangs up first."""
    outside = pbx.outside(caller)
    phone = pbx.ring(outside, ext)
    pbx.wait(ring)
    bridge = pbx.answer(outside, phone)
    pbx.wait(talk)
    pbx.part(bridge, outside, phone)
    if cdr:
        pbx.cdr(outside, phone, "ANSWERED", ring + talk, talk)
    return pbx.take()


def incoming_missed(pbx: Pbx, caller: str = "6912345678", ext: str = "201",
                    ring: float = 20, cdr: bool = True, **_: str) -> list[Beat]:
    """Extension ``ext`` rings for ``ring`` s; the caller gives up (the dial cancelled)."""
    outside = pbx.outside(caller)
    phone = pbx.ring(outside, ext)
    pbx.wait(ring)
    pbx.dial_end(outside, phone, "CANCEL")
    pbx.hangup(phone, 26, "Answered elsewhere")
    pbx.hangup(outside)
    if cdr:
        pbx.cdr(outside, phone, "NO ANSWER", ring, 0)
    return pbx.take()


def incoming_voicemail(pbx: Pbx, caller: str = "6912345678", ext: str = "201",
                       ring: float = 20, talk: float = 15, cdr: bool = True,
                       **_: str) -> list[Beat]:
    """Nobody answers within ``ring`` s; the call goes to ``ext``'s voicemail (FreePBX:
    ``ext-local,vmu201`` then the ``macro-vm`` that answers), a ``talk`` s message."""
    outside = pbx.outside(caller)
    phone = pbx.ring(outside, ext)
    pbx.wait(ring)
    pbx.dial_end(outside, phone, "NOANSWER")
    pbx.hangup(phone, 19, "No answer")
    outside.context, outside.exten = "macro-vm", "s"
    pbx.state(outside, 6)
    pbx.wait(talk)
    pbx.hangup(outside)
    if cdr:
        pbx.cdr(outside, phone, "ANSWERED", ring + talk, talk, "VoiceMail")
    return pbx.take()


def incoming_busy(pbx: Pbx, caller: str = "6912345678", ext: str = "201",
                  cdr: bool = True, **_: str) -> list[Beat]:
    """Extension ``ext`` is busy; the caller hears the busy tone and hangs up."""
    outside = pbx.outside(caller)
    phone = pbx.channel(f"PJSIP/{ext}", "from-internal", ext, ext, outside.linkedid)
    pbx.new(phone)
    pbx.dial_begin(outside, phone, ext)
    pbx.wait(0.3)
    pbx.dial_end(outside, phone, "BUSY")
    pbx.hangup(phone, 17, "User busy")
    pbx.wait(3)
    pbx.hangup(outside, 17, "User busy")
    if cdr:
        pbx.cdr(outside, phone, "BUSY", 3.3, 0)
    return pbx.take()


def _outgoing(pbx: Pbx, ext: str, number: str, ring: float) -> tuple[Chan, Chan]:
    phone = pbx.channel(f"PJSIP/{ext}", pbx.internal, number, ext)
    phone.state = 4
    pbx.new(phone)
    line = pbx.channel(pbx.trunk, pbx.internal, number, pbx.did, phone.linkedid)
    line.connected = number
    pbx.new(line)
    pbx.dial_begin(phone, line, f"provider/{number}")
    pbx.wait(0.5)
    pbx.state(line, 5)
    pbx.wait(ring)
    return phone, line


def outgoing_answered(pbx: Pbx, ext: str = "201", number: str = "2101234567",
                      ring: float = 6, talk: float = 42, cdr: bool = True,
                      **_: str) -> list[Beat]:
    """Extension ``ext`` calls ``number``, which answers; the extension hangs up."""
    phone, line = _outgoing(pbx, ext, number, ring)
    bridge = pbx.answer(phone, line)
    pbx.wait(talk)
    pbx.part(bridge, phone, line)
    if cdr:
        pbx.cdr(phone, line, "ANSWERED", ring + talk, talk)
    return pbx.take()


def outgoing_unanswered(pbx: Pbx, ext: str = "201", number: str = "2101234567",
                        ring: float = 25, cdr: bool = True, **_: str) -> list[Beat]:
    """Extension ``ext`` calls ``number``, nobody answers; the extension gives up."""
    phone, line = _outgoing(pbx, ext, number, ring)
    pbx.dial_end(phone, line, "CANCEL")
    pbx.hangup(line, 16, "Normal Clearing")
    pbx.hangup(phone)
    if cdr:
        pbx.cdr(phone, line, "NO ANSWER", ring, 0)
    return pbx.take()


def outgoing_busy(pbx: Pbx, ext: str = "201", number: str = "2101234567",
                  cdr: bool = True, **_: str) -> list[Beat]:
    """Extension ``ext`` calls ``number``, which is busy."""
    phone, line = _outgoing(pbx, ext, number, 0.5)
    pbx.dial_end(phone, line, "BUSY")
    pbx.hangup(line, 17, "User busy")
    pbx.wait(2)
    pbx.hangup(phone, 17, "User busy")
    if cdr:
        pbx.cdr(phone, line, "BUSY", 3, 0)
    return pbx.take()


def blind_transfer(pbx: Pbx, caller: str = "6912345678", ext: str = "201",
                   to: str = "202", ring: float = 4, talk: float = 20,
                   cdr: bool = True, **_: str) -> list[Beat]:
    """``ext`` answers, talks ``talk`` s, transfers the caller blind to ``to`` (the
    caller's channel leaves the bridge and dials ``to``), who talks ``talk`` s more."""
    outside = pbx.outside(caller)
    first = pbx.ring(outside, ext)
    pbx.wait(ring)
    bridge = pbx.answer(outside, first)
    pbx.wait(talk)
    pbx.emit("BlindTransfer", [("Result", "Success")], first.fields("Transferer"),
             outside.fields("Transferee"), _bridge_fields(bridge, 2),
             [("IsExternal", "No"), ("Context", "from-internal"), ("Extension", to)])
    pbx.leave(bridge, first, 1)
    pbx.hangup(first)
    pbx.leave(bridge, outside, 0)
    pbx.emit("BridgeDestroy", _bridge_fields(bridge, 0))
    outside.context, outside.exten = "from-internal", to
    second = pbx.ring(outside, to)
    pbx.wait(ring)
    again = pbx.answer(outside, second)
    pbx.wait(talk)
    pbx.part(again, outside, second)
    if cdr:
        pbx.cdr(outside, second, "ANSWERED", 2 * (ring + talk), 2 * talk)
    return pbx.take()


def attended_transfer(pbx: Pbx, caller: str = "6912345678", ext: str = "201",
                      to: str = "202", ring: float = 4, talk: float = 20,
                      cdr: bool = True, **_: str) -> list[Beat]:
    """``ext`` answers, puts the caller on hold, calls ``to`` (a call of its own, another
    ``Linkedid``), talks, completes the transfer: ``to``'s channel takes ``ext``'s place
    in the caller's bridge (its ``Linkedid`` becomes the caller's), ``ext`` hangs up."""
    outside = pbx.outside(caller)
    first = pbx.ring(outside, ext)
    pbx.wait(ring)
    bridge = pbx.answer(outside, first)
    pbx.wait(talk)
    pbx.emit("Hold", first.fields(), [("MusicClass", "default")])
    consult = pbx.channel(f"PJSIP/{ext}", "from-internal", to, ext)
    consult.state = 6
    pbx.new(consult)
    target = pbx.ring(consult, to)
    pbx.wait(ring)
    inner = pbx.answer(consult, target)
    pbx.wait(talk / 2)
    # The transfer: the target moves into the caller's bridge in the place of ``ext``.
    pbx.leave(inner, target, 1)
    target.linkedid = outside.linkedid
    pbx.enter(bridge, target, 3, swap=first.uid)
    pbx.leave(bridge, first, 2)
    pbx.emit("AttendedTransfer", [("Result", "Success")],
             first.fields("OrigTransferer"), _prefixed(_bridge_fields(bridge, 2), "Orig"),
             consult.fields("SecondTransferer"),
             _prefixed(_bridge_fields(inner, 1), "Second"), outside.fields("Transferee"),
             target.fields("TransferTarget"), [("IsExternal", "No"), ("DestType", "Bridge"),
                                               ("DestBridgeUniqueid", bridge)])
    pbx.leave(inner, consult, 0)
    pbx.emit("BridgeDestroy", _bridge_fields(inner, 0))
    pbx.hangup(first)
    pbx.hangup(consult)
    pbx.wait(talk)
    pbx.part(bridge, outside, target)
    if cdr:
        pbx.cdr(outside, first, "ANSWERED", ring + 2.5 * talk + ring, 2.5 * talk + ring)
    return pbx.take()


def pickup(pbx: Pbx, caller: str = "6912345678", ext: str = "201", to: str = "202",
           ring: float = 6, talk: float = 30, cdr: bool = True, **_: str) -> list[Beat]:
    """``ext`` rings; ``to`` dials ``*8`` and picks the call up: the ringing channel is
    renamed to ``to``'s phone (Asterisk moves the picker into it), answered, bridged."""
    outside = pbx.outside(caller)
    phone = pbx.ring(outside, ext)
    pbx.wait(ring)
    picker = pbx.channel(f"PJSIP/{to}", "from-internal", "*8", to)
    picker.state = 6
    pbx.new(picker)
    pbx.emit("Pickup", picker.fields(), phone.fields("Target"))
    old_name = phone.name
    phone.name = picker.name
    pbx.emit("Rename", [("Channel", old_name), ("Newname", phone.name),
                        ("Uniqueid", phone.uid)])
    picker.name += "<ZOMBIE>"
    bridge = pbx.answer(outside, phone)
    pbx.hangup(picker)
    pbx.wait(talk)
    pbx.part(bridge, outside, phone)
    if cdr:
        pbx.cdr(outside, phone, "ANSWERED", ring + talk, talk)
    return pbx.take()


def queue(pbx: Pbx, caller: str = "6912345678", exts: str = "201,202,203",
          ext: str = "202", ring: float = 8, talk: float = 50, cdr: bool = True,
          **_: str) -> list[Beat]:
    """A queue (``Queue(sales)``) rings every extension of ``exts`` at once, each
    through a Local channel; ``ext`` answers, the others stop ringing. One call."""
    outside = pbx.outside(caller, pbx.did)
    outside.context, outside.exten = "ext-queues", "400"
    pbx.state(outside, 6)  # the queue answers the caller (music on hold)
    pbx.emit("QueueCallerJoin", outside.fields(), [("Queue", "400"), ("Position", "1"),
                                                   ("Count", "1")])
    legs: dict[str, tuple[Chan, Chan, Chan]] = {}
    for each in exts.split(","):
        one, two = pbx.local(each, "from-queue", outside.linkedid)
        pbx.new(one)
        pbx.new(two)
        pbx.dial_begin(outside, one, f"Local/{each}@from-queue/n")
        phone = pbx.channel(f"PJSIP/{each}", "from-internal", each, each,
                            outside.linkedid)
        pbx.new(phone)
        pbx.dial_begin(two, phone, each)
        pbx.state(phone, 5)
        legs[each] = (one, two, phone)
    pbx.wait(ring)
    one, two, phone = legs[ext]
    pbx.state(phone, 6)
    pbx.dial_end(two, phone, "ANSWER")
    pbx.state(one, 6)
    pbx.dial_end(outside, one, "ANSWER")
    for each, (o, t, p) in legs.items():
        if each == ext:
            continue
        pbx.dial_end(outside, o, "CANCEL")
        pbx.dial_end(t, p, "CANCEL")
        pbx.hangup(p, 26, "Answered elsewhere")
        pbx.hangup(t, 26, "Answered elsewhere")
        pbx.hangup(o, 26, "Answered elsewhere")
    pbx.emit("QueueCallerLeave", outside.fields(), [("Queue", "400"), ("Count", "0")])
    front, back = pbx.bridge(), pbx.bridge()
    pbx.enter(back, two, 1)
    pbx.enter(back, phone, 2)
    pbx.enter(front, outside, 1)
    pbx.enter(front, one, 2)
    pbx.wait(talk)
    pbx.leave(back, phone, 1)
    pbx.hangup(phone)
    pbx.leave(back, two, 0)
    pbx.hangup(two)
    pbx.leave(front, one, 1)
    pbx.hangup(one)
    pbx.leave(front, outside, 0)
    pbx.hangup(outside)
    if cdr:
        pbx.cdr(outside, one, "ANSWERED", ring + talk, ring + talk, "Queue")
    return pbx.take()


def _prefixed(pairs: list[tuple[str, str]], prefix: str) -> list[tuple[str, str]]:
    return [(prefix + key, value) for key, value in pairs]


Scenario = Callable[..., list[Beat]]
SCENARIOS: dict[str, Scenario] = {
    "incoming-answered": incoming_answered,
    "incoming-missed": incoming_missed,
    "incoming-voicemail": incoming_voicemail,
    "incoming-busy": incoming_busy,
    "outgoing-answered": outgoing_answered,
    "outgoing-unanswered": outgoing_unanswered,
    "outgoing-busy": outgoing_busy,
    "blind-transfer": blind_transfer,
    "attended-transfer": attended_transfer,
    "pickup": pickup,
    "queue": queue,
}
_NUMBERS = frozenset({"ring", "talk"})
_TEXTS = frozenset({"caller", "number", "ext", "to", "exts", "did"})


# -- scripts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Play:
    scenario: str
    params: tuple[tuple[str, Any], ...] = ()

    def beats(self, pbx: Pbx) -> list[Beat]:
        params = dict(self.params)
        did = params.pop("did", None)
        if did is not None:
            pbx.did = str(did)
        return SCENARIOS[self.scenario](pbx, **params)


@dataclass(frozen=True)
class Await:
    """Hold the script until a client has logged in."""


@dataclass(frozen=True)
class Close:
    """Close every connection, as an Asterisk restarting does."""


@dataclass(frozen=True)
class Step:
    delay: float
    action: Play | Await | Close


def parse_script(text: str) -> list[Step]:
    steps = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        delay_text, _, rest = line.partition(" ")
        try:
            delay = float(delay_text)
        except ValueError:
            raise ScriptError(number, f"{delay_text!r} is not a delay in seconds") from None
        if not 0 <= delay <= 86400:
            raise ScriptError(number, "the delay must be between 0 and 86400 seconds")
        words = rest.split()
        if not words:
            raise ScriptError(number, "a delay without a scenario")
        what, args = words[0], words[1:]
        if what in ("!await", "!close") and not args:
            steps.append(Step(delay, Await() if what == "!await" else Close()))
            continue
        if what not in SCENARIOS:
            raise ScriptError(number, f"unknown scenario {what!r} (known: "
                              f"{', '.join(sorted(SCENARIOS))}, !await, !close)")
        steps.append(Step(delay, Play(what, tuple(_param(number, arg) for arg in args))))
    return steps


def _param(number: int, arg: str) -> tuple[str, Any]:
    key, equals, value = arg.partition("=")
    if not equals or not value:
        raise ScriptError(number, f"{arg!r} is not key=value")
    if key in _NUMBERS:
        try:
            seconds = float(value)
        except ValueError:
            raise ScriptError(number, f"{key}={value!r} is not a number of seconds") from None
        if not 0 <= seconds <= 36000:
            raise ScriptError(number, f"{key} must be between 0 and 36000 seconds")
        return key, seconds
    if key == "cdr":
        if value not in ("yes", "no"):
            raise ScriptError(number, "cdr must be yes or no")
        return key, value == "yes"
    if key in _TEXTS:
        if not all(c.isalnum() or c in "+*#," for c in value):
            raise ScriptError(number, f"{key}={value!r}: digits and letters only")
        return key, value
    raise ScriptError(number, f"unknown key {key!r}")


# -- the Manager Interface -------------------------------------------------------------------


@dataclass
class Account:
    """A ``manager.conf`` user: its secret, whether it may originate (``write =
    originate``) and list the channels (``write = reporting``: ``CoreShowChannels``)."""

    username: str = "dpvoip"
    secret: str = DEMO_SECRET
    originate: bool = True
    reporting: bool = True

    def __repr__(self) -> str:  # the secret stays out of any message
        return (f"Account({self.username!r}, originate={self.originate},"
                f" reporting={self.reporting})")


class _ManagerSide(LineReceiver):
    """One connection to the fake Asterisk."""

    delimiter = b"\r\n"
    MAX_LENGTH = 16384

    def __init__(self, fake: FakeAsterisk) -> None:
        self._fake = fake
        self._reader = MessageReader(banner=BANNER)
        self.logged_in = False
        self.events = True
        self._challenge = ""

    def connectionMade(self) -> None:
        self.sendLine(BANNER.encode())
        self._fake.joined(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fake.left(self)

    def lineReceived(self, line: bytes) -> None:
        got = self._reader.feed(line.decode("utf-8", "replace"))
        if isinstance(got, Message):
            self._fake.actions.append(got)
            self._action(got)
        elif isinstance(got, Refused):
            self.reply(Message(()), "Error", [("Message", "Message too long")])

    def send(self, pairs: Sequence[tuple[str, str]]) -> None:
        if self.transport is not None:
            self.transport.write(encode(pairs))

    def reply(self, action: Message, response: str,
              extra: Sequence[tuple[str, str]] = ()) -> None:
        pairs = [("Response", response)]
        if action.action_id:
            pairs.append(("ActionID", action.action_id))
        self.send(pairs + list(extra))

    def _action(self, action: Message) -> None:
        name = action.get("Action").lower()
        if self._fake.silent:
            return  # a hung Asterisk: reads, never answers
        if name == "challenge":
            if action.get("AuthType").lower() != "md5":
                self.reply(action, "Error", [("Message", "Must specify AuthType")])
                return
            self._challenge = f"{secrets.randbelow(10**9):09d}"
            self.reply(action, "Success", [("Challenge", self._challenge)])
        elif name == "login":
            self._login(action)
        elif not self.logged_in:
            self.reply(action, "Error", [("Message", "Permission denied")])
        elif name == "ping":
            self.reply(action, "Success", [("Ping", "Pong"),
                                           ("Timestamp", f"{self._fake.now():.6f}")])
        elif name == "logoff":
            self.reply(action, "Goodbye", [("Message", "Thanks for all the fish.")])
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif name == "originate":
            self._fake.originate(self, action)
        elif name == "events":
            self.events = action.get("EventMask").lower() != "off"
            self.reply(action, "Success", [("Events", "On" if self.events else "Off")])
        elif name == "coreshowchannels":
            self._fake.show_channels(self, action)
        else:
            self.reply(action, "Error", [("Message", f"Invalid/unknown command: "
                                          f"{action.get('Action')}. Use Action: ListCommands "
                                          "to show available commands.")])

    def _login(self, action: Message) -> None:
        account = self._fake.account
        given_user = action.get("Username")
        if action.get("AuthType").lower() == "md5":
            expected = md5_key(self._challenge, account.secret)
            good = bool(self._challenge) and action.get("Key").lower() == expected
        else:
            good = action.get("Secret") == account.secret
        if not good or given_user != account.username:
            self._fake.failed_logins += 1
            self.reply(action, "Error", [("Message", "Authentication failed")])
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.logged_in = True
        self.events = action.get("Events", "on").lower() != "off"
        self.reply(action, "Success", [("Message", "Authentication accepted")])
        self.send([("Event", "FullyBooted"), ("Privilege", "system,all"),
                   ("Uptime", "1234"), ("LastReload", "1234"), ("Status", "Fully Booted")])
        self._fake.logged_in(self)


class FakeAsterisk:
    """The fake PBX: listens on loopback, answers actions, plays calls to its clients."""

    def __init__(self, reactor: Any, account: Account | None = None,
                 script: Sequence[Step] = (), epoch: int | None = None,
                 timestamps: bool = False, answer_originate: bool = True,
                 clock: Any = None) -> None:
        self._reactor = reactor
        self._clock = clock or reactor  # the calls' timing (a test's Clock)
        self.account = account or Account()
        self.script = list(script)
        self.pbx = Pbx(epoch=int(self._clock.seconds()) if epoch is None else epoch)
        self.timestamps = timestamps
        self.answer_originate = answer_originate
        self.silent = False  # True: read actions and answer nothing (a hung PBX)
        self.sides: list[_ManagerSide] = []
        self.actions: list[Message] = []
        self.failed_logins = 0
        self.sent_events = 0
        self._port: IListeningPort | None = None
        self._login_waiters: list[Deferred[None]] = []
        #: The channels up now, from the events played.
        self.channels = ChannelTable()
        self.end_lists = True  # False: a list's last event never comes (a PBX's bug)
        #: True: a list is taken when asked for and sent on ``send_lists`` (events that
        #: happen in between are sent before it, as on a busy PBX).
        self.hold_lists = False
        self._held_lists: list[Callable[[], None]] = []

    def now(self) -> float:
        return float(self._clock.seconds())

    def listen(self, port: int = 0, host: str = "127.0.0.1") -> int:
        factory = Factory.forProtocol(lambda: _ManagerSide(self))
        factory.noisy = False
        self._port = self._reactor.listenTCP(port, factory, interface=host)
        return int(self._port.getHost().port)  # type: ignore[union-attr]

    def factory(self) -> Factory:
        """A factory of the fake's connections (a test's ``StringTransport`` server)."""
        return Factory.forProtocol(lambda: _ManagerSide(self))

    async def stop(self) -> None:
        for side in list(self.sides):
            cast(ITCPTransport, side.transport).abortConnection()
        if self._port is not None:
            port, self._port = self._port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped

    def joined(self, side: _ManagerSide) -> None:
        self.sides.append(side)

    def left(self, side: _ManagerSide) -> None:
        if side in self.sides:
            self.sides.remove(side)

    def logged_in(self, side: _ManagerSide) -> None:
        waiters, self._login_waiters = self._login_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_logged_in(self) -> Deferred[None]:
        if any(side.logged_in for side in self.sides):
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._login_waiters.append(waiting)
        return waiting

    def close_all(self) -> None:
        """Asterisk restarting: every connection closed, every channel gone."""
        self.drop_connections()
        self.channels.clear()

    def drop_connections(self) -> None:
        """The network between dpvoip and the PBX failing: the connections go, the calls
        (their channels) go on."""
        for side in list(self.sides):
            if side.transport is not None:
                side.transport.loseConnection()

    def show_channels(self, side: _ManagerSide, action: Message) -> None:
        """``CoreShowChannels``: the channels up now, one event each, then the end."""
        if not self.account.reporting:
            side.reply(action, "Error", [("Message", "Permission denied")])
            return
        side.reply(action, "Success", [("EventList", "start"),
                                       ("Message", "Channels will follow")])
        listing = self.channels.listing(action.action_id, self.now())

        def send() -> None:
            for listed in listing:
                side.send(listed)
            if self.end_lists:
                side.send([("Event", "CoreShowChannelsComplete"),
                           ("ActionID", action.action_id), ("EventList", "Complete"),
                           ("ListItems", str(len(listing)))])

        if self.hold_lists:
            self._held_lists.append(send)
        else:
            send()

    def send_lists(self) -> int:
        """Send the lists held (``hold_lists``); how many."""
        held, self._held_lists = self._held_lists, []
        for send in held:
            send()
        return len(held)

    def broadcast(self, pairs: Sequence[tuple[str, str]]) -> None:
        """An event to every logged-in client that takes events."""
        self.channels.follow(pairs, self.now())
        if self.timestamps:
            pairs = [*pairs[:1], ("Timestamp", f"{self.now():.6f}"), *pairs[1:]]
        for side in self.sides:
            if side.logged_in and side.events:
                side.send(pairs)
                self.sent_events += 1

    async def play_beats(self, beats: Sequence[Beat]) -> None:
        for beat in beats:
            if beat.delay:
                await deferLater(self._clock, beat.delay, lambda: None)
            self.broadcast(beat.fields)

    async def play(self) -> None:
        """The script, once, in order."""
        for step in self.script:
            if step.delay:
                await deferLater(self._clock, step.delay, lambda: None)
            if isinstance(step.action, Await):
                await self.when_logged_in()
            elif isinstance(step.action, Close):
                self.close_all()
            else:
                log.info("playing {scenario}", scenario=step.action.scenario)
                await self.play_beats(step.action.beats(self.pbx))

    def originate(self, side: _ManagerSide, action: Message) -> None:
        """``Originate``: refused without the right, else queued (``Async``), then the
        user's phone rings and answers, the number is dialled, and
        ``OriginateResponse`` says how the first leg went."""
        if not self.account.originate:
            side.reply(action, "Error", [("Message", "Permission denied")])
            return
        channel, number = action.get("Channel"), action.get("Exten")
        ext = channel.partition("/")[2]
        if not ext.isdigit() or not number or not action.get("Context"):
            side.reply(action, "Error", [("Message", "Originate failed")])
            return
        side.reply(action, "Success", [("Message", "Originate successfully queued")])
        beats = self._originated(ext, number, action)
        done = deferLater(self._clock, 0, lambda: None)
        done.addCallback(lambda _: self._play_originated(beats))

    def _originated(self, ext: str, number: str, action: Message) -> list[Beat]:
        pbx = self.pbx
        phone = pbx.channel(f"PJSIP/{ext}", action.get("Context"), number, ext)
        pbx.new(phone)
        pbx.state(phone, 5)
        pbx.wait(2)
        response: list[tuple[str, str]] = [
            ("ActionID", action.action_id), ("Channel", action.get("Channel")),
            ("Context", action.get("Context")), ("Exten", number), ("Application", ""),
            ("Data", ""), ("Uniqueid", phone.uid), ("CallerIDNum", ext),
            ("CallerIDName", "<unknown>")]
        if not self.answer_originate:
            pbx.hangup(phone, 19, "No answer")
            pbx.emit("OriginateResponse", [("Response", "Failure"), *response[:6],
                                           ("Reason", "1"), *response[6:]])
            return pbx.take()
        pbx.state(phone, 6)
        pbx.emit("OriginateResponse", [("Response", "Success"), *response[:6],
                                       ("Reason", "4"), *response[6:]])
        line = pbx.channel(pbx.trunk, action.get("Context"), number, pbx.did, phone.linkedid)
        pbx.new(line)
        pbx.dial_begin(phone, line, f"provider/{number}")
        pbx.wait(3)
        bridge = pbx.answer(phone, line)
        pbx.wait(20)
        pbx.part(bridge, phone, line)
        return pbx.take()

    def _play_originated(self, beats: list[Beat]) -> Deferred[None]:
        return Deferred.fromCoroutine(self.play_beats(beats))


# -- dpvoip asterisk-sim -----------------------------------------------------------------------


def serve(path: str, port: int = 5038, host: str = "127.0.0.1", username: str = "dpvoip",
          secret: str = DEMO_SECRET, loop: bool = False) -> int:
    """``dpvoip asterisk-sim``: play the script at ``path`` to whoever logs in on
    ``host``:``port``. 0 when played (or on Ctrl-C), 2 for a bad script, 1 when the port
    cannot be bound."""
    try:
        script = parse_script(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        print(f"asterisk-sim: cannot read {path}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    except ScriptError as error:
        print(f"asterisk-sim: {path}: {error}", file=sys.stderr)
        return 2

    from twisted.internet import task

    async def main(reactor: Any) -> None:
        fake = FakeAsterisk(reactor, Account(username, secret), script)
        try:
            bound = fake.listen(port, host)
        except CannotListenError as error:
            print(f"asterisk-sim: cannot listen on {host}:{port}: {error.socketError}",
                  file=sys.stderr)
            raise SystemExit(1) from None
        print(f"asterisk-sim: AMI on {host}:{bound}, user {username!r}; playing {path} "
              "once a client has logged in", flush=True)
        try:
            while True:
                await fake.when_logged_in()
                await fake.play()
                print("asterisk-sim: script played", flush=True)
                if not loop:
                    break
        finally:
            await fake.stop()

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0
