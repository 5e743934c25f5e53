"""A Fritz!Box's own call list (TR-064 ``GetCallList``), as plain data: the records
reconciliation (``dpvoip.fritzbox.reconcile``) reads.

They are the list parser's own (``dpvoip.fritzbox.calllist``), named here so that the
reconciler and its tests depend on the data, not on where the wire's parser keeps it; the
real client's ``CallList`` is this one.
"""

from __future__ import annotations

from dpvoip.fritzbox.calllist import (
    ACTIVE_INCOMING,
    ACTIVE_OUTGOING,
    ACTIVE_TYPES,
    BLOCKED,
    INCOMING,
    MISSED,
    OUTGOING,
    CallList,
    ListedCall,
)

__all__ = [
    "ACTIVE_INCOMING",
    "ACTIVE_OUTGOING",
    "ACTIVE_TYPES",
    "BLOCKED",
    "INCOMING",
    "MISSED",
    "OUTGOING",
    "CallList",
    "ListedCall",
]
