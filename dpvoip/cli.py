"""The ``dpvoip`` command: run the daemon, migrate, check, and small admin tasks."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpvoip import __version__, asterisk_sim
from dpvoip.check import call_list_line as call_list_line  # importable from here too
from dpvoip.config import Config, describe
from dpvoip.tap import load_or_exit


def _config(args: argparse.Namespace) -> Config:
    """The config, or exit 2 naming the bad setting: also a database URL libpq cannot
    read, said without its password (libpq's own message quotes the URL)."""
    config = load_or_exit(args.config, os.environ)
    if config.database.url:
        from dpvoip.store.dsn import problem

        found = problem(config.database.url.reveal())
        if found is not None:
            print(f"dpvoip: configuration error: [database] url (DATABASE_URL) cannot be "
                  f"read: {found}", file=sys.stderr)
            raise SystemExit(2)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    """Start the daemon in the foreground through twistd, with dpvoip's own log format."""
    _config(args)  # fail fast, before twistd prints anything
    if args.config:
        os.environ["DPVOIP_CONFIG"] = str(Path(args.config).absolute())
    from twisted.application import app
    from twisted.scripts.twistd import runApp

    from dpvoip.internals import twistd_options
    from twisted.plugins.dpvoip_plugin import dpvoip

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "--logger",
                "dpvoip.logs.configured_observer", "dpvoip"]
    app.run(runApp, twistd_options(dpvoip))
    return 0


