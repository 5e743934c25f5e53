"""The daemon's counters in Prometheus' text format, read at the moment of each scrape.

Nothing here counts: the counters live where the events happen (the spool, the durable
entry point, the ingest, the webhook, the boxes). A collector reads them when asked, so
there is one source of truth and no second set of numbers to keep in step. The registry
is the daemon's own, never prometheus_client's global one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class Counted(Protocol):
    """An object that keeps its counters in a dataclass named ``counters``."""

    @property
    def counters(self) -> Any: ...


class Spool(Protocol):
    def state(self) -> Any: ...  # SpoolState


class Durable(Counted, Protocol):
    @property
    def spooling(self) -> bool: ...


class Box(Protocol):
    @property
    def status(self) -> Any: ...  # BoxStatus


class Directory(Protocol):
    @property
    def state(self) -> Any: ...  # IndexState


class Leases(Protocol):
    """Who reads each box (``fritzbox.service.BoxLeadership.describe``)."""

    def describe(self, box: str) -> dict[str, Any]: ...


@dataclass(frozen=True, kw_only=True)
class Sources:
    """The objects each figure is read from, at each scrape (so the values are current).
    The providers' own figures (Zadarma's webhooks among them) are their collector's
    (``providers.assembly.ProvidersCollector``); ``webhook`` is for a Zadarma webhook
    wired without a provider."""

    spool: Spool
    durable: Durable
    ingest: Counted
    webhook: Counted | None = None
    boxes: Sequence[Box]
    directory: Directory
    leases: Leases | None = None  # None: no box (nothing to lead)


class DaemonCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self._sources
        spool = s.spool.state()
        yield _gauge("dpvoip_spool_pending_events", "Events spooled, not yet in PostgreSQL.",
                     spool.pending)
        yield _gauge("dpvoip_spool_bytes", "Bytes the spool holds on disk.", spool.bytes)
        yield _gauge("dpvoip_spool_limit_bytes", "The spool's bound ([spool] max_mb).",
                     spool.limit)
        yield _gauge("dpvoip_spool_alarm",
                     "1 when the spool is nearly full or its disk refuses writes.",
                     int(spool.alarm))
        yield _gauge("dpvoip_spool_disk_failing",
                     "1 while the spool's disk refuses writes (full, quota, I/O error).",
                     int(bool(spool.disk_error)))
        yield CounterMetricFamily("dpvoip_spool_disk_errors",
                                  "Spool writes the disk refused (since start).",
                                  value=spool.disk_errors)
        yield _gauge("dpvoip_spool_mark_behind",
                     "1 while the replay mark on disk is behind the replay (disk full).",
                     int(spool.mark_behind))
        yield _gauge("dpvoip_spooling", "1 while the spool holds events not yet replayed "
                     "(new events of their calls and numbers wait behind them; path=ahead "
                     "counts those that went past a replay).", int(s.durable.spooling))
        yield _counters("dpvoip_events", "Events by the path they took to the database.",
                        "path", asdict(s.durable.counters))
        yield _counters("dpvoip_ingest", "What the ingest did.", "what", asdict(s.ingest.counters))
        if s.webhook is not None:
            yield from webhook_families(s.webhook.counters)
        connected = GaugeMetricFamily("dpvoip_fritzbox_connected",
                                      "1 while the box's CallMonitor is connected.",
                                      labels=["box"])
        lines = CounterMetricFamily("dpvoip_fritzbox_lines", "CallMonitor lines received.",
                                    labels=["box", "kind"])
        reconnects = CounterMetricFamily("dpvoip_fritzbox_reconnects",
                                         "Connections lost and made again.", labels=["box"])
        troubles = CounterMetricFamily(
            "dpvoip_fritzbox_troubles",
            "What a box did wrong and how it was handled: calls closed beyond the bound of "
            "open calls, box dates replaced by the arrival time, happenings not recorded.",
            labels=["box", "what"])
        for box in (b.status for b in s.boxes):
            connected.add_metric([box.name], int(box.connected))
            lines.add_metric([box.name, "good"], box.lines - box.bad_lines)
            lines.add_metric([box.name, "bad"], box.bad_lines)
            reconnects.add_metric([box.name], box.reconnects)
            for what, count in (("calls_evicted", box.calls_evicted),
                                ("dates_replaced", box.dates_replaced),
                                ("not_recorded", box.not_recorded)):
                troubles.add_metric([box.name, what], count)
        yield connected
        yield lines
        yield reconnects
        yield troubles
        yield from _call_lists(s.boxes)
        if s.leases is not None:
            yield from _leads(s.leases, s.boxes)
        yield _gauge("dpvoip_directory_entries", "Numbers in the phone directory.",
                     s.directory.state.entries)


def webhook_families(counters: Any, provider: str = "") -> Iterator[Metric]:
    """A Zadarma webhook's counters; with ``provider``, its series carry that label."""
    webhook = asdict(counters)
    refused: Mapping[int, int] = webhook.pop("refused")
    named = {"provider": provider} if provider else {}
    yield _counters("dpvoip_zadarma_webhooks", "Zadarma webhook requests.", "outcome",
                    webhook, named)
    yield _counters("dpvoip_zadarma_webhooks_refused", "Webhooks refused, by status.",
                    "status", {str(k): v for k, v in refused.items()}, named)


