"""Following Asterisk's calls: AMI channel events in, call happenings out. Pure.

Asterisk (12 and later; the fields as docs.asterisk.org documents them for Asterisk 20,
the same in 18-22) shows a call as channels: the trunk's channel of an incoming call, the
channels of the phones it rings, Local channels of queues and ring groups, the channel of
a phone that picks the call up or is transferred to. Every channel carries ``Uniqueid``
and ``Linkedid`` ("Uniqueid of the oldest channel associated with this channel"): the
channels of one call share one ``Linkedid``, and the bridging core gives a channel that
joins a bridge the oldest ``Linkedid`` of the bridge, so a transferred call stays one.

So one call here is one ``Linkedid``, and its dpvoip id ``ast-<pbx>-<Linkedid>`` is what
Asterisk gave it: the same events give the same id after a reconnect or a replay. A
channel is followed by its ``Uniqueid``; one that turns up with another call's
``Linkedid``, or enters a bridge holding another call's outside channel, moves there.

What a call is, decided from the channels' names and contexts (``PbxRules``):

* a trunk's channel (a name matching ``trunk_patterns``, or one created in one of
  ``incoming_contexts``; by default anything that is neither a phone nor ``Local/``) is the
  outside party; a phone's channel (``extension_pattern``: ``PJSIP/201-0000002a``) is an
  extension; ``Local/201@from-queue-...;1`` stands for extension 201 too (queues, ring
  groups, follow-me);
* the call's first channel a trunk's: incoming, the caller its ``CallerIDNum``, the
  number called its ``Exten``; a phone's, dialling a trunk: outgoing, the number its
  ``Exten`` (else the dial string's); phones only: internal, never recorded;
* answered by the extension whose channel answered the dial (``DialEnd``, ``DialStatus:
  ANSWER``) or entered a bridge with the outside party (``BridgeEnter``); a later other
  extension (blind or attended transfer, the call handed on by a queue) is an answer
  with ``transfer``; a ``Pickup`` names the phone that took the call;
* voicemail when the outside channel reaches one of ``voicemail_contexts`` or an
  extension matching ``voicemail_extensions`` (FreePBX: ``vmu201``) or runs
  ``VoiceMail`` before anybody answered; the message's length from then on;
* ended when the call's last channel hangs up: answered, voicemail or missed (incoming;
  a busy office is a missed call for the caller: it gets a ticket), answered, busy
  (``DialStatus: BUSY`` or cause 17), failed (``CHANUNAVAIL``, ``CONGESTION``) or not
  reached (outgoing). Talk time runs from the first answer to the outside channel's
  hangup.

A ``Cdr`` event (cdr_manager enabled) only confirms: its ``Disposition`` is compared with
the outcome already decided, counted (``cdr_confirmed``, ``cdr_disagreed``); it never
records anything.

Bounded: at most ``max_open`` calls and ``max_channels`` channels are followed. Beyond,
the oldest call is closed as interrupted and counted in ``evicted``: a PBX that sends
channels with fresh ids without end cannot grow the follower without end. Bridges and
the calls kept for their ``Cdr`` are bounded the same way.

Times: an event's ``Timestamp`` (``timestampevents = yes`` in manager.conf) when it has
one, else the time it arrived, which the caller passes in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase

from dpvoip.asterisk.messages import Message
from dpvoip.core.happenings import Answered, Ended, Forwarded, Happening, Started
from dpvoip.core.outcomes import Detail, Outcome, Reason

#: What Asterisk sends for an unknown caller id.
_UNKNOWN = frozenset({"", "<unknown>", "unknown", "anonymous"})
#: Dial statuses of an outgoing call that did not reach the network at all.
_FAILED_DIALS = frozenset({"CHANUNAVAIL", "CONGESTION"})
#: Hangup cause 17: user busy (Q.850).
_CAUSE_BUSY = "17"
#: Cdr dispositions and the outcomes each agrees with.
_AGREES = {
    "ANSWERED": {Outcome.ANSWERED, Outcome.VOICEMAIL},
    "NO ANSWER": {Outcome.MISSED, Outcome.NOT_REACHED},
    "BUSY": {Outcome.BUSY, Outcome.MISSED},
    "FAILED": {Outcome.FAILED, Outcome.NOT_REACHED, Outcome.MISSED},
    "CONGESTION": {Outcome.FAILED, Outcome.NOT_REACHED},
}
_LOCAL = re.compile(r"^Local/([^@;/]+)@")
#: A Uniqueid's creation second and sequence (``1700000000.42``, ``host-1700000000.42``).
_UNIQUEID = re.compile(r"(\d+)\.(\d+)$")
_VOICEMAIL_BOX = re.compile(r"(\d+)")


def call_id(pbx: str, linkedid: str) -> str:
    """dpvoip's id of an Asterisk call: the PBX's name and the call's ``Linkedid``."""
    return f"ast-{pbx}-{linkedid}"


