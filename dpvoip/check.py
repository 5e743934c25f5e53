"""``dpvoip check``: what is there, said by looking only.

It never creates anything: no embedded cluster (no ``initdb``), no database, no schema, no
migration, no folder. It starts no server either: a check that started the embedded
PostgreSQL and stopped it again on its way out could stop the one a daemon had just
started. Everything it reads comes from one read-only transaction.

It reads the configuration the daemon reads (``tap.load_or_exit``: the file, then the
environment) and finds the state folder as the daemon does (``Config.state_path`` from
the working directory). What the daemon does (each box's address and state, the
directory it built) is read from what the daemon writes in its schema, not from this
process's configuration, which may differ from the daemon's: an administrator's shell
lacks the service's environment. Reading the database instead of asking ``/readyz``
works wherever the database can be reached, needs no web address (which may be a unix
socket, ``tcp:0`` or firewalled), and sees every instance's boxes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpvoip.config import Config, FritzBoxSettings

if TYPE_CHECKING:  # what the check imports when it runs: a quick `dpvoip --help`
    from dpvoip.store.boxes import BoxReport
    from dpvoip.store.inspection import DaemonBox, DirectoryBuilt, Observed
    from dpvoip.store.leases import Holders

Say = Callable[[str], None]

#: Said when there is no embedded cluster yet.
NO_EMBEDDED_YET = "no embedded database yet: start dpvoip once with `make start`"


def run_check(config: Config, source: str | None) -> int:
    """The command: ``check`` on the global reactor, printing; its exit status."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    outcome = [1]

    async def main(reactor: Any) -> None:
        outcome[0] = await check(reactor, config, source, Path.cwd(), print)

    with contextlib.suppress(SystemExit):  # react() always exits; the code is ours
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    return outcome[0]


async def check(reactor: Any, config: Config, source: str | None, base: Path,
                say: Say) -> int:
    """Say what is there; 0 when dpvoip can run as configured, 1 when something stops it
    (the database refuses, privileges or CRM tables missing)."""
    from dpvoip.store.dsn import ConnectProblem, connection_dsn, reach
    from dpvoip.store.embedded import EmbeddedPostgres

    state = config.state_path(base).absolute()
    say(f"config: valid ({source or 'defaults'}); state folder {state}"
        + ("" if state.is_dir() else " (not created yet)"))
    cluster = None
    if config.embedded:
        cluster = EmbeddedPostgres(state / "pg")
        if not cluster.initialised():
            say(f"database: {NO_EMBEDDED_YET} (it creates it in {cluster.folder})")
            return 0
        dsn = connection_dsn(cluster.dsn(), config.database)
    else:
        dsn = connection_dsn(config.database.url.reveal(), config.database)
    reached = await reach(reactor, dsn, config.database.connect_timeout)
    if isinstance(reached, ConnectProblem):
        if cluster is not None and reached.kind == "not reachable":
            say(f"database: the embedded PostgreSQL in {cluster.folder} is not running, so "
                "dpvoip is not running: start it with `make start` (or `dpvoip run`)")
            return 0
        say(connect_line(reached))
        return 1
    reached.close()
    return await _look(reactor, config, dsn, state, say)


def connect_line(problem: Any) -> str:
    """The database line of a failed connection (a ``ConnectProblem``)."""
    if problem.kind == "not reachable":
        return (f"database: NOT reachable ({problem.where}): {problem.detail};"
                f" {problem.advice}")
    return f"database: cannot connect: {problem.line()}"


