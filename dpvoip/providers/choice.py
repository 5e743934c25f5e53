"""Which provider dials a click-to-call, and which hand out recordings. Pure.

As in the CRM: a ``voip_connection`` row's ``provider`` column names the provider that
places its calls (the CRM writes its provider's ``PROVIDER``, e.g. ``Zadarma``). It is
compared with dpvoip's provider names without regard to case or surrounding spaces, so
the ``[zadarma]`` section's provider, named ``zadarma``, serves the CRM's ``Zadarma``
connections. A connection naming a provider dpvoip does not have is refused, never
dialled through another one: the company pays for the calls of the provider it chose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dpvoip.providers.interface import Dialler, RecordingLinks


@dataclass(frozen=True)
class Chosen:
    """The provider a connection dials through."""

    name: str
    dialler: Dialler


class ProviderChoice:
    """The diallers by provider name, and the recording links in configuration order."""

    def __init__(self, diallers: Iterable[tuple[str, Dialler]] = (),
                 recordings: Iterable[RecordingLinks] = ()) -> None:
        self._diallers = {name.lower(): (name, dialler) for name, dialler in diallers}
        self.recordings: Sequence[RecordingLinks] = tuple(recordings)

    @property
    def names(self) -> list[str]:
        """The providers that dial, by name."""
        return sorted(name for name, _ in self._diallers.values())

    def for_connection(self, provider: str) -> Chosen | None:
        """The provider a connection whose ``provider`` column says ``provider`` dials
        through; None when dpvoip has no such provider (or it does not dial)."""
        found = self._diallers.get(provider.strip().lower())
        return Chosen(*found) if found is not None else None

    def refusal(self, connection_id: int, provider: str) -> str:
        """What the user is told when ``for_connection`` found nothing."""
        shown = provider.strip()[:40] or "(none)"
        configured = ", ".join(self.names) or "none"
        return (f"your connection {connection_id} calls through the provider {shown!r}, "
                f"which dpvoip is not configured for (it has: {configured}); ask your "
                "administrator")