def connection_number(linkedid: str) -> int:
    """A number for the call detail's connection column: the sequence part of the
    ``Linkedid`` (``1700000000.42`` -> 42), bounded to a PostgreSQL integer."""
    digits = "".join(c for c in linkedid.rpartition(".")[2] if c.isdigit())
    return int(digits[-9:] or 0) % 2**31


@dataclass(frozen=True)
class PbxRules:
    """What the follower needs to know about one Asterisk."""

    name: str
    #: Channel names (shell patterns) of the trunks, e.g. ``PJSIP/provider-*``; empty:
    #: every channel that is neither a phone nor ``Local/`` is a trunk's.
    trunk_patterns: tuple[str, ...] = ()
    #: Contexts an incoming call from a trunk starts in (FreePBX: ``from-trunk``,
    #: ``from-pstn``): a channel created there is the outside party, whatever its name.
    incoming_contexts: tuple[str, ...] = ("from-trunk", "from-pstn", "from-external",
                                          "from-did-direct")
    #: A phone's channel; group 1 is the extension.
    extension_pattern: str = r"^(?:PJSIP|SIP|IAX2)/(\d{2,6})-[0-9A-Fa-f]+$"
    voicemail_contexts: tuple[str, ...] = ("voicemail", "macro-vm", "sub-vm", "vm")
    voicemail_extensions: tuple[str, ...] = ("vmu*", "vmb*", "vms*", "vmi*", "*97", "*98")
    max_open: int = 64
    max_channels: int = 512

    def extension_of(self, channel: str) -> str | None:
        """The extension a phone's or a Local channel's name stands for, else None."""
        found = re.match(self.extension_pattern, channel)
        if found:
            return found.group(1)
        local = _LOCAL.match(channel)
        if local and local.group(1).isdigit():
            return local.group(1)
        return None

    def is_trunk(self, channel: str, context: str = "") -> bool:
        if any(fnmatchcase(channel, pattern) for pattern in self.trunk_patterns):
            return True
        if context in self.incoming_contexts:
            return True
        if self.trunk_patterns or channel.startswith("Local/"):
            return False
        return re.match(self.extension_pattern, channel) is None

    def is_voicemail(self, context: str, exten: str) -> bool:
        return context in self.voicemail_contexts or any(
            fnmatchcase(exten, pattern) for pattern in self.voicemail_extensions)


@dataclass
class _Channel:
    uid: str
    name: str
    linkedid: str
    trunk: bool
    extension: str | None
    context: str = ""
    exten: str = ""
    caller: str = ""
    picked_by: str | None = None  # the extension of a phone that picked it up


@dataclass
class _Call:
    linkedid: str
    call_id: str
    started: datetime
    first: str  # the uid of its first channel
    channels: set[str] = field(default_factory=set)
    direction: str | None = None  # None: internal so far
    outside: str | None = None  # the uid of the outside party's channel
    dialler: str | None = None  # outgoing: the extension that dialled
    answered_by: str | None = None
    answered_at: datetime | None = None
    voicemail_at: datetime | None = None
    voicemail_box: str | None = None
    rang: str | None = None  # the last extension it rang
    statuses: list[str] = field(default_factory=list)
    busy_cause: bool = False
    outside_gone: datetime | None = None
    cdr: str = ""  # a Cdr's disposition that came before the end
    forwarded_to: str = ""  # incoming, dialled on to an outside number (a mobile)


@dataclass
class FollowerCounters:
    events: int = 0
    ignored: int = 0  # events of channels never seen (before a reconnect), or not calls'
    evicted: int = 0
    internal: int = 0  # calls between the office's own phones, not recorded
    cdr_confirmed: int = 0
    cdr_disagreed: int = 0
    cdr_unknown: int = 0


