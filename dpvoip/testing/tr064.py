"""A fake Fritz!Box TR-064 side: the device description, the OnTel SOAP action
``GetCallList`` behind HTTP Digest (or TR-064's in-SOAP login), and the call list URL
with its session id, on 127.0.0.1.

It behaves as a box does (fritzbox.md section 7) so that dpvoip's client is tested
against the protocol, not against itself: realm ``F!Box SOAP-Auth``, MD5, qop=auth,
nonces that expire after a number of uses or seconds and are then answered
``stale=true``, ``nc`` that must grow; the list rendered as the box writes it (Date
``dd.mm.yy HH:MM``, Duration ``h:mm`` rounded up, newest first) and filtered by
``days``, ``max`` and ``id``+``timestamp`` (entries newer than id N only while the list
still has timestamp T, else the whole list); ``reset()`` empties the list, restarts
the ids at 1 and changes the timestamp. ``fail_with`` scripts the box's failures: the
login refused, the missing right (606), the lock-out (503), garbage XML, an answer that
never comes.

TLS uses a self-signed certificate made at construction (EC P-256, ``fritz.box``), as a
box's is; ``fingerprint`` is its SHA-256. Time (nonce expiry, the list's timestamp, the
``days`` window) comes from an injectable clock, so tests drive it with a ``Clock``.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory, IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from dpvoip.deferreds import EmptyableSet
from dpvoip.fritzbox.calllist import MACHINE_PORTS, OUTGOING_TYPES, ListedCall
from dpvoip.protocols.digest import (
    Challenge,
    DigestError,
    parse_authorization,
    soap_auth,
    verify,
)
from dpvoip.protocols.tr064 import (
    CONTROL_URL,
    ONTEL,
    SOAP_AUTH,
    SOAP_ENCODING,
    SOAP_ENVELOPE,
    SoapError,
    certificate_fingerprint,
    child,
    local,
    read_envelope,
    text,
)

REALM = "F!Box SOAP-Auth"
LOOPBACK = "127.0.0.1"
LIST_PATH = "/calllist.lua"
DESCRIPTION_PATH = "/tr64desc.xml"
FAILURES = ("auth", "rights", "locked", "garbage", "garbage_list", "slow")


# -- the certificate ------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxCertificate:
    """A box's self-signed certificate and its key (PEM)."""

    certificate_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate (DER), lower-case hex: what dpvoip pins."""
        certificate = x509.load_pem_x509_certificate(self.certificate_pem)
        return certificate_fingerprint(certificate.public_bytes(serialization.Encoding.DER))


def make_certificate(now: dt.datetime, common_name: str = "fritz.box") -> BoxCertificate:
    """A self-signed certificate as a box makes for itself (valid from a day before
    ``now`` for ten years)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return BoxCertificate(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()))


# -- rendering as the box does ---------------------------------------------------------------


