"""Zadarma as click-to-call's dialler and recording source (``providers.Dialler``,
``providers.RecordingLinks``) over its REST API (``ZadarmaCalls``).

What only Zadarma minds is checked here, before it is asked: the extension or SIP number
whose caller id to use, and the user's own line in a form Zadarma can ring first (the
patterns of Zadarma's OpenAPI file).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Protocol

from dpvoip.providers.interface import DialRequest, RecordingGone
from dpvoip.zadarma.api import CallbackAccepted, ZadarmaRefused

_FROM = re.compile(r"^(\+?[0-9]{7,15}|[0-9]{3,5})$")
_SIP = re.compile(r"^([0-9]{5}|[0-9]{3})$")


class ZadarmaCalls(Protocol):
    """Zadarma's API as click-to-call uses it. Failures are ``zadarma.api.ZadarmaApiError``
    subclasses, whose ``status`` (and ``retry_after``) the user is answered with."""

    def callback(self, from_number: str, to_number: str, sip: str = "",
                 predicted: bool = False) -> Awaitable[CallbackAccepted]:
        """Ring ``from_number`` first, then ``to_number``."""
        ...

    def recording_link(self, call_id: str = "", pbx_call_id: str = "",
                       lifetime: int = 1800) -> Awaitable[str]:
        """A temporary link to a recording; ``ZadarmaRefused`` (its message saying "not
        found") when Zadarma no longer has it."""
        ...


class ZadarmaDialler:
    """A callback: Zadarma rings the user's line, then the number."""

    def __init__(self, api: ZadarmaCalls) -> None:
        self._api = api

    def refusal(self, call: DialRequest) -> str | None:
        if call.sip and not _SIP.match(call.sip):
            return "sip must be a 3- or 5-digit extension or SIP number"
        if not _FROM.match(call.ring_first):
            return (f"your connection's number {call.line[:30]!r} is not a phone, "
                    "SIP number or extension Zadarma can ring")
        return None

    async def dial(self, call: DialRequest) -> None:
        await self._api.callback(call.ring_first, call.number, call.sip, call.predicted)


class ZadarmaRecordings:
    """A recording Zadarma keeps under its ``call_id_with_rec``: a fresh link to it."""

    def __init__(self, api: ZadarmaCalls) -> None:
        self._api = api

    async def recording_link(self, recording: str) -> str:
        try:
            return await self._api.recording_link(call_id=recording)
        except ZadarmaRefused as refused:
            if "not found" in refused.message.lower():
                raise RecordingGone("Zadarma no longer has this call's recording") from None
            raise
