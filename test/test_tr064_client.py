"""dpvoip's TR-064 client against the fake box on 127.0.0.1 with the real reactor: the
call list over TLS with the certificate pinned (and refused, before any credential
leaves, when it differs), Digest with a remembered nonce and stale nonces, the in-SOAP
login, the list URL's host and parameters, and each failure as its ``Tr064Error`` kind,
with no secret in any message. The timeout is driven by a ``Clock``, never waited for.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from dpvoip.config import Secret
from dpvoip.fritzbox.calllist import BLOCKED, INCOMING, MISSED, OUTGOING, CallList
from dpvoip.protocols.tr064 import (
    KINDS,
    PinnedCertificatePolicy,
    SoapError,
    Tr064Client,
    Tr064Error,
    read_soap,
    soap_request,
)
from dpvoip.testing.tr064 import FakeTr064Box, make_certificate
from test.support.ports import HeldPort
from test.support.waiting import until

NOW = dt.datetime(2025, 3, 10, 12, 0)
USER, PASSWORD = "dpvoip", "Gurken-Salat-77"


class Fixture(TestCase):
    timeout = 120

    async def box(self, tls: bool = True, **options: Any) -> FakeTr064Box:
        box = FakeTr064Box(reactor, USER, PASSWORD, tls=tls, now=lambda: NOW, **options)
        await box.listen()
        self.addCleanup(box.stop)
        return box

    def client(self, box: FakeTr064Box, password: str = PASSWORD, **options: Any
               ) -> Tr064Client:
        assert box.port is not None
        options.setdefault("tls", box.tls)
        return Tr064Client(reactor, "127.0.0.1", box.port, USER, Secret(password), **options)

    async def fails(self, client: Tr064Client, kind: str, **call: Any) -> Tr064Error:
        try:
            await client.call_list(**call)
        except Tr064Error as error:
            self.assertEqual(error.kind, kind, str(error))
            for text in (str(error), error.advice, repr(error)):
                self.assertNotIn(PASSWORD, text)
                self.assertNotIn("sid=", text)
                self.assertNotIn("response=", text)
            self.assertTrue(error.advice)
            return error
        raise AssertionError(f"no Tr064Error({kind!r})")

    def office_calls(self, box: FakeTr064Box) -> None:
        box.call(MISSED, "06912345678", NOW - dt.timedelta(hours=3), own_number="2107654321")
        box.call(INCOMING, "06987654321", NOW - dt.timedelta(hours=2), 95, port="40",
                 own_number="2107654321", device="Anrufbeantworter 1")
        box.call(OUTGOING, "2310555666", NOW - dt.timedelta(hours=1), 300,
                 own_number="2107654321", device="DECT 1")
        box.call(BLOCKED, "2101112223", NOW - dt.timedelta(minutes=5))


class _PlainRefusal(Protocol):
    """A server that speaks no TLS: it answers the ClientHello with plain HTTP."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        transport.loseConnection()


