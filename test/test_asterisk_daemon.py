"""End to end: the fake Asterisk speaks AMI over loopback to the daemon as the composition
root wires it from a configuration file's ``[[provider]] kind = "asterisk"`` table, into
a real PostgreSQL with the CRM's tables (both CRM versions for the calls and the spool).

The daemon runs in this process on the real reactor; the fake's calls take their time
from a ``Clock`` (``timestampevents = yes``: every event carries its own time), so the
call rows' lengths are the scenarios' and no test waits on the wall clock for them. A
scenario's events are all sent, then a ``Ping`` goes through the same connection: its
answer comes after every event before it, so once it is in, every event has been fed,
and ``pbx.settled()`` says their happenings are committed (or spooled).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import treq
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from dpvoip.asterisk.provider import AsteriskProvider
from dpvoip.config import Config, load
from dpvoip.providers.assembly import check_lines
from dpvoip.service import Daemon, build
from dpvoip.store.tokens import create_token
from dpvoip.testing.asterisk import SCENARIOS, Account, Beat, FakeAsterisk
from test.support.crm import Crm
from test.support.crm_rules import crm_findings
from test.support.daemon import PATIENCE, scratch
from test.support.postgres import postgres, private_cluster, take_down
from test.support.waiting import until
from test.support.wiring import running

SECRET = "Qm7-manager-secret-4e1b"  # the fake PBX's; looked for in every output
OWN = "2107654321"
CALLER = "6912345678"  # a client's mobile
CONTACT = "6971111111"  # a contact's mobile

#: The fake's calls begin an hour before the test: every call is older than the daemon.
HOUR = 3600.0


class AsteriskDaemonCase(TestCase):
    timeout = 2 * PATIENCE
    crm_version = "2025-12"

    def setUp(self) -> None:
        self.dsn = postgres().new_database(crm=self.crm_version)
        self.crm = Crm(self.dsn)
        self.clock = Clock()
        self.clock.advance(reactor.seconds() - HOUR)
        self.fake = FakeAsterisk(reactor, Account("dpvoip", SECRET), clock=self.clock,
                                 timestamps=True)
        self.ami_port = self.fake.listen(0)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.fake.stop()))
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)
        self.logged: list[str] = []
        observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def _observe(self, event: LogEvent) -> None:
        self.logged.append(f"{formatEvent(event)} {event!r}")

    def tearDown(self) -> None:
        self.assertEqual(crm_findings(self.dsn), [])
        self.assertEqual([line for line in self.logged if SECRET in line], [],
                         "the manager secret was logged")

    # -- the daemon -------------------------------------------------------------------------

    def config(self, dsn: str | None = None, secret: str = SECRET, extra: str = "") -> Config:
        """The daemon's configuration, read from a file as an office writes it."""
        state = scratch(self)
        path = state / "dpvoip.toml"
        path.write_text(
            f'fritzbox = []\n[database]\nurl = "{dsn or self.dsn}"\n'
            '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'[directory]\nown_numbers = ["{OWN}"]\n'
            '[[provider]]\nkind = "asterisk"\nname = "office"\nhost = "127.0.0.1"\n'
            f'port = {self.ami_port}\nusername = "dpvoip"\nsecret = "{secret}"\n'
            'trunk_patterns = ["PJSIP/provider-*"]\nreconnect_initial_seconds = 0.1\n'
            f'reconnect_max_seconds = 1\n{extra}', encoding="utf-8")
        self.state = state
        return load(path, {})

    async def start(self, config: Config | None = None, logged_in: bool = True) -> Daemon:
        config = config or self.config()
        daemon = build(config, reactor, self.state)
        self.web_port = await running(self, daemon)
        self.daemon = daemon
        self.provider = cast(AsteriskProvider, daemon.providers["office"])
        if logged_in:
            await self.fake.when_logged_in()
            await until(lambda: self.provider.pbx.status.logged_in)
            assert self.provider.left_open is not None and self.provider.left_open.closed
            await self.provider.left_open.closed
        return daemon

    # -- the fake PBX -----------------------------------------------------------------------

    async def send(self, beats: Sequence[Beat]) -> None:
        """The events, each when its time comes on the fake's clock, then a barrier."""
        for beat in beats:
            self.clock.advance(beat.delay)
            self.fake.broadcast(beat.fields)
        await self.through()

    async def through(self) -> None:
        """Every event sent so far has been fed and its happenings recorded."""
        pbx = self.provider.pbx
        assert pbx.connection is not None
        await pbx.connection.send_action("Ping")
        await pbx.settled()

    async def play(self, name: str, **params: Any) -> None:
        await self.send(SCENARIOS[name](self.fake.pbx, **params))
        self.clock.advance(60)

    async def at_once(self, plays: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Several calls at the same time: their events merged in the order of their
        times (each call's own order kept)."""
        timed: list[tuple[float, int, int, Beat]] = []
        for number, (name, params) in enumerate(plays):
            at = 0.0
            for index, beat in enumerate(SCENARIOS[name](self.fake.pbx, **params)):
                at += beat.delay
                timed.append((at, number, index, beat))
        timed.sort(key=lambda item: item[:3])
        now = 0.0
        merged = []
        for at, _, _, beat in timed:
            merged.append(Beat(at - now, beat.fields))
            now = at
        await self.send(merged)
        self.clock.advance(60)

    # -- the CRM and HTTP --------------------------------------------------------------------

    def calls(self, crm: Crm | None = None) -> list[tuple[Any, ...]]:
        return (crm or self.crm).query(
            "SELECT direction, phone_number, status, duration_seconds, notes,"
            " ticket_created, client_id FROM accounting_voipcall ORDER BY started_at")

    def tickets(self, crm: Crm | None = None) -> list[tuple[Any, ...]]:
        return (crm or self.crm).query(
            "SELECT title, status, client_id FROM accounting_ticket ORDER BY id")

    async def request(self, method: str, path: str, body: object = None,
                      bearer: str = "") -> tuple[int, Any]:
        headers: dict[bytes | str, list[bytes | str]] = {
            "Accept": ["application/json"], "Content-Type": ["application/json"]}
        if bearer:
            headers["Authorization"] = [f"Bearer {bearer}"]
        response = await treq.request(
            method, f"http://127.0.0.1:{self.web_port}{path}", headers=headers,
            pool=self.http, data=json.dumps(body).encode() if body is not None else None)
        text = await response.content()
        self.assertNotIn(SECRET.encode(), text)
        try:
            return response.code, json.loads(text)
        except ValueError:
            return response.code, text


#: Every outcome the fake plays, and the row each leaves (as test_asterisk_e2e has them
#: through the ingest alone): direction, number, status, the CRM's duration, notes.
OUTCOMES: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = [
    ("incoming-answered", {"talk": 65},
     ("incoming", "+306912345678", "completed", 70, "answered on extension 201, talk 1:05")),
    ("incoming-missed", {}, ("incoming", "+306912345678", "missed", 20, "missed")),
    ("incoming-voicemail", {"talk": 15},
     ("incoming", "+306912345678", "missed", 35,
      "voicemail (answering machine), message 0:15")),
    ("incoming-busy", {}, ("incoming", "+306912345678", "missed", 3, "missed")),
    ("outgoing-answered", {"talk": 42},
     ("outgoing", "+302101234567", "completed", 48, "answered on extension 201, talk 0:42")),
    ("outgoing-unanswered", {}, ("outgoing", "+302101234567", "failed", 25, "not reached")),
    ("outgoing-busy", {}, ("outgoing", "+302101234567", "failed", 3, "busy")),
    ("blind-transfer", {"talk": 20},
     ("incoming", "+306912345678", "completed", 48, "answered on extension 202, talk 0:44")),
    ("attended-transfer", {"talk": 20},
     ("incoming", "+306912345678", "completed", 58, "answered on extension 202, talk 0:54")),
    ("pickup", {"to": "205", "talk": 30},
     ("incoming", "+306912345678", "completed", 36, "answered on extension 205, talk 0:30")),
    ("queue", {"ext": "203", "talk": 50},
     ("incoming", "+306912345678", "completed", 58, "answered on extension 203, talk 0:50")),
]


class CallsTests(AsteriskDaemonCase):
    """Every outcome, its row, log lines, ticket and CRM touch."""

    async def test_every_outcome_the_pbx_plays_is_recorded(self) -> None:
        client = self.crm.client("Papadopoulos AE", kinito_tilefono=CALLER)
        contact = self.crm.contact("Maria", "Ioannou", mobile=CONTACT)
        await self.start()
        await until(lambda: self.daemon.directory.state.built)
        for name, params, _ in OUTCOMES:
            await self.play(name, **params)
        await self.play("incoming-answered", caller=CONTACT, talk=20)
        rows = self.calls()
        self.assertEqual([r[:5] for r in rows[:-1]], [expected for *_, expected in OUTCOMES])
        self.assertEqual({r[6] for r in rows[:-1] if r[0] == "incoming"}, {client})
        # A contact's call is matched to the contact (the caller's name in its log line).
        [(matched,)] = self.crm.query(
            "SELECT contact_id FROM dpvoip.call_detail WHERE remote_number = %s",
            ("+" + "30" + CONTACT,))
        self.assertEqual(matched, contact)
        # Every call a PBX call, recorded as one: ids from its Linkedid, source asterisk.
        details = self.crm.query("SELECT call_id, source, box FROM dpvoip.call_detail")
        self.assertEqual(len(details), len(OUTCOMES) + 1)
        for call_id, source, box in details:
            self.assertTrue(call_id.startswith("ast-office-"), call_id)
            self.assertEqual((source, box), ("asterisk", "office"))
        # The CRM's log lines: each call has its own, its start and its end among them.
        logs = self.crm.query(
            "SELECT c.call_id, array_agg(l.action ORDER BY l.id) FROM accounting_voipcall c"
            " JOIN accounting_voipcalllog l ON l.call_id = c.id GROUP BY c.call_id")
        self.assertEqual(len(logs), len(OUTCOMES) + 1)
        for call_id, actions in logs:
            self.assertGreaterEqual(len(actions), 2, (call_id, actions))
        # The missed, the voicemail and the busy office: one ticket, grouped, once.
        self.assertEqual(self.tickets(), [
            ("MISSED CALLS (3x) - +306912345678 - Papadopoulos AE", "open", client)])
        self.assertEqual([r[5] for r in rows].count(True), 3)
        # Nothing left open, nothing lost.
        self.assertEqual(self.provider.pbx.follower.open_calls, 0)
        self.assertEqual(self.provider.pbx.status.not_recorded, 0)

    async def test_five_missed_calls_of_one_number_at_once_make_one_ticket(self) -> None:
        await self.start()
        await self.at_once([("incoming-missed", {"caller": "6944444444", "ring": 10 + n})
                            for n in range(5)])
        rows = self.calls()
        self.assertEqual([r[:3] for r in rows], [("incoming", "+306944444444", "missed")] * 5)
        [ticket] = self.tickets()
        self.assertEqual(ticket[:2], ("MISSED CALLS (5x) - +306944444444", "open"))
        [(grouped,)] = self.crm.query(
            "SELECT count(DISTINCT ticket_id) FROM accounting_voipcall")
        self.assertEqual(grouped, 1)
        # The same events again (a PBX replaying, a reconnect): nothing more.
        self.assertEqual(self.crm.query("SELECT count(*) FROM accounting_ticket"), [(1,)])

    async def test_a_call_left_open_by_the_last_run_is_closed_at_start(self) -> None:
        """Of the calls going on when dpvoip stopped, the one the PBX still has when it
        starts again is followed to its real end; the one that ended meanwhile is closed
        as interrupted (how it ended is not known)."""
        await self.start()
        talking = SCENARIOS["incoming-answered"](self.fake.pbx, talk=65)
        ringing = SCENARIOS["incoming-missed"](self.fake.pbx, caller="2310123456")
        hangup = next(n for n, b in enumerate(ringing) if b.message.event == "Hangup")
        await self.send(talking[:11])  # ringing, answered, talking
        await self.send(ringing[:hangup])  # ringing: then dpvoip stops
        self.assertEqual([r[2] for r in self.calls()], ["active", "active"])
        await self.daemon.service.stopService()
        for beat in ringing[hangup:]:  # the second caller gives up meanwhile
            self.fake.broadcast(beat.fields)
        self.clock.advance(10)
        await self.start(self.config())  # the next run, on the same database
        closed = self.provider.left_open.closed if self.provider.left_open else None
        self.assertEqual(await closed if closed else None, 1)
        self.assertEqual(self.provider.pbx.status.calls_adopted, 1)
        self.assertEqual(sorted(r[2] for r in self.calls()), ["active", "failed"])
        self.assertEqual(self.crm.query(
            "SELECT outcome FROM dpvoip.call_detail WHERE outcome IS NOT NULL"),
            [("interrupted",)])
        await self.send(talking[11:])  # the first call's real end
        self.assertEqual(sorted(r[2] for r in self.calls()), ["completed", "failed"])
        [(duration,)] = self.crm.query("SELECT duration_seconds FROM accounting_voipcall"
                                       " WHERE status = 'completed'")
        self.assertGreaterEqual(duration, 65)
        # A call of this run is left alone.
        await self.send(SCENARIOS["incoming-missed"](self.fake.pbx, caller="2310999999"))
        self.assertEqual(sorted(r[2] for r in self.calls()),
                         ["completed", "failed", "missed"])


class CallsNewestCrmTests(CallsTests):
    crm_version = "2026-08"


class OutageTests(AsteriskDaemonCase):
    """PostgreSQL away: the PBX's happenings are spooled, and replayed with the same rows
    (the replay applies them with the PBX's origin, which the root gave the spool)."""

    async def test_calls_during_an_outage_are_spooled_and_replayed(self) -> None:
        _, cluster, dsn = private_cluster(self, "dpvoip-asterisk-", self.crm_version)
        crm = Crm(dsn)
        crm.client("Papadopoulos AE", kinito_tilefono=CALLER)
        await self.start(self.config(dsn=dsn))
        await until(lambda: self.daemon.directory.state.built)
        await self.play("incoming-answered", talk=65)
        self.assertEqual(len(self.calls(crm)), 1)
        await threads.deferToThread(take_down, cluster)
        for name, params, _ in OUTCOMES[1:4]:  # missed, voicemail, busy: while it is away
            await self.play(name, **params)
        durable = self.daemon.durable
        self.assertGreaterEqual(durable.counters.spooled, 6)
        self.assertTrue(durable.spooling)
        self.assertEqual(self.provider.pbx.status.not_recorded, 0)
        await threads.deferToThread(cluster.start)
        await until(lambda: not durable.spooling, PATIENCE)
        self.assertEqual([r[:5] for r in self.calls(crm)],
                         [expected for *_, expected in OUTCOMES[:4]])
        [ticket] = self.tickets(crm)
        self.assertEqual(ticket[:2],
                         ("MISSED CALLS (3x) - +306912345678 - Papadopoulos AE", "open"))
        sources = crm.query("SELECT DISTINCT source, box FROM dpvoip.call_detail")
        self.assertEqual(sources, [("asterisk", "office")])
        self.assertEqual(crm_findings(dsn), [])


class OutageNewestCrmTests(OutageTests):
    crm_version = "2026-08"


class ClickToCallTests(AsteriskDaemonCase):
    """A ``voip_connection`` whose provider is the PBX's name dials through ``Originate``:
    the user's extension first, then the number as the office's phones dial it."""

    async def token(self) -> tuple[int, str]:
        anna = self.crm.user("anna", first_name="Anna")
        line = self.crm.insert("voip_connection", type="pbx", active=True, number="201",
                               callerid="Anna desk", provider="Office", owner_id=anna)
        _, token = await create_token(self.daemon.store, "public", "anna", "script")
        return line, token

    def originates(self) -> list[Any]:
        return [a for a in self.fake.actions if a.get("Action") == "Originate"]

    async def test_a_click_rings_the_extension_then_the_number(self) -> None:
        await self.start()
        line, token = await self.token()
        code, answer = await self.request("POST", "/voip/get-callback/",
                                          {"connection": line, "number": "210 123 4567"},
                                          token)
        self.assertEqual(code, 200, answer)
        [originate] = self.originates()
        self.assertEqual(
            [originate.get(k) for k in ("Channel", "Exten", "Context", "Priority")],
            ["PJSIP/201", "2101234567", "from-internal", "1"])
        self.assertEqual(originate.get("CallerID"), '"Click-to-call" <2101234567>')
        self.assertEqual(self.provider.pbx.status.originated, 1)
        # The PBX rings the phone, it answers, the number is dialled: an outgoing call.
        self.clock.advance(0)
        for _ in range(4):
            self.clock.advance(10)
        await self.through()
        [call] = self.calls()
        self.assertEqual(call[:3], ("outgoing", "+302101234567", "completed"))
        recorded = self.crm.query(
            "SELECT connection_id, result, http_status, number_dialled"
            " FROM dpvoip.callback_request")
        self.assertEqual(recorded, [(line, "dialled", 200, "+302101234567")])

    async def test_a_refused_originate_is_a_clear_answer(self) -> None:
        await self.start()
        line, token = await self.token()
        self.fake.account.originate = False  # manager.conf without write = originate
        code, answer = await self.request("POST", "/voip/get-callback/",
                                          {"connection": line, "number": "2101234567"},
                                          token)
        self.assertEqual((code, answer["error"]), (
            502, "the PBX office refused to call 201 for 2101234567: Permission denied "
            "(does the manager.conf user have write = originate?)"))
        self.assertEqual(self.provider.pbx.status.originate_refused, 1)
        # Not connected: nothing sent, said so.
        await self.fake.stop()
        await until(lambda: not self.provider.pbx.status.connected)
        code, answer = await self.request("POST", "/voip/get-callback/",
                                          {"connection": line, "number": "2101234567"},
                                          token)
        self.assertEqual((code, answer["error"]), (
            503, "the PBX office is not connected now; nothing was dialled, try again "
            "shortly"))
        self.assertEqual(len(self.originates()), 1)
        # A connection whose number is no extension: refused before the PBX is asked.
        other = self.crm.insert("voip_connection", type="pbx", active=True,
                                number="+30 210 765 4321", callerid="Anna mobile",
                                provider="office", owner_id=self.crm.query(
                                    "SELECT id FROM auth_user")[0][0])
        code, answer = await self.request("POST", "/voip/get-callback/",
                                          {"connection": other, "number": "2101234567"},
                                          token)
        self.assertEqual(code, 400)
        self.assertIn("is not an extension of the PBX office", answer["error"])
        results = self.crm.query("SELECT result, http_status FROM dpvoip.callback_request"
                                 " ORDER BY id")
        self.assertEqual(results, [("refused", 502), ("refused", 503), ("refused", 400)])


class CredentialsTests(AsteriskDaemonCase):
    """A wrong secret: one clear error in /readyz, /metrics and dpvoip check's lines,
    never the secret; the daemon keeps trying, and a corrected PBX needs no restart."""

    async def test_a_wrong_secret_is_shown_everywhere_without_the_secret(self) -> None:
        wrong = "wrong-" + SECRET
        config = self.config(secret=wrong)
        await self.start(config, logged_in=False)
        pbx = self.provider.pbx
        await until(lambda: pbx.status.login_failures >= 2)
        code, ready = await self.request("GET", "/readyz")
        self.assertEqual(code, 200, "a PBX never makes dpvoip not ready")
        [entry] = ready["providers"]
        self.assertEqual((entry["name"], entry["kind"], entry["connected"],
                          entry["logged_in"]), ("office", "asterisk", False, False))
        refused = ("the PBX refused the login of user 'dpvoip' (Authentication failed): "
                   "check username and secret, and the user's permit/deny in manager.conf")
        self.assertEqual(entry["last_error"], refused)
        self.assertIn(f"provider office: not logged in to the PBX at 127.0.0.1:"
                      f"{self.ami_port}: {refused} (dpvoip keeps trying)", ready["warnings"])
        _, metrics = await self.request("GET", "/metrics")
        self.assertIn(b'dpvoip_asterisk_connected{provider="office"} 0.0', metrics)
        failed = [line for line in metrics.splitlines()
                  if line.startswith(b'dpvoip_asterisk_logins_failed_total{provider="office"}')]
        self.assertEqual(len(failed), 1)
        self.assertGreaterEqual(float(failed[0].split()[-1]), 2)
        # dpvoip check's lines (providers.assembly.check_lines): a login as configured.
        lines = await threads.deferToThread(check_lines, config.all_providers)
        self.assertIn(f"provider office (Asterisk): AMI at 127.0.0.1:{self.ami_port} "
                      f"(plain TCP, md5 login): NOT LOGGED IN: {refused}", lines)
        for text in (*lines, repr(config), json.dumps(ready), metrics.decode()):
            self.assertNotIn(wrong, text)
            self.assertNotIn(SECRET, text)
        for line in self.logged:
            self.assertNotIn(wrong, line)
        said = [line for line in self.logged if "refused the login" in line
                and "LogLevel=error" in line]
        self.assertEqual(len(said), 1, "said once, not at every retry")
        # manager.conf corrected: the next retry logs in.
        self.fake.account.secret = wrong
        await until(lambda: pbx.status.logged_in)
        code, ready = await self.request("GET", "/readyz")
        self.assertEqual(ready["warnings"], [])
        lines = await threads.deferToThread(check_lines, config.all_providers)
        self.assertIn(f"provider office (Asterisk): AMI at 127.0.0.1:{self.ami_port} "
                      "(plain TCP, md5 login): logged in as 'dpvoip' (AMI 9.0.0); calls "
                      "followed on through a reconnect, and the ones begun meanwhile "
                      "recorded", lines)


class FloodTests(AsteriskDaemonCase):
    """An event flood: the calls followed at once are capped, the oldest closed as
    interrupted and counted; memory stays bounded."""

    async def test_open_calls_are_capped_and_counted(self) -> None:
        await self.start(self.config(extra="max_open_calls = 8\nmax_channels = 32\n"))
        pbx = self.fake.pbx
        for n in range(50):  # fifty callers ringing, none ever answered or ended
            pbx.outside(f"69{n:08d}")
        await self.send(pbx.take())
        follower = self.provider.pbx.follower
        self.assertEqual(follower.open_calls, 8)
        calls, channels, _ = follower.followed
        self.assertLessEqual((calls, channels), (8, 32))
        self.assertEqual(self.provider.pbx.status.calls_evicted, 42)
        _, ready = await self.request("GET", "/readyz")
        [entry] = ready["providers"]
        self.assertEqual((entry["open_calls"], entry["calls_evicted"]), (8, 42))
        _, metrics = await self.request("GET", "/metrics")
        self.assertIn(b'dpvoip_asterisk_open_calls{provider="office"} 8.0', metrics)
        self.assertIn(b'dpvoip_asterisk_calls_evicted_total{provider="office"} 42.0', metrics)
        statuses = self.crm.query("SELECT status, count(*) FROM accounting_voipcall"
                                  " GROUP BY status ORDER BY status")
        self.assertEqual(dict(statuses)["active"], 8)
        self.assertEqual(sum(count for _, count in statuses), 50)