def _call_lists(boxes: Sequence[Box]) -> Iterator[Metric]:
    """Each box's TR-064 call list (boxes without TR-064 have no series)."""
    failing = GaugeMetricFamily(
        "dpvoip_call_list_failing",
        "1 while the box's call list cannot be read (a warning: the CallMonitor goes on), "
        "by the kind of failure.", labels=["box", "kind"])
    passes = CounterMetricFamily("dpvoip_call_list_passes", "Reads of a box's call list.",
                                 labels=["box", "result"])
    failures = CounterMetricFamily("dpvoip_call_list_failures",
                                   "Failed reads of a box's call list, by kind.",
                                   labels=["box", "kind"])
    calls = CounterMetricFamily(
        "dpvoip_call_list_calls",
        "What the call list did to calls: recovered (inserted), linked to a call the "
        "monitor recorded, finished, corrected (blocked <-> missed), skipped.",
        labels=["box", "what"])
    for box in (b.status for b in boxes):
        if box.call_list is None:
            continue
        report = box.call_list.as_json()
        failing.add_metric([box.name, report["kind"] or ""],
                           int(report["state"] == "failing"))
        passes.add_metric([box.name, "ok"], report["runs"])
        passes.add_metric([box.name, "failed"], report["failures"])
        for kind, count in report["failures_by_kind"].items():
            failures.add_metric([box.name, kind], count)
        for what in ("inserted", "linked", "finished", "corrected", "skipped"):
            calls.add_metric([box.name, what], report[what])
    yield failing
    yield passes
    yield failures
    yield calls


def _leads(leases: Leases, boxes: Sequence[Box]) -> Iterator[Metric]:
    """Which box this instance reads, and how its lead changed hands."""
    leader = GaugeMetricFamily(
        "dpvoip_box_leader", "1 while this instance leads the box (reads it); 0 while "
        "another does or its lead is not sure.", labels=["box"])
    takeovers = CounterMetricFamily(
        "dpvoip_box_takeovers", "Times this instance took the box over from another "
        "instance.", labels=["box"])
    losses = CounterMetricFamily(
        "dpvoip_box_lead_losses", "Times this instance stopped reading a box it led (its "
        "lease connection lost, a heartbeat late, another instance leading).",
        labels=["box"])
    for name in (b.status.name for b in boxes):
        lead = leases.describe(name)
        leader.add_metric([name], int(lead["leader"]))
        takeovers.add_metric([name], lead["takeovers"])
        losses.add_metric([name], lead["losses"])
    yield leader
    yield takeovers
    yield losses


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counters(name: str, documentation: str, label: str, values: Mapping[str, int],
              fixed: Mapping[str, str] | None = None) -> CounterMetricFamily:
    fixed = fixed or {}
    family = CounterMetricFamily(name, documentation, labels=[label, *fixed])
    for key, value in values.items():
        family.add_metric([key, *fixed.values()], value)
    return family


def registry(sources: Sources) -> CollectorRegistry:
    own = CollectorRegistry(auto_describe=False)
    own.register(DaemonCollector(sources))
    return own


def exposition(own: CollectorRegistry) -> bytes:
    return generate_latest(own)


class DaemonMetrics:
    """The ``/metrics`` page: the daemon's own registry, rendered at each scrape."""

    def __init__(self, sources: Sources, *more: Collector) -> None:
        self._registry = registry(sources)
        for collector in more:  # a part's own figures (the old monitor's endpoints)
            self._registry.register(collector)

    def exposition(self) -> bytes:
        return exposition(self._registry)