class CallListTests(Fixture):
    async def test_the_list_over_tls_and_its_certificate_for_pinning(self) -> None:
        box = await self.box()
        self.office_calls(box)
        client = self.client(box)
        self.assertIsNone(client.certificate)
        listed = await client.call_list()
        self.assertIsInstance(listed, CallList)
        self.assertEqual(listed.timestamp, box.timestamp)
        self.assertEqual([call.id for call in listed.calls], [4, 3, 2, 1])
        self.assertEqual([call.type for call in listed.calls],
                         [BLOCKED, OUTGOING, INCOMING, MISSED])
        self.assertEqual(listed.calls[1].remote, "2310555666")
        self.assertTrue(listed.calls[2].by_machine())
        self.assertEqual(client.certificate, box.fingerprint)
        # the list URL names fritz.box: it was fetched from our host and port anyway
        self.assertEqual(box.paths, ["/upnp/control/x_contact"] * 2 + ["/calllist.lua"])

    async def test_the_pinned_certificate_is_accepted_in_any_spelling(self) -> None:
        box = await self.box()
        self.office_calls(box)
        spelled = ":".join(box.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
        client = self.client(box, pinned=spelled)
        self.assertEqual(len((await client.call_list()).calls), 4)

    async def test_another_certificate_is_refused_before_any_credential_is_sent(self) -> None:
        box = await self.box()
        other = make_certificate(NOW)
        client = self.client(box, pinned=other.fingerprint)
        error = await self.fails(client, "tls")
        self.assertIn(box.fingerprint, str(error))
        self.assertIn("dpvoip check", error.advice)
        self.assertEqual(client.certificate, box.fingerprint)  # shown, for the admin
        self.assertEqual(box.requests_seen, 0)
        self.assertEqual(box.authorization_headers, 0)

    async def test_a_failed_handshake_is_a_tls_failure(self) -> None:
        factory = Factory.forProtocol(_PlainRefusal)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = Tr064Client(reactor, "127.0.0.1", port.getHost().port, USER,
                             Secret(PASSWORD))
        error = await self.fails(client, "tls")
        self.assertIn("handshake", str(error))

    async def test_plain_http_when_configured(self) -> None:
        box = await self.box(tls=False)
        self.office_calls(box)
        client = self.client(box)
        self.assertEqual(len((await client.call_list()).calls), 4)
        self.assertIsNone(client.certificate)

    async def test_parameters_reach_the_list_url(self) -> None:
        box = await self.box(tls=False)
        self.office_calls(box)
        client = self.client(box)
        newer = await client.call_list(since=(2, box.timestamp))
        self.assertEqual([call.id for call in newer.calls], [4, 3])
        both = await client.call_list(days=7, max_entries=1)
        self.assertEqual([call.id for call in both.calls], [4])
        self.assertEqual(box.list_queries, [{"id": "2", "timestamp": str(box.timestamp)},
                                            {"days": "7", "max": "1"}])

    async def test_after_a_reset_the_old_position_gives_the_whole_new_list(self) -> None:
        box = await self.box(tls=False)
        self.office_calls(box)
        client = self.client(box)
        before = await client.call_list()
        box.reset()
        box.call(INCOMING, "06987654321", NOW, 60)
        after = await client.call_list(since=(before.calls[0].id, before.timestamp))
        self.assertNotEqual(after.timestamp, before.timestamp)
        self.assertEqual([call.id for call in after.calls], [1])


class DigestTests(Fixture):
    async def test_the_nonce_is_remembered_and_nc_counts(self) -> None:
        box = await self.box(tls=False)
        cnonces = iter(f"c{n}" for n in range(10))
        client = self.client(box, cnonce=lambda: next(cnonces))
        await client.call_list()
        await client.call_list()
        await client.call_list()
        # one 401 at the first call; later calls answer at once with the next nc
        self.assertEqual(box.paths.count("/upnp/control/x_contact"), 4)
        self.assertEqual(box.authorization_headers, 3)

    async def test_a_stale_nonce_is_taken_once(self) -> None:
        box = await self.box(tls=False, nonce_uses=1)
        client = self.client(box)
        await client.call_list()
        await client.call_list()
        self.assertEqual(box.stale_answers, 1)
        self.assertEqual(box.paths.count("/upnp/control/x_contact"), 4)

    async def test_a_wrong_password_is_auth_after_one_answer(self) -> None:
        box = await self.box(tls=False)
        error = await self.fails(self.client(box, password="not-" + PASSWORD), "auth")
        self.assertIn("tr064_password", error.advice)
        self.assertEqual(box.authorization_headers, 1)  # no hammering towards a lock-out

    async def test_a_box_refusing_every_login(self) -> None:
        box = await self.box(tls=False)
        box.fail_with("auth")
        await self.fails(self.client(box), "auth")

    async def test_the_in_soap_login_when_the_box_offers_no_digest(self) -> None:
        box = await self.box(tls=False, digest=False)
        self.office_calls(box)
        client = self.client(box)
        self.assertEqual(len((await client.call_list()).calls), 4)
        self.assertEqual(len((await client.call_list()).calls), 4)
        self.assertEqual(box.authorization_headers, 0)
        self.assertEqual(box.client_auths, 2)  # the second call used the NextChallenge

    async def test_the_in_soap_login_with_a_wrong_password(self) -> None:
        box = await self.box(tls=False, digest=False)
        await self.fails(self.client(box, password="x"), "auth")
        self.assertEqual(box.client_auths, 1)


class FailureTests(Fixture):
    async def test_a_missing_right(self) -> None:
        box = await self.box()
        box.fail_with("rights")
        error = await self.fails(self.client(box), "rights")
        self.assertIn("Voice messages, faxes, FRITZ!App Fon and call list", error.advice)
        self.assertIn("Allow access for applications", error.advice)

    async def test_the_lock_out(self) -> None:
        box = await self.box()
        box.fail_with("locked")
        error = await self.fails(self.client(box), "locked")
        self.assertIn("wait", error.advice)

    async def test_garbage_instead_of_soap(self) -> None:
        box = await self.box()
        box.fail_with("garbage")
        await self.fails(self.client(box), "bad_answer")

    async def test_garbage_instead_of_a_list(self) -> None:
        box = await self.box()
        box.fail_with("garbage_list")
        error = await self.fails(self.client(box), "bad_answer")
        self.assertIn("call list", str(error))

    async def test_a_list_too_big_is_refused(self) -> None:
        box = await self.box(tls=False)
        for minute in range(13_000):  # about 4.5 MB rendered
            box.call(MISSED, "06912345678", NOW - dt.timedelta(minutes=minute),
                     own_number="2107654321", name="A caller with a long name",
                     device="Telefon Empfang")
        error = await self.fails(self.client(box), "bad_answer")
        self.assertIn("larger than", str(error))

    async def test_nothing_listening_is_unreachable(self) -> None:
        held = HeldPort()
        self.addCleanup(held.close)
        client = Tr064Client(reactor, "127.0.0.1", held.port, USER, Secret(PASSWORD),
                             tls=False)
        error = await self.fails(client, "unreachable")
        self.assertIn(str(held.port), str(error))

    async def test_a_box_that_never_answers_times_out_on_the_clock(self) -> None:
        box = await self.box(tls=False)
        box.fail_with("slow")
        clock = Clock()
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        assert box.port is not None
        client = Tr064Client(clock, "127.0.0.1", box.port, USER, Secret(PASSWORD), tls=False,
                             timeout=10.0, agent=agent)
        pending = Deferred.fromCoroutine(client.call_list())
        await until(lambda: box.held == 1)
        clock.advance(9.9)
        self.assertFalse(pending.called)
        clock.advance(0.1)
        try:
            await pending
        except Tr064Error as error:
            self.assertEqual(error.kind, "timeout")
            self.assertIn("10 s", str(error))
        else:
            self.fail("no timeout")
        await until(lambda: box.held == 0)  # the connection was aborted, not left open

    async def test_a_caller_that_gives_up_cancels_the_request(self) -> None:
        box = await self.box(tls=False)
        box.fail_with("slow")
        pending = Deferred.fromCoroutine(self.client(box).call_list())
        await until(lambda: box.held == 1)
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        await until(lambda: box.held == 0)


class NoSecretLoggedTests(Fixture):
    async def test_no_log_line_holds_the_password_a_digest_or_the_session(self) -> None:
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        box = await self.box()
        self.office_calls(box)
        await self.client(box).call_list()
        await self.fails(self.client(box, password="wrong-" + PASSWORD), "auth")
        box.fail_with("garbage_list")
        await self.fails(self.client(box), "bad_answer")
        box.fail_with("slow")
        pending = Deferred.fromCoroutine(self.client(box).call_list())
        await until(lambda: box.held == 1)
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        for secret in (PASSWORD, "sid=", "response=", "Digest "):
            self.assertNotIn(secret, text)


class PureTests(SynchronousTestCase):
    def test_error_kinds_and_advice(self) -> None:
        for kind in KINDS:
            self.assertTrue(Tr064Error(kind, "x").advice)
        self.assertRaises(ValueError, Tr064Error, "weather", "x")

    def test_the_request_envelope_reads_as_soap(self) -> None:
        envelope = soap_request("GetCallList", "urn:x", {"NewX": "a<b"})
        self.assertIn(b"<NewX>a&lt;b</NewX>", envelope)
        self.assertEqual(read_soap(envelope).values, {"NewX": "a<b"})

    def test_not_soap(self) -> None:
        for data in (b"<html/>", b"no xml", b"<Envelope/>",
                     b'<!DOCTYPE x [<!ENTITY a "b">]><Envelope><Body/></Envelope>'):
            self.assertRaises(SoapError, read_soap, data)

    def test_a_policy_without_a_pin_remembers_nothing_yet(self) -> None:
        policy = PinnedCertificatePolicy("AB:" * 31 + "AB")
        self.assertEqual(policy.pinned, "ab" * 32)
        self.assertIsNone(policy.seen)
        self.assertIsNone(PinnedCertificatePolicy("").pinned)
