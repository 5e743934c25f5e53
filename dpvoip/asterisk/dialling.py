"""Asterisk as click-to-call's dialler (``providers.Dialler``): ``Originate`` through the
PBX's manager connection, the user's own extension first, then the number.

``click_to_call.callbacks`` has already checked everything that is not the PBX's: the
connection is the user's own and active, the number passed the dialling policy, the user
is within the shared per-user limit. What only a PBX minds is checked here, before
anything is sent (``refusal``): the connection's number must be an extension, and the
number is written the way the office's phones dial it, because that is what the PBX's
outbound routes match (``dial_string``, pure). The AMI client's failures become
``ProviderError`` subclasses, whose status and message are the user's answer; none of
them carries the manager secret (the AMI client's errors never do).
"""

from __future__ import annotations

import re
from typing import Protocol

import phonenumbers
from twisted.internet.defer import Deferred

from dpvoip.providers.interface import DialRequest, ProviderError

#: A phone's extension as ``voip_connection.number`` holds it (what ``Originate`` rings).
EXTENSION = re.compile(r"[0-9]{2,8}")

#: ``originate_number``: as the office's phones dial (national in the PBX's country, the
#: country's international prefix elsewhere), or E.164 with its ``+``.
NUMBER_FORMS = ("local", "e164")


def dial_string(number: str, country: str, form: str = "local") -> str | None:
    """The digits the PBX's outbound context is given for ``number`` (E.164, as the
    dialling policy gives it); None when it is not a phone number.

    ``local``: ``+302101234567`` is ``2101234567`` for a PBX in GR, ``00302101234567``
    for one in DE (phonenumbers' out-of-country format for the PBX's country, separators
    removed): what a person at one of its phones would dial, so the routes an office
    already has match it. ``e164``: the number as it is, for routes that match ``+``."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if form == "e164":
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    written = phonenumbers.format_out_of_country_calling_number(parsed, country)
    digits = re.sub(r"[^0-9+]", "", written)
    return digits if re.fullmatch(r"\+?[0-9]{3,20}", digits) else None


class PbxRefused(ProviderError):
    """The PBX refused the call, or what was asked cannot be sent to it."""

    status = 502


class PbxUnavailable(ProviderError):
    """The PBX is not connected (or did not answer): nothing was dialled; try again."""

    status = 503


class Originating(Protocol):
    """``asterisk.service.Dialler``: the ``Originate`` itself."""

    def dial(self, extension: str, number: str, caller_id: str = "") -> Deferred[str]: ...


class AsteriskDialler:
    """Click-to-call on one PBX: ``Originate`` rings ``<technology>/<extension>`` (the
    connection's number), and once it answers the PBX dials the number in the outbound
    context. ``dial`` returns once the PBX has queued the call; whether the user's phone
    answered is counted by the PBX's status (``originate_unanswered``)."""

    def __init__(self, name: str, originating: Originating, country: str,
                 form: str = "local") -> None:
        self._name = name
        self._originating = originating
        self._country = country
        self._form = form

    def refusal(self, call: DialRequest) -> str | None:
        if call.predicted:
            return (f"the PBX {self._name} rings your phone first; calling the number "
                    "first (predicted) is not offered")
        if not EXTENSION.fullmatch(call.ring_first):
            return (f"your connection's number {call.line[:30]!r} is not an extension of "
                    f"the PBX {self._name} (2-8 digits)")
        if dial_string(call.number, self._country, self._form) is None:
            return f"{call.number[:30]!r} cannot be dialled through the PBX {self._name}"
        return None

    async def dial(self, call: DialRequest) -> None:
        from twisted.internet.error import ConnectionLost

        from dpvoip.asterisk.service import OriginateRefused
        from dpvoip.protocols.ami import ActionTimedOut, NotConnected

        number = dial_string(call.number, self._country, self._form)
        if self.refusal(call) is not None or number is None:
            raise PbxRefused(self.refusal(call) or "not a number")
        try:
            await self._originating.dial(call.ring_first, number, "Click-to-call")
        except NotConnected:
            raise PbxUnavailable(f"the PBX {self._name} is not connected now; nothing was "
                                 "dialled, try again shortly") from None
        except (ActionTimedOut, ConnectionLost):
            raise PbxUnavailable(f"the PBX {self._name} did not answer the call request in "
                                 "time; if your phone does not ring, try again shortly"
                                 ) from None
        except OriginateRefused as refused:
            raise PbxRefused(str(refused)) from None
        except ValueError as bad:
            raise PbxRefused(f"the PBX {self._name} cannot be asked that: {bad}") from None
