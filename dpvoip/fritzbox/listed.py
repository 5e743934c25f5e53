"""A Fritz!Box's own call list (TR-064 ``GetCallList``), as plain data.

The box keeps every call it handled, also those that never reached the CallMonitor port
while dpvoip was away; reconciliation (``dpvoip.fritzbox.reconcile``) reads these records.
The list's parser (``dpvoip.fritzbox.calllist``) produces them; they are declared here so
that the reconciler and its tests depend on the data, not on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

#: The entry types of fritzbox.md section 7.
INCOMING, MISSED, OUTGOING, ACTIVE_INCOMING, BLOCKED, ACTIVE_OUTGOING = 1, 2, 3, 9, 10, 11
#: Calls still in progress: their entry changes when they end.
ACTIVE_TYPES = frozenset({ACTIVE_INCOMING, ACTIVE_OUTGOING})


@dataclass(frozen=True)
class ListedCall:
    id: int
    type: int
    remote: str  # Called for types 3/11, else Caller; '' withheld
    own_number: str
    name: str
    device: str
    port: str  # "40".."49" or "6": the answering machine
    date: datetime  # naive box-local wall time, minute resolution
    duration_seconds: int

    @property
    def direction(self) -> str:
        return "outgoing" if self.type in (OUTGOING, ACTIVE_OUTGOING) else "incoming"

    @property
    def active(self) -> bool:
        """The call is still going on: its entry is not final yet."""
        return self.type in ACTIVE_TYPES


@dataclass(frozen=True)
class CallList:
    timestamp: int
    calls: tuple[ListedCall, ...]  # newest first
