"""The fake box speaks TR-064 as a box does, checked with plain HTTP requests built by
hand (not with dpvoip's client): the device description, Digest with expiring nonces
and growing nc, the in-SOAP login, the call list URL with its session id and its
``days``/``max``/``id``+``timestamp`` filters, the list reset, the scripted failures.

Network tests run on 127.0.0.1 port 0 with the real reactor; the box's own time is a
``Clock`` where it matters (nonce expiry, the ``days`` window, the reset's timestamp).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import treq
from defusedxml.ElementTree import fromstring
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers

from dpvoip.fritzbox.calllist import (
    ACTIVE_INCOMING,
    BLOCKED,
    INCOMING,
    MISSED,
    OUTGOING,
    ListedCall,
    parse_call_list,
)
from dpvoip.protocols.digest import Challenge, DigestState, parse_challenge, soap_auth
from dpvoip.protocols.tr064 import (
    CONTROL_URL,
    ONTEL,
    SoapAnswer,
    client_auth,
    init_challenge,
    read_soap,
    soap_request,
)
from dpvoip.testing.tr064 import (
    REALM,
    FakeTr064Box,
    make_certificate,
    render_call_list,
    render_duration,
)
from test.support.waiting import until

NOW = dt.datetime(2025, 3, 10, 12, 0)
T0 = 1_741_600_000.0
USER, PASSWORD = "dpvoip", "gurkensalat"
SOAP_HEADERS = {"Content-Type": ['text/xml; charset="utf-8"'],
                "SOAPAction": [f'"{ONTEL}#GetCallList"']}


def entry(type_: int, remote: str, date: dt.datetime, seconds: int = 0,
          port: str = "") -> ListedCall:
    return ListedCall(0, type_, remote, "2107654321", "", "", port, date, seconds)


class RenderingTests(SynchronousTestCase):
    def test_durations_are_rounded_up_to_minutes(self) -> None:
        self.assertEqual([render_duration(s) for s in (0, 1, 60, 61, 3599, 45240)],
                         ["0:00", "0:01", "0:01", "0:02", "1:00", "12:34"])

    def test_what_the_box_renders_reads_back(self) -> None:
        box = FakeTr064Box(Clock(), USER, PASSWORD, tls=False, now=lambda: NOW)
        added = [
            box.call(MISSED, "", NOW - dt.timedelta(days=1)),
            box.call(INCOMING, "06987654321", NOW - dt.timedelta(hours=2), 95, port="40",
                     name="Papadopoulos & Sons", device="Anrufbeantworter 1"),
            box.call(OUTGOING, "2310555666", NOW - dt.timedelta(hours=1), 754, device="DECT 1"),
            box.call(BLOCKED, "2101112223", NOW - dt.timedelta(minutes=5)),
        ]
        parsed = parse_call_list(render_call_list(box.timestamp, box.listing()))
        self.assertEqual([call.id for call in added], [1, 2, 3, 4])
        self.assertEqual(parsed.calls[0], added[3])
        self.assertEqual(parsed.calls[2].name, "Papadopoulos & Sons")
        self.assertEqual(parsed.calls[2].duration_seconds, 120)  # 95 s shows as 0:02
        self.assertEqual(parsed.calls[1].duration_seconds, 780)
        self.assertEqual(parsed.calls[1].remote, "2310555666")
        self.assertEqual(parsed.calls[3].remote, "")
        self.assertTrue(parsed.calls[2].by_machine())

    def test_the_box_writes_caller_and_called_by_direction(self) -> None:
        box = FakeTr064Box(Clock(), USER, PASSWORD, tls=False)
        box.call(OUTGOING, "2310555666", NOW, own_number="2107654321")
        box.call(INCOMING, "06987654321", NOW, 60, port="40", own_number="2107654321")
        document = render_call_list(1, box.listing()).decode()
        self.assertIn("<Called>2310555666</Called>", document)
        self.assertIn("<CallerNumber>2107654321</CallerNumber>", document)
        self.assertIn("<Caller>06987654321</Caller>", document)
        self.assertIn("<CalledNumber>2107654321</CalledNumber>", document)
        self.assertIn("<Path>/download.lua?path=/data/tam/rec/rec.0.002</Path>", document)
        self.assertIn("<Date>10.03.25 12:00</Date>", document)


class ListingTests(SynchronousTestCase):
    """What ``calllist.lua`` gives for its parameters, as a box does."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.box = FakeTr064Box(self.clock, USER, PASSWORD, tls=False, now=lambda: NOW)
        for days_ago in (10, 5, 2, 1, 0):
            self.box.call(MISSED, f"69000000{days_ago:02d}",
                          NOW - dt.timedelta(days=days_ago, minutes=1))

    def ids(self, calls: list[ListedCall]) -> list[int]:
        return [call.id for call in calls]

    def test_newest_first(self) -> None:
        self.assertEqual(self.ids(self.box.listing()), [5, 4, 3, 2, 1])

    def test_only_entries_newer_than_id_n_of_the_same_list(self) -> None:
        self.assertEqual(self.ids(self.box.listing(since=(3, self.box.timestamp))), [5, 4])
        self.assertEqual(self.ids(self.box.listing(since=(5, self.box.timestamp))), [])

    def test_another_timestamp_gives_the_whole_list(self) -> None:
        self.assertEqual(self.ids(self.box.listing(since=(3, self.box.timestamp - 1))),
                         [5, 4, 3, 2, 1])

    def test_days_and_max(self) -> None:
        self.assertEqual(self.ids(self.box.listing(days=3)), [5, 4, 3])
        self.assertEqual(self.ids(self.box.listing(max_entries=2)), [5, 4])
        self.assertEqual(self.ids(self.box.listing(days=6, max_entries=10)), [5, 4, 3, 2])

    def test_a_reset_restarts_ids_and_changes_the_timestamp(self) -> None:
        stamp = self.box.timestamp
        self.assertEqual(stamp, int(T0))
        self.box.reset()
        self.assertEqual(self.box.listing(), [])
        self.assertGreater(self.box.timestamp, stamp)
        self.assertEqual(self.box.call(INCOMING, "1", NOW).id, 1)
        # the old (id, timestamp) now names another list: the whole list comes
        self.assertEqual(self.ids(self.box.listing(since=(5, stamp))), [1])

    def test_an_active_call_is_rewritten_in_place(self) -> None:
        active = self.box.call(ACTIVE_INCOMING, "2105556667", NOW)
        self.box.change(replace(active, type=INCOMING, duration_seconds=300))
        self.assertEqual(self.box.listing()[0].type, INCOMING)
        self.assertRaises(KeyError, self.box.change, replace(active, id=99))

    def test_an_unknown_failure_is_refused(self) -> None:
        self.assertRaises(ValueError, self.box.fail_with, "fire")