def cmd_plugin_cache(args: argparse.Namespace) -> int:
    """Rebuild Twisted's plugin cache (run at install, as the installing user)."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    from twisted import plugins

    # Loading the plugins of any interface rewrites the cache; twistd's are service makers.
    names = sorted(p.tapname for p in getPlugins(IServiceMaker, plugins))
    print("twisted plugin cache rebuilt; dpvoip plugin found:", "dpvoip" in names)
    return 0 if "dpvoip" in names else 1


def cmd_example_config(args: argparse.Namespace) -> int:
    print(example_config(), end="")
    return 0


def example_config() -> str:
    """The example TOML file, generated from the settings' own documentation."""
    import textwrap

    lines = [
        "# dpvoip configuration. Every key is optional: the value shown is the default.",
        "# Environment variables override the file: DPVOIP_<SECTION>_<KEY> for every key,",
        "# and the names the CRM already uses where shown. Lists in the environment are",
        "# comma-separated. A wrong key, type or value stops dpvoip with a message naming it.",
        "# A [[provider]] table's keys (not its kind and name): DPVOIP_PROVIDER_<NAME>_<KEY>,",
        "# the name in capitals with '-' as '_' (DPVOIP_PROVIDER_BRANCH_SECRET).",
        "",
    ]
    current = None
    for section, key, default, doc, envs in describe():
        if section != current:
            current = section
            header = f"[[{section}]]" if section == "fritzbox" else f"[{section}]"
            lines += ["", header]
            if section == "fritzbox":
                lines.append("# One table per Fritz!Box. With no [[fritzbox]] table at all")
                lines.append("# there is one box at fritz.box:1012; `fritzbox = []`: no box.")
        for text in textwrap.wrap(doc, 86):
            lines.append(f"# {text}")
        lines.append(f"# environment: {envs}")
        lines.append(f"{key} = {_toml(default)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml(value: Any) -> str:
    from dpvoip.config import Secret

    if isinstance(value, Secret):
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _with_database(config: Config, work: Any) -> int:
    """Run ``work(store)`` on a one-connection pool, starting the embedded server if needed
    (``store.embedded.for_command``: never under a running daemon's feet)."""
    from dpvoip.store.dsn import connection_dsn
    from dpvoip.store.embedded import EmbeddedError, for_command

    if not config.embedded:
        return _on_database(config, connection_dsn(config.database.url.reveal(),
                                                   config.database), work)
    try:
        with for_command(config.state_path(Path.cwd())) as embedded:
            return _on_database(config, connection_dsn(embedded.dsn(), config.database),
                                work)
    except EmbeddedError as error:
        print(f"dpvoip: embedded PostgreSQL: {error}", file=sys.stderr)
        return 1


def _on_database(config: Config, dsn: str, work: Any) -> int:
    """``work(store)`` on a one-connection pool to ``dsn``; its exit status."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    from dpvoip.store.database import Store
    from dpvoip.store.pool import HealingPool

    outcome = [1]

    async def main(reactor: Any) -> None:
        pool = HealingPool(reactor, dsn, 1, config.database.connect_timeout)
        await pool.start()
        try:
            if pool.live == 0:
                from dpvoip.store.dsn import describe as describe_dsn

                print(f"database: NOT reachable ({describe_dsn(dsn)})")
                return
            outcome[0] = int(await work(Store(pool, reactor), dsn))
        finally:
            pool.close()

    with contextlib.suppress(SystemExit):  # react() always exits; the code is ours
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    return outcome[0]


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _config(args)
    from dpvoip.store.migrations import SchemaMismatch, prepare

    async def work(store: Any, dsn: str) -> int:
        try:
            report = await store.write(
                lambda c: prepare(c, standalone=config.standalone,
                                  crm_schema=config.database.crm_schema)
            )
        except SchemaMismatch as error:
            print(f"dpvoip: {error}", file=sys.stderr)
            return 1
        applied = ", ".join(map(str, report.applied_now)) or "none (already current)"
        print(f"mode: {report.mode}; schema version {report.schema_version}; applied: {applied}")
        if report.created_crm_tables:
            print("created the CRM tables (standalone mode)")
        return 0

    return _with_database(config, work)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config, reach the database, say what is there. Changes nothing."""
    from dpvoip.check import run_check

    return run_check(_config(args), args.config or os.environ.get("DPVOIP_CONFIG"))


def cmd_lookup(args: argparse.Namespace) -> int:
    """Who a number belongs to, as a call from it would be matched (reads only)."""
    config = _config(args)
    from dpvoip.core.numbers import Dialling, normalise
    from dpvoip.service import own_numbers
    from dpvoip.store.directory import DirectoryIndex

    where = Dialling(args.region or config.directory.region, args.area_code or "")
    number = normalise(args.number, where)

    async def work(store: Any, dsn: str) -> int:
        index = DirectoryIndex(store, config.database.crm_schema,
                               Dialling(config.directory.region), own_numbers(config))
        if number is None:
            print(f"{args.number!r}: not a number dpvoip matches (withheld, too short, "
                  "service code or garbage)")
            return 1
        if index.never_matches(number):
            print(f"{number}: one of the office's own numbers; never matched")
            return 1
        if await index.needs_build():
            print("building the phone directory first (dpvoip does this at its first start)")
            await index.build()
        match = await index.lookup(number)
        if match is None:
            print(f"{number}: no CRM record")
            return 1
        print(f"{number}: {match.display_name} ({match.candidates} record(s))")
        if match.client:
            print(f"  client {match.client.id}: {match.client.name} <{match.client.email or ''}>")
        if match.person:
            print(f"  {match.person.kind} {match.person.id}: {match.person.name}"
                  f" (owner {match.person.owner_id})")
        if match.deal:
            print(f"  deal {match.deal.id}: {match.deal.name}")
        return 0

    return _with_database(config, work)


def cmd_token(args: argparse.Namespace) -> int:
    """dpvoip's own API tokens: create (shown once), list, revoke."""
    config = _config(args)
    from dpvoip.store.migrations import SchemaMismatch, prepare
    from dpvoip.store.tokens import TokenError, create_token, list_tokens, revoke_token

    schema = config.database.crm_schema

    async def work(store: Any, dsn: str) -> int:
        try:
            await store.write(lambda c: prepare(c, standalone=config.standalone,
                                                crm_schema=schema))
        except SchemaMismatch as error:
            print(f"dpvoip: {error}", file=sys.stderr)
            return 1
        if args.action == "create":
            if not args.user:
                print("dpvoip: token create needs --user NAME (a CRM username)",
                      file=sys.stderr)
                return 2
            try:
                token_id, token = await create_token(store, schema, args.user, args.label)
            except TokenError as error:
                print(f"dpvoip: {error}", file=sys.stderr)
                return 1
            print(f"token {token_id} for {args.user} (shown once; send it as "
                  "'Authorization: Bearer <token>'):")
            print(token)
            return 0
        if args.action == "list":
            tokens = await list_tokens(store, schema)
            if not tokens:
                print("no tokens")
            for t in tokens:
                state = (f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at
                         else "active")
                used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
                print(f"{t.id}\t{t.username}\t{t.label or '-'}\tcreated "
                      f"{t.created_at:%Y-%m-%d %H:%M}\tlast used {used}\t{state}")
            return 0
        if args.id is None:
            print("dpvoip: token revoke needs the token's id (see `dpvoip token list`)",
                  file=sys.stderr)
            return 2
        if await revoke_token(store, args.id):
            print(f"token {args.id} revoked")
            return 0
        print(f"dpvoip: no active token {args.id}", file=sys.stderr)
        return 1

    return _with_database(config, work)


def cmd_demo_client(args: argparse.Namespace) -> int:
    """Add (or update) the demos' CRM client; the body is ``dpvoip.demo_client``."""
    config = _config(args)
    if not config.standalone and not args.attached:
        print("dpvoip: demo-client writes a made-up client into the CRM; dpvoip is attached "
              "to the CRM's own database, so it stops here (add --attached to write it "
              "there anyway)", file=sys.stderr)
        return 2
    from dpvoip.demo_client import add_demo_client

    return _with_database(config, lambda store, dsn: add_demo_client(
        store, config, args.number, args.name, args.email))


def cmd_zadarma_sim(args: argparse.Namespace) -> int:
    """A fake Zadarma API on a local port, checking signatures as Zadarma does (demos)."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    from dpvoip.testing.zadarma import ReceivedRequest, serve

    def report(received: ReceivedRequest, status: int) -> None:
        shown = "&".join(f"{k}={v}" for k, v in sorted(received.params.items()))
        print(f"{received.method} {received.path} {shown} -> {status}", flush=True)

    async def main(reactor: Any) -> None:
        port = await serve(reactor, args.listen, args.key, args.secret,
                           timezone=args.timezone, recordings={"demo": ["1700000000.1"]},
                           report=report)
        address: Any = port.getHost()
        print(f"fake Zadarma API listening on {address.host}:{address.port}; set "
              f"[zadarma] api_url = \"http://{address.host}:{address.port}\", key = "
              f"\"{args.key}\", secret = \"{args.secret}\"", flush=True)
        await Deferred()  # until interrupted

    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    return 0


def cmd_zadarma_call(args: argparse.Namespace) -> int:
    """Send a script of calls to a running dpvoip as Zadarma's signed webhooks (demos)."""
    from dpvoip.testing.zadarma_caller import command

    return command(args.script, _config(args), url=args.url, secret=args.secret,
                   zone=args.timezone, wait=not args.at_once)


def cmd_fritz_sim(args: argparse.Namespace) -> int:
    """Play a CallMonitor script on a TCP port as a Fritz!Box does (tests, demos); with
    ``--tr064-port``, serve the box's TR-064 call list too, filled by the same script."""
    from dpvoip.testing.fritzbox import ListSide, serve

    tr064 = None
    if args.tr064_port is not None:
        given = {"user": args.tr064_user, "password": args.tr064_password,
                 "delay": args.list_delay}
        tr064 = ListSide(args.tr064_port, tls=not args.no_tls,
                         **{key: value for key, value in given.items() if value is not None})
    return serve(args.script, args.port, args.host, args.timezone, loop=args.loop,
                 tr064=tr064)


def cmd_asterisk_sim(args: argparse.Namespace) -> int:
    """A fake Asterisk's Manager Interface playing a script of calls (demos)."""
    from dpvoip.testing.asterisk import serve

    return serve(args.script, args.port, args.host, args.username, args.secret, args.loop)


def _port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 3600 seconds")
    return value


DESCRIPTION = "dpvoip records Fritz!Box and Zadarma calls in the CRM and dials click-to-call."
"""What ``dpvoip --help`` says first: what dpvoip is, in one line of a terminal."""


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["psql"]:  # psql's own options (-c, -f, ...) go to psql untouched
        from dpvoip import psql_command

        return psql_command.main(given[1:], os.environ)
    parser = argparse.ArgumentParser(prog="dpvoip",
                                     description=DESCRIPTION,
                                     epilog=f"Version {__version__}. More: README.md, "
                                            "`dpvoip COMMAND --help`.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, text in [
        ("run", cmd_run, "start the daemon in the foreground"),
        ("migrate", cmd_migrate, "create or update dpvoip's schema (and standalone CRM tables)"),
        ("check", cmd_check, "validate the config, reach the database, report what is there"),
        ("lookup", cmd_lookup, "show who a phone number belongs to in the CRM"),
        ("token", cmd_token, "create, list or revoke dpvoip API tokens for CRM users"),
        ("demo-client", cmd_demo_client,
         "add the demos' client (mobile 6912345678) to the CRM, so that its calls match"),
        ("zadarma-sim", cmd_zadarma_sim, "a fake Zadarma API that checks signatures (demos)"),
        ("zadarma-call", cmd_zadarma_call,
         "send a scripted call to a running dpvoip as Zadarma's signed webhooks (demos)"),
        ("fritz-sim", cmd_fritz_sim, "simulate a Fritz!Box CallMonitor playing a script"),
        ("asterisk-sim", cmd_asterisk_sim, asterisk_sim.HELP),
        ("plugin-cache", cmd_plugin_cache, "rebuild Twisted's plugin cache after install"),
        ("example-config", cmd_example_config, "print the example configuration file"),
    ]:
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", "-c", help="TOML configuration file")
        sub.set_defaults(handler=handler)
        if name == "lookup":
            sub.add_argument("number", help="the number, in any format")
            sub.add_argument("--region", help="country it was dialled in (default: the CRM's)")
            sub.add_argument("--area-code", help="local area code it was dialled from")
        if name == "token":
            sub.add_argument("action", choices=["create", "list", "revoke"])
            sub.add_argument("id", nargs="?", type=int, help="token id (revoke)")
            sub.add_argument("--user", help="CRM username the token acts for (create)")
            sub.add_argument("--label", default="", help="what the token is for (create)")
        if name == "zadarma-sim":
            sub.add_argument("--listen", default="tcp:8443:interface=127.0.0.1",
                             help="Twisted endpoint (default tcp:8443:interface=127.0.0.1)")
            sub.add_argument("--key", default="demo-key", help="API key it accepts")
            sub.add_argument("--secret", default="demo-secret", help="API secret it checks")
            sub.add_argument("--timezone", default="UTC+2", help="what it says the zone is")
        if name == "demo-client":
            from dpvoip.demo_client import DEMO_EMAIL, DEMO_NAME, DEMO_NUMBER

            sub.add_argument("--number", default=DEMO_NUMBER,
                             help=f"its mobile number (default {DEMO_NUMBER})")
            sub.add_argument("--name", default=DEMO_NAME, help=f"its name (default {DEMO_NAME!r})")
            sub.add_argument("--email", default=DEMO_EMAIL,
                             help=f"its email (default {DEMO_EMAIL})")
            sub.add_argument("--attached", action="store_true",
                             help="write it even into the CRM's own database (attached mode)")
        if name == "zadarma-call":
            sub.add_argument("script", help="call script (examples: etc/scenarios/zadarma-*.txt)")
            sub.add_argument("--url", default="http://127.0.0.1:8080/voip/zd/",
                             help="dpvoip's webhook (default http://127.0.0.1:8080/voip/zd/)")
            sub.add_argument("--secret", help="the account's API secret to sign with (default: "
                             "[zadarma] secret of the configuration, else demo-secret)")
            sub.add_argument("--timezone", help="the account's time zone (default: [zadarma] "
                             "timezone, else [crm] timezone, as dpvoip reads call_start)")
            sub.add_argument("--at-once", action="store_true",
                             help="send every event now instead of at the script's pace")
        if name == "asterisk-sim":
            asterisk_sim.add_arguments(sub)
        if name == "fritz-sim":
            sub.add_argument("script", help="scenario file (examples in etc/scenarios/)")
            sub.add_argument("--port", type=int, default=1012, help="TCP port (default 1012)")
            sub.add_argument("--host", default="127.0.0.1", help="address to listen on")
            sub.add_argument("--timezone", default="Europe/Athens", help="the box's time zone")
            sub.add_argument("--loop", action="store_true", help="play the script forever")
            sub.add_argument("--tr064-port", type=_port_number, metavar="N",
                             help="serve the box's TR-064 call list on this port too (0: "
                                  "any free one), filled by the script's calls")
            sub.add_argument("--tr064-user", help="TR-064 user it accepts (default dpvoip)")
            sub.add_argument("--tr064-password",
                             help="TR-064 password it accepts (default demo-password)")
            sub.add_argument("--no-tls", action="store_true",
                             help="TR-064 over plain HTTP (default: TLS, self-signed)")
            sub.add_argument("--list-delay", type=_seconds, metavar="SECONDS",
                             help="from a DISCONNECT to the call's list entry (default 5)")
    commands.add_parser("psql", add_help=False, help="psql on dpvoip's database: dpvoip psql "
                        "[--config FILE] [psql's arguments, e.g. -c 'select 1']")
    args = parser.parse_args(given)
    if name_needs_tr064(args):
        parser.error("--tr064-user, --tr064-password, --no-tls and --list-delay need "
                     "--tr064-port")
    return int(args.handler(args))


def name_needs_tr064(args: argparse.Namespace) -> bool:
    """``fritz-sim`` given TR-064 options without ``--tr064-port`` (they would do
    nothing)."""
    if args.command != "fritz-sim" or args.tr064_port is not None:
        return False
    return bool(args.no_tls) or any(value is not None for value in (
        args.tr064_user, args.tr064_password, args.list_delay))


if __name__ == "__main__":
    raise SystemExit(main())
