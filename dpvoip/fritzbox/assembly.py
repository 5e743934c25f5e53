"""The Fritz!Boxes of the configuration, wired for the composition root.

``service.build`` imports this module only when the configuration names a box, and this
one imports the call list's modules (TR-064, its XML, the reconciler) only for a box with
a TR-064 user: an office without a box, or whose box is read on its CallMonitor port
alone, keeps none of that code in memory. Each box is read (CallMonitor and call list)
only while this instance leads it: holds its advisory lock on the lease connection (one
reader per box among instances).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred

from dpvoip.calls.ingest import Ingest, Origin
from dpvoip.config import FritzBoxSettings
from dpvoip.core.texts import Texts
from dpvoip.crm.schema import CrmCapabilities
from dpvoip.fritzbox.box import FritzBox, origin_of
from dpvoip.fritzbox.service import (
    BoxLeadership,
    BoxStatusReporter,
    FritzBoxService,
    LedBox,
)
from dpvoip.reconnecting import retry_policy
from dpvoip.spool.durable import DurableIngest
from dpvoip.store.database import Store
from dpvoip.store.leases import LeaseConnection


def box_origins(boxes: Sequence[FritzBoxSettings], own: frozenset[str]) -> dict[str, Origin]:
    """Where the spool's happenings of each box come from, by the box's name."""
    return {settings.name: origin_of(settings, own) for settings in boxes}


@dataclass(frozen=True)
class Boxes:
    """The wired boxes, and who leads them (None without a box)."""

    boxes: list[FritzBox]
    leadership: BoxLeadership | None


@dataclass(frozen=True)
class BoxNeeds:
    """What the boxes are handed by the composition root, all made before them."""

    reactor: Any
    recorder: DurableIngest
    store: Store
    ingest: Ingest
    texts: Texts
    own: frozenset[str]
    crm_schema: str
    capabilities: Callable[[], CrmCapabilities]
    replayed: Callable[[], Deferred[None]]  # the spool's first replay is through
    prepared: Callable[[], Deferred[None]]  # dpvoip's schema is prepared
    dsn: str
    instance: str  # this instance's name on the lease connection
    connect_timeout: float


def wire_boxes(configured: Sequence[FritzBoxSettings], needs: BoxNeeds,
               top: IServiceCollection) -> Boxes:
    """A box, its CallMonitor client and (with a TR-064 user) its call list for each
    configured box; the leadership over them and the status reporter, started in
    ``top`` in that order."""
    boxes: list[FritzBox] = []
    led: list[LedBox] = []
    for settings in configured:
        box = FritzBox(settings, needs.recorder, needs.reactor, needs.own)
        boxes.append(box)
        monitor = FritzBoxService(
            box, needs.reactor, needs.replayed,
            retry=retry_policy(settings.reconnect_initial_seconds,
                               settings.reconnect_max_seconds),
        )
        reading = None
        if settings.tr064:  # its call list: what the port missed, what the box blocked
            from dpvoip.fritzbox.list_assembly import call_list

            reading = call_list(settings, box, needs.store, needs.ingest, needs.texts,
                                needs.reactor, needs.replayed, needs.crm_schema,
                                needs.capabilities)
        led.append(LedBox(box, monitor, needs.reactor, reading))
    if not boxes:
        return Boxes(boxes, None)
    lease = LeaseConnection(needs.reactor, needs.dsn, needs.instance, needs.connect_timeout)
    leadership = BoxLeadership(led, lease, needs.reactor, needs.prepared)
    leadership.setServiceParent(top)
    reporter = BoxStatusReporter(boxes, needs.store, needs.reactor, leads=leadership.leads)
    reporter.setServiceParent(top)

    def report_now(_up: bool) -> None:  # a box's connection change is a live event now
        reporter.report()

    for box in boxes:
        box.watch_connection(report_now)
    return Boxes(boxes, leadership)