async def _look(reactor: Any, config: Config, dsn: str, state: Path, say: Say) -> int:
    from dpvoip.store.database import Store
    from dpvoip.store.dsn import describe
    from dpvoip.store.inspection import observe
    from dpvoip.store.pool import HealingPool

    pool = HealingPool(reactor, dsn, 1, config.database.connect_timeout)
    await pool.start()
    try:
        store = Store(pool, reactor)
        attached = not config.standalone
        seen = await observe(store, config.database.crm_schema, attached)
        mode = "standalone" if config.standalone else "attached"
        where = "embedded PostgreSQL" if config.embedded else "PostgreSQL"
        lacking = seen.lacking
        rights = ("" if lacking is None else "; privileges: MISSING (below)" if lacking
                  else "; privileges: all dpvoip needs")
        say(f"database: reachable, {where} at {describe(dsn)}; mode: {mode}{rights}")
        if lacking:
            say(f"privileges MISSING: {lacking.line()}")
        blocking = schema_lines(seen, config.standalone, say) or bool(lacking)
        say(directory_line(seen.directory))
        for line in box_lines(config.fritzbox, seen.boxes, seen.leases):
            say(line)
        if seen.leases is not None and seen.leases.instances:
            say(instances_line(seen.leases, [box.name for box in config.fritzbox]))
        # The providers: from their settings; a PBX's is one login, off the reactor.
        from twisted.internet.threads import deferToThreadPool

        from dpvoip.providers.assembly import check_lines as provider_lines

        for line in await deferToThreadPool(reactor, reactor.getThreadPool(),
                                            provider_lines, config.all_providers):
            say(line)
        if seen.schema_version >= 3:  # the old monitor's endpoints
            from dpvoip.legacy_monitor.service import LEGACY_STATE, check_lines

            for line in await check_lines(config.legacy_monitor.token.reveal(),
                                          state / LEGACY_STATE, store):
                say(line)
        return 1 if blocking else 0
    finally:
        pool.close()


def schema_lines(seen: Observed, standalone: bool, say: Say) -> bool:
    """dpvoip's schema and the CRM's tables; True when what is missing stops dpvoip. A
    table that exists but that this user cannot see is a privilege, said above."""
    from dpvoip.crm.schema import capabilities, missing
    from dpvoip.store.migrations import MIGRATIONS

    latest = MIGRATIONS[-1].version
    version = seen.schema_version
    if version == 0:
        state = "not created yet: the daemon creates it at start, or `dpvoip migrate`"
    elif version == latest:
        state = "current"
    else:
        state = f"needs `dpvoip migrate` (latest {latest})"
    say(f"dpvoip schema: version {version} ({state})")
    present = seen.present
    hidden = seen.existing - set(present)
    problems = [p for p in missing(present)
                if not (p.startswith("table ") and p.removeprefix("table ") in hidden)]
    listed = ", ".join(sorted(present)) or "none"
    say(f"CRM tables present: {len(present)} of 12 ({listed})"
        + (f"; not readable by this user: {', '.join(sorted(hidden))}" if hidden else ""))
    if problems:
        label = "will be created at start" if standalone and not seen.existing else "MISSING"
        say(f"CRM {label}: {'; '.join(problems)}")
        return not (standalone and not seen.existing)
    if not hidden:
        say(f"CRM version: {capabilities(present).version}")
    return False


def directory_line(directory: DirectoryBuilt | None) -> str:
    """The phone directory as the daemon built it (the same count as its /readyz)."""
    from dpvoip.core.matching import SOURCES

    if directory is None:
        return "directory: not built yet (the daemon builds it once its schema is ready)"
    total = sum(directory.sizes.values())
    shown = ", ".join(f"{k} {directory.sizes[k]}" for k in sorted(directory.sizes)) or "none"
    marks = directory.watermarks
    if any(source.name not in marks for source in SOURCES):
        return (f"directory: not built yet, {total} numbers indexed ({shown}); the daemon"
                " builds it once its schema is ready")
    regions = ", ".join(sorted({region for region, _ in marks.values()}))
    refreshed = max(moment for _, moment in marks.values())
    return (f"directory: {total} numbers indexed ({shown}); built for region {regions},"
            f" refreshed up to {refreshed:%Y-%m-%d %H:%M:%S %Z}")