def render_duration(seconds: int) -> str:
    """``h:mm``, minutes rounded up (61 s is ``0:02``)."""
    minutes = math.ceil(max(seconds, 0) / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


def render_call(call: ListedCall) -> str:
    """One ``<Call>`` element as a box writes it."""
    outgoing = call.type in OUTGOING_TYPES
    caller, called = ((call.own_number, call.remote) if outgoing
                      else (call.remote, call.own_number))
    path = (f"/download.lua?path=/data/tam/rec/rec.0.{call.id:03d}"
            if call.port in MACHINE_PORTS and call.duration_seconds else "")
    fields = [
        ("Id", str(call.id)), ("Type", str(call.type)), ("Caller", caller),
        ("Called", called),
        ("CallerNumber" if outgoing else "CalledNumber", call.own_number),
        ("Name", call.name), ("Numbertype", "sip"), ("Device", call.device),
        ("Port", call.port), ("Date", call.date.strftime("%d.%m.%y %H:%M")),
        ("Duration", render_duration(call.duration_seconds)), ("Count", ""), ("Path", path),
    ]
    return "<Call>" + "".join(f"<{name}>{escape(value)}</{name}>" if value else f"<{name} />"
                              for name, value in fields) + "</Call>"


def render_call_list(timestamp: int, calls: list[ListedCall]) -> bytes:
    """The document ``calllist.lua`` answers (``calls`` newest first)."""
    return ('<?xml version="1.0" encoding="utf-8"?>\n<root>\n'
            f"<timestamp>{timestamp}</timestamp>\n"
            + "".join(render_call(call) + "\n" for call in calls)
            + "</root>\n").encode()


DEVICE_DESCRIPTION = f"""<?xml version="1.0"?>
<root xmlns="urn:dslforum-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<systemVersion><HW>226</HW><Major>154</Major><Minor>7</Minor><Patch>57</Patch>
<Display>154.07.57</Display></systemVersion>
<device>
<deviceType>urn:dslforum-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>FRITZ!Box 7590 (dpvoip fake)</friendlyName>
<manufacturer>AVM</manufacturer>
<manufacturerURL>http://www.avm.de</manufacturerURL>
<modelDescription>FRITZ!Box 7590</modelDescription>
<modelName>FRITZ!Box 7590</modelName>
<modelNumber>avm</modelNumber>
<UDN>uuid:739f2409-bccb-40e7-8e6c-3431C4A1B2C3</UDN>
<serviceList>
<service>
<serviceType>urn:dslforum-org:service:DeviceInfo:1</serviceType>
<serviceId>urn:DeviceInfo-com:serviceId:DeviceInfo1</serviceId>
<controlURL>/upnp/control/deviceinfo</controlURL>
<eventSubURL>/upnp/control/deviceinfo</eventSubURL>
<SCPDURL>/deviceinfoSCPD.xml</SCPDURL>
</service>
<service>
<serviceType>{ONTEL}</serviceType>
<serviceId>urn:X_AVM-DE_OnTel-com:serviceId:X_AVM-DE_OnTel1</serviceId>
<controlURL>{CONTROL_URL}</controlURL>
<eventSubURL>{CONTROL_URL}</eventSubURL>
<SCPDURL>/x_contactSCPD.xml</SCPDURL>
</service>
</serviceList>
</device>
</root>
""".encode()


def _envelope(body: str, header: str = "") -> bytes:
    head = f"<s:Header>{header}</s:Header>" if header else ""
    return (f'<?xml version="1.0"?>\n<s:Envelope xmlns:s="{SOAP_ENVELOPE}" '
            f's:encodingStyle="{SOAP_ENCODING}">{head}<s:Body>{body}</s:Body>'
            "</s:Envelope>").encode()


def _fault(code: int, description: str) -> str:
    return ("<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
            '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
            f"<errorCode>{code}</errorCode><errorDescription>{description}"
            "</errorDescription></UPnPError></detail></s:Fault>")


def _challenge_header(tag: str, status: str, nonce: str) -> str:
    return (f'<h:{tag} xmlns:h="{SOAP_AUTH}" s:mustUnderstand="1"><Status>{status}</Status>'
            f"<Nonce>{nonce}</Nonce><Realm>{REALM}</Realm></h:{tag}>")


@dataclass
class _Nonce:
    value: str
    issued: float
    uses: int = 0
    last_nc: int = 0


@dataclass(frozen=True)
class _Reply:
    code: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


# -- the box ----------------------------------------------------------------------------------


class FakeTr064Box:
    """A Fritz!Box's TR-064 side, for tests and the simulator.

    ``user``/``password``: the only login accepted. ``digest=False``: the box offers no
    HTTP Digest (a request without a login gets 401 with no challenge) and speaks the
    in-SOAP InitChallenge/ClientAuth instead. A nonce serves ``nonce_uses`` requests or
    ``nonce_seconds`` seconds, then is answered as stale.
    """

    def __init__(self, reactor: Any, user: str, password: str, tls: bool = True,
                 certificate: BoxCertificate | None = None, *, digest: bool = True,
                 nonce_uses: int = 100, nonce_seconds: float = 300.0,
                 clock: IReactorTime | None = None,
                 now: Callable[[], dt.datetime] | None = None,
                 list_host: str = "fritz.box") -> None:
        self._reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.user = user
        self.password = password
        self.tls = tls
        self.digest = digest
        self.nonce_uses = nonce_uses
        self.nonce_seconds = nonce_seconds
        self.list_host = list_host
        self._now = now if now is not None else self._local_now
        self.certificate = certificate if certificate is not None else make_certificate(
            dt.datetime.fromtimestamp(self.clock.seconds(), dt.UTC))
        self.fingerprint = self.certificate.fingerprint
        self.timestamp = int(self.clock.seconds())
        """The list's ``<timestamp>``: changes only when the list is reset."""
        self.calls: list[ListedCall] = []
        """The list, oldest first (rendered newest first)."""
        self.failure: str | None = None
        self.port: int | None = None
        # what tests look at
        self.requests_seen = 0
        self.paths: list[str] = []          # paths requested, without query (no sid)
        self.authorization_headers = 0      # requests carrying an Authorization header
        self.client_auths = 0               # in-SOAP ClientAuth headers received
        self.list_queries: list[dict[str, str]] = []   # list parameters, sid left out
        self.stale_answers = 0
        self._next_id = 1
        self._nonces: dict[str, _Nonce] = {}
        self._sessions: set[str] = set()
        self._held: EmptyableSet[Request] = EmptyableSet()
        self._listening: IListeningPort | None = None
        self._connections: _Connections | None = None

    def _local_now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.seconds())

    # -- the list, as the scenario changes it

    def add(self, entry: ListedCall) -> ListedCall:
        """Put a call into the list under the next id (as the box numbers them)."""
        entry = replace(entry, id=self._next_id)
        self._next_id += 1
        self.calls.append(entry)
        return entry

    def call(self, type: int, remote: str, date: dt.datetime, duration_seconds: int = 0, *,
             own_number: str = "", name: str = "", device: str = "",
             port: str = "") -> ListedCall:
        """Build and ``add`` an entry (a box's list holds minutes: seconds are dropped)."""
        return self.add(ListedCall(0, type, remote, own_number, name, device, port,
                                   date.replace(second=0, microsecond=0), duration_seconds))

    def change(self, entry: ListedCall) -> None:
        """Replace the entry of the same id (an active call that ended)."""
        for index, existing in enumerate(self.calls):
            if existing.id == entry.id:
                self.calls[index] = entry
                return
        raise KeyError(f"no entry {entry.id} in the fake box's list")

    def reset(self) -> None:
        """The list cleared on the box: ids start at 1 again, the timestamp changes."""
        self.calls.clear()
        self._next_id = 1
        self.timestamp = max(self.timestamp + 1, int(self.clock.seconds()))

    def fail_with(self, kind: str | None) -> None:
        """From now on: ``auth`` (every login refused), ``rights`` (UPnP 606), ``locked``
        (HTTP 503), ``garbage`` (the SOAP answer is not XML), ``garbage_list`` (the list
        is not XML), ``slow`` (the SOAP answer never comes); None: behave again."""
        if kind is not None and kind not in FAILURES:
            raise ValueError(f"unknown failure {kind!r}; one of {', '.join(FAILURES)}")
        self.failure = kind

    def listing(self, days: int | None = None, max_entries: int | None = None,
                since: tuple[int, int] | None = None) -> list[ListedCall]:
        """The entries ``calllist.lua`` gives for these parameters, newest first."""
        calls = sorted(self.calls, key=lambda call: (call.date, call.id), reverse=True)
        if since is not None and since[1] == self.timestamp:
            calls = [call for call in calls if call.id > since[0]]
        if days is not None:
            start = self._now() - dt.timedelta(days=days)
            calls = [call for call in calls if call.date >= start]
        if max_entries is not None:
            calls = calls[:max(max_entries, 0)]
        return calls

    # -- serving

    @property
    def held(self) -> int:
        """Requests held open now (``slow``)."""
        return len(self._held)

    @property
    def open_connections(self) -> int:
        return 0 if self._connections is None else len(self._connections.open)

    def listen(self, port: int = 0, interface: str = LOOPBACK) -> Deferred[int]:
        """Listen (TLS or not) and fire with the port number."""
        site = _QuietSite(_BoxResource(self))
        site.noisy = False
        self._connections = _Connections(site)
        if self.tls:
            endpoint: Any = SSL4ServerEndpoint(self._reactor, port,
                                               _ServerContext(self.certificate),
                                               interface=interface)
        else:
            endpoint = TCP4ServerEndpoint(self._reactor, port, interface=interface)
        listening: Deferred[IListeningPort] = endpoint.listen(self._connections)

        def keep(listener: IListeningPort) -> int:
            self._listening = listener
            address: Any = listener.getHost()
            self.port = int(address.port)
            return self.port

        return listening.addCallback(keep)

    def stop(self) -> Deferred[None]:
        """Stop listening and close every connection (held ones are dropped); fires when
        all are gone, so a test ends with a clean reactor."""
        waiting: list[Deferred[Any]] = []
        if self._listening is not None:
            waiting.append(maybeDeferred(self._listening.stopListening))
            self._listening = None
        if self._connections is not None:
            for wrapper in self._connections.open:
                transport: Any = wrapper.transport
                if transport is not None:
                    transport.abortConnection()
            waiting.append(self._connections.open.when_empty())
        # a connection is forgotten before its request hears of the loss
        waiting.append(self._held.when_empty())
        done: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # -- one request

    def handle(self, request: Request) -> bytes | int:
        self.requests_seen += 1
        path = (request.path or b"").decode("latin-1")
        self.paths.append(path)
        if request.getHeader("authorization") is not None:
            self.authorization_headers += 1
        if self.failure == "locked":
            return self._send(request, _Reply(503, b"<html>Service Unavailable</html>"))
        method = request.method.decode("latin-1")
        if path == DESCRIPTION_PATH and method == "GET":
            reply = _Reply(200, DEVICE_DESCRIPTION)
        elif path == CONTROL_URL and method == "POST":
            if self.failure == "slow":
                self._hold(request)
                return NOT_DONE_YET
            reply = self._control(request)
        elif path == LIST_PATH and method == "GET":
            reply = self._list(request)
        else:
            reply = _Reply(404, b"<html>Not Found</html>")
        return self._send(request, reply)

    def _send(self, request: Request, reply: _Reply) -> bytes:
        request.setResponseCode(reply.code)
        request.setHeader(b"Content-Type", b'text/xml; charset="utf-8"')
        for name, value in reply.headers:
            request.setHeader(name.encode(), value.encode())
        return reply.body

    def _hold(self, request: Request) -> None:
        self._held.add(request)

        def forget(_: Failure | None) -> None:
            self._held.discard(request)

        request.notifyFinish().addBoth(forget)

    # -- the SOAP control URL

    def _control(self, request: Request) -> _Reply:
        content = request.content.read() if request.content is not None else b""
        try:
            header, body = read_envelope(content)
        except SoapError:
            return _Reply(500, _envelope(_fault(401, "Invalid Action")))
        if self.digest:
            refused = self._digest_login(request)
            if refused is not None:
                return refused
            auth_header = ""
        else:
            outcome = self._soap_login(header)
            if isinstance(outcome, _Reply):
                return outcome
            auth_header = outcome
        action = next(iter(body), None)
        if action is None or local(action.tag) != "GetCallList" or \
                not action.tag.startswith("{" + ONTEL + "}"):
            return _Reply(500, _envelope(_fault(401, "Invalid Action"), auth_header))
        if self.failure == "rights":
            return _Reply(500, _envelope(_fault(606, "Action Not Authorized"), auth_header))
        if self.failure == "garbage":
            return _Reply(200, b"<s:Envelope><s:Body><u:GetCallListResponse>&nbsp;<")
        session = secrets.token_hex(8)
        self._sessions.add(session)
        scheme = "https" if self.tls else "http"
        location = f"{scheme}://{self.list_host}:{self.port}{LIST_PATH}?sid={session}"
        return _Reply(200, _envelope(
            f'<u:GetCallListResponse xmlns:u="{ONTEL}"><NewCallListURL>{escape(location)}'
            "</NewCallListURL></u:GetCallListResponse>", auth_header))

    def _digest_login(self, request: Request) -> _Reply | None:
        """None when the request carries a valid Digest answer, else the 401 to send."""
        value = request.getHeader("authorization")
        if value is None or self.failure == "auth":
            return self._unauthorized(stale=False)
        try:
            credentials = parse_authorization(value)
        except DigestError:
            return self._unauthorized(stale=False)
        nonce = None if credentials is None else self._nonces.get(credentials.nonce)
        if credentials is None or nonce is None:
            return self._unauthorized(stale=False)
        challenge = Challenge(REALM, nonce.value, ("auth",))
        if (credentials.username != self.user
                or not verify(credentials, self.password, challenge, "POST")
                or credentials.nc is None or credentials.nc <= nonce.last_nc):
            return self._unauthorized(stale=False)
        if self._expired(nonce):
            del self._nonces[nonce.value]
            self.stale_answers += 1
            return self._unauthorized(stale=True)
        nonce.uses += 1
        nonce.last_nc = credentials.nc
        return None

    def _expired(self, nonce: _Nonce) -> bool:
        return (nonce.uses >= self.nonce_uses
                or self.clock.seconds() - nonce.issued >= self.nonce_seconds)

    def _new_nonce(self) -> str:
        value = secrets.token_hex(8).upper()
        self._nonces[value] = _Nonce(value, self.clock.seconds())
        return value

    def _unauthorized(self, stale: bool) -> _Reply:
        challenge = Challenge(REALM, self._new_nonce(), ("auth",), stale=stale)
        return _Reply(401, b"<html>401 Unauthorized</html>",
                      (("WWW-Authenticate", challenge.header()),))

    def _soap_login(self, header: Element | None) -> _Reply | str:
        """TR-064's in-SOAP login: the ``NextChallenge`` header for the answer when the
        ClientAuth is right, else the reply that refuses it."""
        init = None if header is None else child(header, "InitChallenge")
        auth = None if header is None else child(header, "ClientAuth")
        if auth is not None:
            self.client_auths += 1
            nonce = self._nonces.pop(text(auth, "Nonce"), None)
            expected = None if nonce is None else soap_auth(self.user, REALM, self.password,
                                                            nonce.value)
            if (self.failure != "auth" and nonce is not None and expected is not None
                    and text(auth, "UserID") == self.user
                    and secrets.compare_digest(text(auth, "Auth").lower(), expected)
                    and not self._expired(nonce)):
                return _challenge_header("NextChallenge", "Authenticated", self._new_nonce())
        elif init is None:
            return _Reply(401, b"<html>401 Unauthorized</html>")
        return _Reply(500, _envelope(_fault(503, "Auth. failed"), _challenge_header(
            "Challenge", "Unauthenticated", self._new_nonce())))

    # -- the call list URL

    def _list(self, request: Request) -> _Reply:
        query = dict(parse_qsl((request.uri or b"").partition(b"?")[2].decode("latin-1")))
        session = query.pop("sid", "")
        self.list_queries.append(query)
        if session not in self._sessions:
            return _Reply(403, b"<html>403 Forbidden</html>")
        if self.failure == "garbage_list":
            return _Reply(200, b"<root><timestamp>1</timestamp><Call><Id>1<")
        try:
            days = int(query["days"]) if "days" in query else None
            most = int(query["max"]) if "max" in query else None
            since = ((int(query["id"]), int(query["timestamp"]))
                     if "id" in query and "timestamp" in query else None)
        except ValueError:
            return _Reply(400, b"<html>400 Bad Request</html>")
        return _Reply(200, render_call_list(self.timestamp, self.listing(days, most, since)))


class _BoxResource(Resource):
    """Every path: a leaf, so that the box sees the raw path."""

    isLeaf = True

    def __init__(self, box: FakeTr064Box) -> None:
        super().__init__()
        self.box = box

    def render(self, request: Request) -> bytes | int:
        return self.box.handle(request)


class _QuietSite(Site):
    """No access log: a box logs nothing into dpvoip's log (and the list URL's query
    holds the session id)."""

    def log(self, request: http.Request) -> None:
        pass


@implementer(IOpenSSLContextFactory)
class _ServerContext:
    """The box's TLS context (TLS 1.2 or later), built from cryptography's objects (the
    pyOpenSSL ones Twisted's ``CertificateOptions`` takes are deprecated)."""

    def __init__(self, certificate: BoxCertificate) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate(x509.load_pem_x509_certificate(certificate.certificate_pem))
        key = serialization.load_pem_private_key(certificate.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        context.use_privatekey(key)
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


class _Connections(WrappingFactory):
    """The site's connections, so that ``stop`` can close them and wait."""

    def __init__(self, factory: Site) -> None:
        super().__init__(factory)
        self.open: EmptyableSet[ProtocolWrapper] = EmptyableSet()

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self.open.add(p)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self.open.discard(p)
