"""A box's TR-064 client with its certificate pinned on first use, the pin kept in the
database.

A Fritz!Box's TLS certificate is self-signed, so no CA can vouch for it: the one seen
when a list is first read in full is trusted and kept (``dpvoip.call_list_state``), and
from then on a box presenting another is refused before any credential is sent
(``Tr064Error`` "tls"), until the administrator sets ``tr064_certificate`` to the new
fingerprint (after a box reset, say) or clears the stored one. A fingerprint in the
configuration wins over the stored one. The pin is read before each pass, so two
instances, or a pin cleared by hand, agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from dpvoip.fritzbox.calllist import CallList


class PinnableClient(Protocol):
    """What ``Tr064Client`` offers a pin keeper."""

    @property
    def certificate(self) -> str | None: ...

    async def call_list(self, days: int | None = None, max_entries: int | None = None,
                        since: tuple[int, int] | None = None) -> CallList: ...


class PinStore(Protocol):
    async def certificate(self, box: str) -> str | None: ...

    async def pin_certificate(self, box: str, fingerprint: str) -> str: ...


class PinnedCallList:
    """The reconciler's client (``CallListClient``): a TR-064 client per pin."""

    def __init__(self, box: str, client_for: Callable[[str | None], PinnableClient],
                 pins: PinStore, configured: str = "", tls: bool = True) -> None:
        self._box = box
        self._client_for = client_for
        self._pins = pins
        self._configured = configured.replace(":", "").lower() or None
        self._tls = tls
        self._client: PinnableClient | None = None
        self._pin: str | None = None
        #: The certificate the box presented last (None before a TLS handshake).
        self.seen: str | None = None

    async def call_list(self, days: int | None = None, max_entries: int | None = None,
                        since: tuple[int, int] | None = None) -> CallList:
        pin = self._configured
        if pin is None and self._tls:
            pin = await self._pins.certificate(self._box)
        if self._client is None or pin != self._pin:
            self._client, self._pin = self._client_for(pin), pin
        client = self._client
        try:
            listed = await client.call_list(days, max_entries, since)
        finally:
            self.seen = client.certificate or self.seen
        if self._tls and pin is None and client.certificate:
            # The first list read in full: its certificate is the box's from now on.
            await self._pins.pin_certificate(self._box, client.certificate)
            self._client = None  # the next pass is checked against the pin
        return listed