def _integer(extension: str | None) -> int | None:
    return int(extension) if extension is not None and extension.isdigit() else None


def _number(raw: str) -> str:
    return "" if raw.strip().lower() in _UNKNOWN else raw.strip()


class CallFollower:
    """One Asterisk's channels and calls; ``feed`` each event, hand on what it returns."""

    def __init__(self, rules: PbxRules,
                 disagreed: Callable[[str, str, Outcome], None] | None = None) -> None:
        self.rules = rules
        self._channels: dict[str, _Channel] = {}
        self._calls: dict[str, _Call] = {}  # by Linkedid, oldest first
        self._bridges: dict[str, list[str]] = {}  # bridge id: uids, in order of entry
        self._ended: dict[str, Outcome] = {}  # Linkedid: outcome, for a late Cdr
        self._disagreed = disagreed
        self.counters = FollowerCounters()
        self._on = self._handlers()  # made once: every AMI event looks its kind up here

    @property
    def open_calls(self) -> int:
        """Calls recorded (not internal ones) and not ended yet."""
        return sum(1 for call in self._calls.values() if call.direction is not None)

    def followed_calls(self) -> frozenset[str]:
        """The ids of the calls followed now (recorded ones): the PBX has them."""
        return frozenset(call.call_id for call in self._calls.values()
                         if call.direction is not None)

    @property
    def followed(self) -> tuple[int, int, int]:
        """(calls, channels, bridges) held: what the bounds bound."""
        return len(self._calls), len(self._channels), len(self._bridges)

    def feed(self, event: Message, arrived: datetime) -> list[Happening]:
        """The happenings ``event`` (arrived at ``arrived``, UTC) makes."""
        self.counters.events += 1
        at = _time_of(event, arrived)
        handler = self._on.get(event.event)
        if handler is None:
            return []
        return handler(event, at)

    def _handlers(self) -> dict[str, Callable[[Message, datetime], list[Happening]]]:
        """The events that change what is followed, and what each does."""
        return {
            "Newchannel": self._new_channel,
            "DialBegin": self._dial_begin,
            "DialEnd": self._dial_end,
            "BridgeEnter": self._bridge_enter,
            "BridgeLeave": self._bridge_leave,
            "Newstate": self._state,
            "Newexten": self._state,
            "NewCallerid": self._state,
            "Rename": self._state,
            "Pickup": self._pickup,
            "Hangup": self._hangup,
            "Cdr": self._cdr,
        }

    def close_all(self, reason: Reason, at: datetime) -> list[Happening]:
        """Close every call as interrupted (the connection to Asterisk was lost: what
        happened meanwhile is not known) and forget every channel."""
        ended: list[Happening] = [
            self._interrupted(call, at, Detail(reason)) for call in self._calls.values()
            if call.direction is not None]
        self._calls.clear()
        self._channels.clear()
        self._bridges.clear()
        return ended

    def resume(self, alive: set[str], at: datetime) -> list[Happening]:
        """After a reconnect, the channels the PBX still has (``alive``, their Uniqueids:
        its ``CoreShowChannels``): a call whose outside party is still there is followed
        on (its channels that went meanwhile forgotten); any other call ended while the
        link was down, how is not known: closed as interrupted (link lost)."""
        closed: list[Happening] = []
        for linkedid, call in list(self._calls.items()):
            kept = call.channels & alive
            if not kept or (call.outside is not None and call.outside not in kept):
                self._forget(linkedid)
                if call.direction is not None:
                    closed.append(self._interrupted(call, at, Detail(Reason.LINK_LOST)))
                continue
            for uid in call.channels - kept:
                self._channels.pop(uid, None)
            call.channels = kept
        for bridge, uids in list(self._bridges.items()):
            uids[:] = [uid for uid in uids if uid in self._channels]
            if not uids:
                del self._bridges[bridge]
        return closed

    def adopt(self, listed: Sequence[Message], at: datetime) -> list[Happening]:
        """After a login (and ``resume``), the channels the PBX listed that are not
        followed: calls that began while the link was down (or dpvoip was not running),
        and phones that joined a followed call meanwhile. Each is re-enacted from what the
        list shows, as if its events had come: the channel made (dated by its
        ``Duration``, oldest first), an outgoing call's dial, where each channel is in the
        dialplan (voicemail), the bridges (an answer). Such a call is then recorded and
        followed to its end like any other.

        What the list cannot show is not guessed: an adopted incoming call's number
        called is known only while its outside channel is still where the trunk put it
        (an incoming context), and an answer made meanwhile is dated by the list."""
        happened: list[Happening] = []
        order = sorted(listed, key=_creation)
        made = [m for m in order
                if m.get("Uniqueid") and m.get("Channel") and m.get("Uniqueid")
                not in self._channels]
        for m in made:
            context, exten = m.get("Context"), m.get("Exten")
            if (self.rules.is_trunk(m.get("Channel"), context)
                    and context not in self.rules.incoming_contexts):
                exten = ""  # moved on in the dialplan: no longer the number called
            happened += self._new_channel(_event(
                "Newchannel", m, ("Context", context), ("Exten", exten)),
                at - timedelta(seconds=_duration(m.get("Duration"))))
        for m in made:
            happened += self._adopted_dial(m, order, at)
        for m in order:
            happened += self._state(_event(
                "Newexten", m, ("Context", m.get("Context")), ("Exten", m.get("Exten")),
                ("Application", m.get("Application")),
                ("AppData", m.get("ApplicationData"))), at)
        for m in order:
            bridge = m.get("BridgeId")
            if bridge and m.get("Uniqueid") not in self._bridges.get(bridge, ()):
                happened += self._bridge_enter(_event(
                    "BridgeEnter", m, ("BridgeUniqueid", bridge)), at)
        return happened

    def _adopted_dial(self, listed: Message, order: Sequence[Message], at: datetime
                      ) -> list[Happening]:
        """What an adopted call's dial shows: an incoming call rang the phone listed in
        it (the last one: its extension for a missed call); a call whose first channel is
        a phone's, with a trunk's channel in it, was dialled out by that phone (its
        ``Dial`` is the list's application data)."""
        channel = self._channels.get(listed.get("Uniqueid"))
        call = self._call_of(channel) if channel is not None else None
        if channel is None or call is None:
            return []
        if call.direction == "incoming" and channel.extension is not None:
            call.rang = channel.extension
            return []
        if call.first != channel.uid or channel.trunk or call.direction is not None:
            return []
        trunk = next((m for m in order if m.get("Linkedid") == call.linkedid
                      and (c := self._channels.get(m.get("Uniqueid"))) is not None
                      and c.trunk), None)
        if trunk is None:
            return []
        dial = listed.get("ApplicationData") if listed.get("Application") == "Dial" else ""
        return self._dial_begin(Message((
            ("Event", "DialBegin"), ("Uniqueid", channel.uid), ("Channel", channel.name),
            ("DestUniqueid", trunk.get("Uniqueid")), ("DestChannel", trunk.get("Channel")),
            ("DialString", dial))),
            at - timedelta(seconds=_duration(trunk.get("Duration"))))

    # -- channels and calls ------------------------------------------------------------

    def _channel(self, event: Message, prefix: str = "") -> _Channel | None:
        """The followed channel an event (or its ``Dest``/``Target`` side) is about,
        moved to the call its ``Linkedid`` now names."""
        uid = event.get(prefix + "Uniqueid")
        channel = self._channels.get(uid)
        if channel is None:
            return None
        name = event.get(prefix + "Channel")
        if name and name != channel.name:
            channel.name = name
        for key, attribute in (("Context", "context"), ("Exten", "exten")):
            value = event.get(prefix + key)
            if value:
                setattr(channel, attribute, value)
        linkedid = event.get(prefix + "Linkedid")
        if linkedid and linkedid != channel.linkedid and linkedid in self._calls:
            self._move(channel, linkedid)
        return channel

    def _move(self, channel: _Channel, linkedid: str) -> None:
        old = self._calls.get(channel.linkedid)
        if old is not None:
            old.channels.discard(channel.uid)
        channel.linkedid = linkedid
        self._calls[linkedid].channels.add(channel.uid)

    def _call_of(self, channel: _Channel) -> _Call | None:
        return self._calls.get(channel.linkedid)

    def _new_channel(self, event: Message, at: datetime) -> list[Happening]:
        uid, linkedid = event.get("Uniqueid"), event.get("Linkedid") or event.get("Uniqueid")
        name, context = event.get("Channel"), event.get("Context")
        if not uid or not name:
            self.counters.ignored += 1
            return []
        happened = self._room_for(linkedid, at)
        trunk = self.rules.is_trunk(name, context)
        channel = _Channel(uid, name, linkedid, trunk,
                           None if trunk else self.rules.extension_of(name), context,
                           event.get("Exten"), _number(event.get("CallerIDNum")))
        self._channels[uid] = channel
        call = self._calls.get(linkedid)
        if call is None:
            call = self._calls[linkedid] = _Call(linkedid, call_id(self.rules.name, linkedid),
                                                 at, uid)
        call.channels.add(uid)
        if trunk and call.direction is None and call.first == uid:
            call.direction, call.outside = "incoming", uid
            happened.append(Started(
                call.call_id, self.rules.name, connection_number(linkedid), "incoming",
                channel.caller, _digits_only(channel.exten), _line(name), None, at))
        return happened

    def _room_for(self, linkedid: str, at: datetime) -> list[Happening]:
        """Close the oldest calls while a new channel would break a bound."""
        closed: list[Happening] = []
        while self._calls and (
                len(self._channels) >= self.rules.max_channels
                or (linkedid not in self._calls and len(self._calls) >= self.rules.max_open)):
            oldest = next(iter(self._calls))
            self.counters.evicted += 1
            call = self._forget(oldest)
            if call.direction is not None:
                closed.append(self._interrupted(call, at, None))
        return closed

    def _forget(self, linkedid: str) -> _Call:
        call = self._calls.pop(linkedid)
        for uid in call.channels:
            self._channels.pop(uid, None)
        return call

    def _interrupted(self, call: _Call, at: datetime, detail: Detail | None) -> Ended:
        return Ended(call.call_id, Outcome.INTERRUPTED, 0, at,
                     _integer(call.answered_by or call.dialler), detail)

    # -- events ------------------------------------------------------------------------

    def _dial_begin(self, event: Message, at: datetime) -> list[Happening]:
        caller = self._channel(event)
        dest = self._channel(event, "Dest")
        if caller is None or dest is None:
            self.counters.ignored += 1
            return []
        call = self._call_of(caller)
        if call is None:
            return []
        if dest.trunk and call.direction is None:
            first = self._channels.get(call.first)
            if first is None or first.extension is None or first.trunk:
                return []
            call.direction, call.outside, call.dialler = "outgoing", dest.uid, first.extension
            number = _digits_only(caller.exten) or _dialled(event.get("DialString"))
            return [Started(call.call_id, self.rules.name, connection_number(call.linkedid),
                            "outgoing", number, "", _line(dest.name),
                            _integer(first.extension), at)]
        if dest.trunk and call.direction == "outgoing" and call.outside is None:
            call.outside = dest.uid
        if dest.trunk and call.direction == "incoming" and not call.forwarded_to:
            number = _dialled(event.get("DialString")) or _digits_only(dest.exten)
            if number:
                call.forwarded_to = number
                return [Forwarded(call.call_id, number, at)]
        if dest.extension is not None:
            call.rang = dest.extension
        return []

    def _dial_end(self, event: Message, at: datetime) -> list[Happening]:
        caller = self._channel(event)
        dest = self._channel(event, "Dest")
        if caller is None or dest is None:
            self.counters.ignored += 1
            return []
        call = self._call_of(caller)
        if call is None or call.direction is None:
            return []
        status = event.get("DialStatus").upper()
        call.statuses.append(status)
        if status != "ANSWER":
            return []
        if dest.trunk and call.direction == "outgoing":
            return self._answered(call, call.dialler, at)
        if dest.trunk and call.forwarded_to and call.answered_at is None:
            call.answered_at = at  # answered out there: no extension of the office's
            return []
        return self._answered(call, dest.picked_by or dest.extension, at)

    def _answered(self, call: _Call, extension: str | None, at: datetime) -> list[Happening]:
        """A person on ``extension`` now speaks with the outside party."""
        if extension is None or extension == call.answered_by or call.direction is None:
            return []
        transfer = call.answered_by is not None
        call.answered_by = extension
        if call.answered_at is None:
            call.answered_at = at
        number = _integer(extension)
        if number is None:
            return []  # a named endpoint: answered, but the call row holds numbers only
        return [Answered(call.call_id, number, at, transfer=transfer)]

    def _bridge_enter(self, event: Message, at: datetime) -> list[Happening]:
        channel = self._channel(event)
        bridge = event.get("BridgeUniqueid")
        if channel is None or not bridge:
            self.counters.ignored += 1
            return []
        if bridge not in self._bridges and len(self._bridges) >= self.rules.max_channels:
            del self._bridges[next(iter(self._bridges))]
        members = self._bridges.setdefault(bridge, [])
        if channel.uid in members:
            members.remove(channel.uid)
        members.append(channel.uid)
        # The bridge's outside party is the call's outside party: whoever joins it is
        # in that call now (an attended transfer's target, a picked-up phone).
        present = [self._channels[uid] for uid in members if uid in self._channels]
        outside = next((c for c in present if self._is_outside(c)), None)
        if outside is None:
            return []
        call = self._call_of(outside)
        if call is None:
            return []
        if channel.linkedid != outside.linkedid:
            self._move(channel, outside.linkedid)
        if channel is outside:
            phones = [c for c in present if c is not outside and not c.trunk]
            joined = phones[-1] if phones else None
        else:
            joined = channel if not channel.trunk else None
        if joined is None:
            return []
        return self._answered(call, joined.picked_by or joined.extension, at)

    def _is_outside(self, channel: _Channel) -> bool:
        call = self._call_of(channel)
        return call is not None and call.outside == channel.uid

    def _bridge_leave(self, event: Message, at: datetime) -> list[Happening]:
        bridge = self._bridges.get(event.get("BridgeUniqueid"))
        uid = event.get("Uniqueid")
        if bridge is not None and uid in bridge:
            bridge.remove(uid)
            if not bridge:
                del self._bridges[event.get("BridgeUniqueid")]
        return []

    def _state(self, event: Message, at: datetime) -> list[Happening]:
        """``Newstate``, ``Newexten``, ``NewCallerid``, ``Rename``: where a channel is."""
        if event.event == "Rename":
            channel = self._channels.get(event.get("Uniqueid"))
            if channel is not None and event.get("Newname"):
                channel.name = event.get("Newname")
                if not channel.trunk:
                    channel.extension = self.rules.extension_of(channel.name)
            return []
        channel = self._channel(event)
        if channel is None:
            self.counters.ignored += 1
            return []
        if event.event == "NewCallerid" and channel.trunk:
            channel.caller = _number(event.get("CallerIDNum")) or channel.caller
        self._voicemail(channel, event, at)
        return []

    def _voicemail(self, channel: _Channel, event: Message, at: datetime) -> None:
        call = self._call_of(channel)
        if call is None or call.direction != "incoming" or call.answered_by is not None:
            return
        if call.voicemail_at is not None:
            return
        application = event.get("Application")
        context, exten = channel.context, channel.exten
        if not (self.rules.is_voicemail(context, exten) or application == "VoiceMail"):
            return
        if not (channel.uid == call.outside or channel.name.startswith("Local/")):
            return
        if event.event == "Newstate" and event.get("ChannelStateDesc") != "Up":
            return
        call.voicemail_at = at
        found = _VOICEMAIL_BOX.search(event.get("AppData") if application else exten)
        call.voicemail_box = found.group(1) if found else call.rang

    def _pickup(self, event: Message, at: datetime) -> list[Happening]:
        picker = self.rules.extension_of(event.get("Channel"))
        target = self._channel(event, "Target")
        if target is None or picker is None:
            self.counters.ignored += 1
            return []
        target.picked_by = picker
        return []

    def _hangup(self, event: Message, at: datetime) -> list[Happening]:
        channel = self._channel(event)
        if channel is None:
            self.counters.ignored += 1
            return []
        del self._channels[channel.uid]
        call = self._call_of(channel)
        if call is None:
            return []
        call.channels.discard(channel.uid)
        if channel.uid == call.outside:
            call.outside_gone = at
            if event.get("Cause") == _CAUSE_BUSY:
                call.busy_cause = True
            self._voicemail(channel, event, at)
        if call.channels:
            return []
        del self._calls[call.linkedid]
        if call.direction is None:
            self.counters.internal += 1
            return []
        ended = self._end(call, at)
        self._remember(call, ended.outcome)
        return [ended]

    def _end(self, call: _Call, at: datetime) -> Ended:
        talk_end = call.outside_gone or at
        if call.direction == "incoming":
            if call.answered_at is not None:
                outcome, since = Outcome.ANSWERED, call.answered_at
                extension = call.answered_by
            elif call.voicemail_at is not None:
                outcome, since, extension = (Outcome.VOICEMAIL, call.voicemail_at,
                                             call.voicemail_box)
            else:
                outcome, since, extension = Outcome.MISSED, None, call.rang
        else:
            extension = call.answered_by or call.dialler
            since = call.answered_at
            if call.answered_by is not None:
                outcome = Outcome.ANSWERED
            elif "BUSY" in call.statuses or call.busy_cause:
                outcome = Outcome.BUSY
            elif call.statuses and all(s in _FAILED_DIALS for s in call.statuses):
                outcome = Outcome.FAILED
            else:
                outcome = Outcome.NOT_REACHED
        talk = max(0, round((talk_end - since).total_seconds())) if since else 0
        if call.cdr:
            self._confirm(call.call_id, call.cdr, outcome)
        detail = Detail(Reason.FORWARDED, call.forwarded_to) if call.forwarded_to else None
        return Ended(call.call_id, outcome, talk, at, _integer(extension), detail)

    def _remember(self, call: _Call, outcome: Outcome) -> None:
        if call.cdr:
            return  # confirmed already
        self._ended[call.linkedid] = outcome
        while len(self._ended) > self.rules.max_open:
            del self._ended[next(iter(self._ended))]

    def _cdr(self, event: Message, at: datetime) -> list[Happening]:
        """A call's record (``UniqueID``: its first channel, so its ``Linkedid``)
        confirms the outcome; the records of its other legs are not the call's."""
        uid = event.get("UniqueID")
        disposition = event.get("Disposition").upper()
        call = self._calls.get(uid)
        if call is not None:
            call.cdr = call.cdr or disposition
            return []
        outcome = self._ended.pop(uid, None)
        if outcome is None:
            if uid not in self._channels:
                self.counters.cdr_unknown += 1
            return []
        self._confirm(call_id(self.rules.name, uid), disposition, outcome)
        return []

    def _confirm(self, identity: str, disposition: str, outcome: Outcome) -> None:
        if outcome in _AGREES.get(disposition, set()):
            self.counters.cdr_confirmed += 1
            return
        self.counters.cdr_disagreed += 1
        if self._disagreed is not None:
            self._disagreed(identity, disposition, outcome)