def box_lines(configured: Sequence[FritzBoxSettings],
              reported: Mapping[str, DaemonBox], leases: Holders | None = None
              ) -> list[str]:
    """Each box: the address and state the daemon reported (what it really does), and
    where this configuration differs from it; a configured box with no report yet; with
    ``leases``, which instance reads it now (holds its lock)."""
    lines: list[str] = []
    names = {box.name for box in configured}
    for box in configured:
        seen = reported.get(box.name)
        if seen is None:
            lines.append(f"Fritz!Box {box.name} ({box.host}:{box.port}): "
                         + box_state(None) + led_by(leases, box.name))
        else:
            line = f"Fritz!Box {box.name} ({seen.host}:{seen.port}): " + box_state(seen.report)
            if (seen.host, seen.port) != (box.host, box.port):
                line += (f"; this configuration says {box.host}:{box.port} (the daemon runs"
                         " with another configuration or environment than this check)")
            lines.append(line + led_by(leases, box.name))
        if box.tr064:
            report = seen.report if seen else None
            lines.append(f"  call list (TR-064 {box.tr064_user}@{box.host}:"
                         f"{box.tr064_port_used}, {'TLS' if box.tr064_tls else 'plain HTTP'}):"
                         f" {call_list_line(box, report)}")
    for name in sorted(set(reported) - names):
        seen = reported[name]
        lines.append(f"Fritz!Box {name} ({seen.host}:{seen.port}): {box_state(seen.report)};"
                     " reported by a daemon, not in this configuration")
    if not lines:
        lines.append("Fritz!Boxes: none configured")
    return lines


def led_by(leases: Holders | None, box: str) -> str:
    """``; led by <instance>``: the instance holding the box's lock now."""
    from dpvoip.store.inspection import leader_of

    if leases is None:
        return ""
    leader = leader_of(leases, box)
    return (f"; led by {leader}" if leader
            else "; led by no instance (no dpvoip reads it now)")


def instances_line(leases: Holders, boxes: Sequence[str]) -> str:
    """Every dpvoip instance attached to this database (its lease session), and the
    boxes each leads; the others are standbys."""
    from dpvoip.store.inspection import leader_of

    shown = []
    for instance in leases.instances:
        led = [box for box in boxes if leader_of(leases, box) == instance]
        shown.append(f"{instance} (leads {', '.join(led)})" if led
                     else f"{instance} (standby)")
    return "instances: " + "; ".join(shown)


def box_state(report: BoxReport | None) -> str:
    if report is None:
        return "no state reported yet (is the daemon running?)"
    since, last_line, age = report.since, report.last_line_at, report.age_seconds
    when = since.strftime("%Y-%m-%d %H:%M:%S %Z") if since else "never"
    state = f"connected since {when}" if report.connected else f"NOT connected (since {when})"
    last = last_line.strftime("%Y-%m-%d %H:%M:%S %Z") if last_line else "none"
    stale = f"; last report {age:.0f}s ago: daemon not running?" if age > 30 else ""
    return (f"{state}, last line {last}, {report.reconnects} reconnects, "
            f"{report.bad_lines} bad lines{stale}")


def call_list_line(box: Any, report: BoxReport | None) -> str:
    """The box's call list as the daemon last reported it, and its pinned certificate."""
    listing = report.call_list if report else None
    if not listing:
        state = "not read yet (is the daemon running?)"
    elif listing.get("state") == "failing":
        state = f"FAILING ({listing.get('kind')}): {listing.get('advice')}"
    elif listing.get("state") == "ok":
        state = (f"read, last at {listing.get('last_success')}; recovered"
                 f" {listing.get('inserted')}, corrected {listing.get('corrected')}")
    else:
        state = "not read yet"
    if not box.tr064_tls:
        return state
    configured = box.tr064_certificate.replace(":", "").lower()
    pinned = configured or (report.pinned if report else None)
    seen = listing.get("certificate") if listing else None
    where = "configured" if configured else "pinned on first use"
    certificate = (f"certificate {where}: sha256 {pinned}" if pinned
                   else "no certificate pinned yet")
    if seen and pinned and seen != pinned:
        certificate += f"; the box now shows {seen}: NOT the pinned one"
    return f"{state}; {certificate}"
