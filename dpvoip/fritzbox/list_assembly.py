"""A box's call list over TR-064, wired: imported only for a box with a TR-064 user, so
that the XML parser, the TR-064 client and the reconciler are loaded only then."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from dpvoip.calls.ingest import Ingest
from dpvoip.config import FritzBoxSettings
from dpvoip.core.texts import Texts
from dpvoip.crm.schema import CrmCapabilities
from dpvoip.fritzbox.box import FritzBox
from dpvoip.fritzbox.pinned import PinnedCallList
from dpvoip.fritzbox.reconciler import Reconciler, ReconcileService
from dpvoip.protocols.tr064 import Tr064Client
from dpvoip.store.call_list import CallListStatements
from dpvoip.store.database import Store


def call_list(settings: FritzBoxSettings, box: FritzBox, store: Store, ingest: Ingest,
              texts: Texts, reactor: Any, replayed: Callable[[], Deferred[None]],
              crm_schema: str, capabilities: Callable[[], CrmCapabilities]
              ) -> ReconcileService:
    """A box's TR-064 call list, read after the spool's replay (a call the spool still
    holds is not recovered twice), after each reconnect and periodically."""
    statements = CallListStatements(store, crm_schema, capabilities)

    def client_for(pin: str | None) -> Tr064Client:
        return Tr064Client(reactor, settings.host, settings.tr064_port_used,
                           settings.tr064_user, settings.tr064_password, settings.tr064_tls,
                           pin)

    pinned = PinnedCallList(settings.name, client_for, statements,
                            settings.tr064_certificate, settings.tr064_tls)
    reading = ReconcileService(
        Reconciler(settings, box.origin, pinned, statements, ingest, reactor, texts),
        reactor, replayed)
    box.watch_connection(lambda up: reading.box_connected() if up
                         else reading.box_disconnected())
    box.status.call_list = reading.status
    return reading