@dataclass(frozen=True)
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> list[str]:
        return list(self.headers.getRawHeaders(name) or [])

    def soap(self) -> SoapAnswer:
        return read_soap(self.body)


class FakeOverHttpTests(TestCase):
    timeout = 120

    def start(self, **options: object) -> Deferred[int]:
        self.clock = Clock()
        self.clock.advance(T0)
        tls = bool(options.pop("tls", False))
        self.box = FakeTr064Box(reactor, USER, PASSWORD, tls=tls, clock=self.clock,
                                now=lambda: NOW, **options)  # type: ignore[arg-type]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(self.box.stop)
        return self.box.listen()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.box.port}"

    async def send(self, method: str, path: str, body: bytes | None = None,
                   headers: dict[str, list[str]] | None = None) -> Reply:
        response = await self.http.request(method, self.base + path, data=body,
                                           headers=Headers(headers or {}))
        content = await treq.content(response)
        return Reply(response.code, response.headers, content)

    async def soap(self, header: str = "", authorization: str | None = None) -> Reply:
        headers = dict(SOAP_HEADERS)
        if authorization is not None:
            headers["Authorization"] = [authorization]
        return await self.send("POST", CONTROL_URL,
                               soap_request("GetCallList", ONTEL, header=header), headers)

    async def login(self) -> tuple[DigestState, Reply]:
        """A Digest login as a browser does it: ask, get 401, answer."""
        first = await self.soap()
        self.assertEqual(first.code, 401)
        challenge = parse_challenge(first.header("WWW-Authenticate"))
        assert challenge is not None
        state = DigestState(challenge)
        answer = await self.soap(authorization=state.authorization(USER, PASSWORD, "POST",
                                                                   CONTROL_URL))
        return state, answer

    async def test_the_device_description_names_the_call_list_service(self) -> None:
        await self.start()
        reply = await self.send("GET", "/tr64desc.xml")
        self.assertEqual(reply.code, 200)
        root = fromstring(reply.body)
        services = {
            "".join(s.itertext()).strip(): s for s in root.iter()
            if s.tag.endswith("}serviceType")}
        self.assertIn(ONTEL, services)
        controls = [node.text for node in root.iter() if node.tag.endswith("}controlURL")]
        self.assertIn(CONTROL_URL, controls)

    async def test_the_box_asks_for_digest_as_a_fritzbox_does(self) -> None:
        await self.start()
        reply = await self.soap()
        self.assertEqual(reply.code, 401)
        challenge = parse_challenge(reply.header("WWW-Authenticate"))
        assert challenge is not None
        self.assertEqual((challenge.realm, challenge.qop, challenge.algorithm, challenge.stale),
                         (REALM, ("auth",), "MD5", False))

    async def test_a_right_answer_gets_the_list_url_with_a_session_id(self) -> None:
        await self.start()
        self.box.call(INCOMING, "06987654321", NOW - dt.timedelta(hours=1), 30)
        _, reply = await self.login()
        self.assertEqual(reply.code, 200)
        location = reply.soap().values["NewCallListURL"]
        self.assertTrue(location.startswith(f"http://fritz.box:{self.box.port}/calllist.lua?sid="),
                        location)
        path = location.partition(f":{self.box.port}")[2]
        listed = await self.send("GET", path)
        self.assertEqual(listed.code, 200)
        self.assertEqual([c.remote for c in parse_call_list(listed.body).calls],
                         ["06987654321"])
        no_session = await self.send("GET", "/calllist.lua?sid=0000")
        self.assertEqual(no_session.code, 403)

    async def test_the_list_url_honours_its_parameters(self) -> None:
        await self.start()
        for days_ago in (9, 3, 1, 0):
            self.box.call(MISSED, "6900000000", NOW - dt.timedelta(days=days_ago, minutes=1))
        _, reply = await self.login()
        path = reply.soap().values["NewCallListURL"].partition(f":{self.box.port}")[2]

        async def ids(query: str) -> list[int]:
            listed = await self.send("GET", path + query)
            return [call.id for call in parse_call_list(listed.body).calls]

        stamp = self.box.timestamp
        self.assertEqual(await ids(""), [4, 3, 2, 1])
        self.assertEqual(await ids("&days=2"), [4, 3])
        self.assertEqual(await ids("&max=1"), [4])
        self.assertEqual(await ids(f"&id=2&timestamp={stamp}"), [4, 3])
        self.assertEqual(await ids(f"&id=2&timestamp={stamp + 7}"), [4, 3, 2, 1])
        self.assertEqual(self.box.list_queries[-1], {"id": "2", "timestamp": str(stamp + 7)})
        self.assertNotIn("sid", repr(self.box.list_queries))

    async def test_a_wrong_password_is_refused_with_a_new_challenge(self) -> None:
        await self.start()
        first = await self.soap()
        challenge = parse_challenge(first.header("WWW-Authenticate"))
        assert challenge is not None
        wrong = DigestState(challenge).authorization(USER, "wrong", "POST", CONTROL_URL)
        reply = await self.soap(authorization=wrong)
        self.assertEqual(reply.code, 401)
        again = parse_challenge(reply.header("WWW-Authenticate"))
        assert again is not None
        self.assertFalse(again.stale)
        self.assertNotEqual(again.nonce, challenge.nonce)
        self.assertEqual(self.box.authorization_headers, 1)

    async def test_a_nonce_expires_after_its_uses_and_is_answered_stale(self) -> None:
        await self.start(nonce_uses=2)
        state, reply = await self.login()
        self.assertEqual(reply.code, 200)
        second = await self.soap(authorization=state.authorization(USER, PASSWORD, "POST",
                                                                   CONTROL_URL))
        self.assertEqual(second.code, 200)
        third = await self.soap(authorization=state.authorization(USER, PASSWORD, "POST",
                                                                  CONTROL_URL))
        self.assertEqual(third.code, 401)
        stale = parse_challenge(third.header("WWW-Authenticate"))
        assert stale is not None
        self.assertTrue(stale.stale)
        self.assertEqual(self.box.stale_answers, 1)

    async def test_a_nonce_expires_after_its_time(self) -> None:
        await self.start(nonce_seconds=60.0)
        state, reply = await self.login()
        self.assertEqual(reply.code, 200)
        self.clock.advance(60)
        late = await self.soap(authorization=state.authorization(USER, PASSWORD, "POST",
                                                                 CONTROL_URL))
        self.assertEqual(late.code, 401)
        stale = parse_challenge(late.header("WWW-Authenticate"))
        assert stale is not None
        self.assertTrue(stale.stale)

    async def test_a_replayed_nc_is_refused(self) -> None:
        await self.start()
        state, reply = await self.login()
        self.assertEqual(reply.code, 200)
        state.nc = 0  # the same nc=1 again: a replay
        replay = await self.soap(authorization=state.authorization(USER, PASSWORD, "POST",
                                                                   CONTROL_URL))
        self.assertEqual(replay.code, 401)

    async def test_the_in_soap_login(self) -> None:
        await self.start(digest=False)
        bare = await self.soap()
        self.assertEqual((bare.code, bare.header("WWW-Authenticate")), (401, []))
        init = await self.soap(header=init_challenge(USER))
        challenge = init.soap().challenge
        assert challenge is not None
        self.assertEqual((challenge.status, challenge.realm), ("Unauthenticated", REALM))
        wrong = await self.soap(header=client_auth(USER, "wrong", REALM, challenge.nonce))
        refused = wrong.soap().challenge
        assert refused is not None
        self.assertEqual((wrong.code, refused.status), (500, "Unauthenticated"))
        right = await self.soap(header=client_auth(USER, PASSWORD, REALM, refused.nonce))
        answer = right.soap()
        assert answer.challenge is not None
        self.assertEqual((right.code, answer.challenge.status), (200, "Authenticated"))
        self.assertIn("NewCallListURL", answer.values)
        # the next request uses the next nonce; the used one is gone
        reuse = await self.soap(header=client_auth(USER, PASSWORD, REALM, refused.nonce))
        self.assertEqual(reuse.code, 500)
        self.assertEqual(self.box.client_auths, 3)

    async def test_the_spec_vector_logs_in(self) -> None:
        await self.start(digest=False)
        self.box.user, self.box.password = "admin", "gurkensalat"
        init = await self.soap(header=init_challenge("admin"))
        challenge = init.soap().challenge
        assert challenge is not None
        header = client_auth("admin", "gurkensalat", REALM, challenge.nonce)
        self.assertIn(soap_auth("admin", REALM, "gurkensalat", challenge.nonce), header)
        self.assertEqual((await self.soap(header=header)).code, 200)

    async def test_missing_right(self) -> None:
        await self.start()
        self.box.fail_with("rights")
        _, reply = await self.login()
        self.assertEqual(reply.code, 500)
        self.assertEqual(reply.soap().fault, (606, "Action Not Authorized"))

    async def test_locked(self) -> None:
        await self.start()
        self.box.fail_with("locked")
        self.assertEqual((await self.soap()).code, 503)
        self.box.fail_with(None)
        self.assertEqual((await self.soap()).code, 401)

    async def test_auth_refuses_even_the_right_password(self) -> None:
        await self.start()
        self.box.fail_with("auth")
        _, reply = await self.login()
        self.assertEqual(reply.code, 401)

    async def test_garbage(self) -> None:
        await self.start()
        self.box.fail_with("garbage")
        _, reply = await self.login()
        self.assertEqual(reply.code, 200)
        self.assertRaises(ValueError, read_soap, reply.body)

    async def test_slow_holds_the_answer_until_stop(self) -> None:
        await self.start()
        self.box.fail_with("slow")
        pending = Deferred.fromCoroutine(self.soap())
        await until(lambda: self.box.held == 1)
        self.assertFalse(pending.called)
        await self.box.stop()
        self.assertEqual(self.box.held, 0)
        self.assertEqual(self.box.open_connections, 0)
        with self.assertRaises(ResponseNeverReceived):  # the client sees the box hang up
            await pending

    async def test_tls_with_a_self_signed_certificate_and_its_fingerprint(self) -> None:
        await self.start(tls=True)
        self.assertEqual(len(self.box.fingerprint), 64)
        self.assertEqual(self.box.fingerprint, self.box.certificate.fingerprint)
        other = make_certificate(NOW)
        self.assertNotEqual(other.fingerprint, self.box.fingerprint)


class ChallengeShapeTests(SynchronousTestCase):
    def test_the_challenge_the_box_sends_reads_back(self) -> None:
        challenge = Challenge(REALM, "ABCDEF0123456789", ("auth",))
        self.assertEqual(challenge.header(),
                         'Digest realm="F!Box SOAP-Auth", nonce="ABCDEF0123456789", '
                         'algorithm=MD5, qop="auth"')