def _event(kind: str, listed: Message, *fields: tuple[str, str]) -> Message:
    """An event re-enacted from a channel of ``CoreShowChannels`` (``fields`` on top)."""
    return Message((("Event", kind), ("Channel", listed.get("Channel")),
                    ("Uniqueid", listed.get("Uniqueid")),
                    ("Linkedid", listed.get("Linkedid")),
                    ("CallerIDNum", listed.get("CallerIDNum")), *fields))


def _duration(text: str) -> int:
    """A listed channel's age: ``HH:MM:SS`` (hours may run past 99); 0 when unreadable."""
    parts = text.strip().split(":")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return 0
    hours, minutes, seconds = (int(part) for part in parts)
    return hours * 3600 + minutes * 60 + seconds


def _creation(listed: Message) -> tuple[int, int, int]:
    """Oldest first: the longest ``Duration``, then the Uniqueid's second and sequence
    (a call's first channel before the ones it made in the same second)."""
    found = _UNIQUEID.search(listed.get("Uniqueid"))
    second, sequence = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return -_duration(listed.get("Duration")), second, sequence


def _time_of(event: Message, arrived: datetime) -> datetime:
    stamp = event.get("Timestamp")
    if stamp:
        try:
            return datetime.fromtimestamp(float(stamp), UTC)
        except (ValueError, OverflowError, OSError):
            pass
    return arrived


def _digits_only(exten: str) -> str:
    """A dialled or called number from a dialplan extension (``s`` and patterns: '')."""
    text = exten.strip()
    return text if text and text.lstrip("+").isdigit() else ""


def _dialled(dial_string: str) -> str:
    """The number in a dial string: ``provider/6912345678``, ``sip:+3069...@host``."""
    tail = dial_string.rpartition("/")[2].removeprefix("sip:").partition("@")[0]
    return _digits_only(tail)


def _line(channel: str) -> str:
    """The trunk a channel came by: its name without the channel's own suffix."""
    return channel.rpartition("-")[0] or channel
