"""TR-064 on the wire: the Fritz!Box's call list over SOAP, HTTP Digest and a pinned TLS
certificate.

One call, ``Tr064Client.call_list``: the SOAP action ``GetCallList`` of the OnTel service
answers with a ``NewCallListURL`` (a session id in its query), which is fetched with the
``days``/``max``/``id``+``timestamp`` parameters and parsed by the pure
``dpvoip.fritzbox.calllist``. Everything that can go wrong ends as one ``Tr064Error`` whose
``kind`` the caller counts and shows, and whose ``advice`` tells the administrator what to
do; the CallMonitor path never sees an exception from here.

- Authentication: HTTP Digest (``dpvoip.protocols.digest``). The nonce is remembered, so
  later requests carry the next ``nc`` without a 401 round trip; a ``stale=true`` challenge
  is taken once; a 401 right after answering a fresh challenge is ``auth``. A box that
  offers no Digest challenge is asked with TR-064's in-SOAP InitChallenge/ClientAuth.
- TLS: a box's certificate is self-signed for ``fritz.box``, so no CA or name is checked;
  the SHA-256 fingerprint of its certificate is compared with the pin at the handshake
  (``PinnedCertificatePolicy``), before any request byte (and so any credential) leaves,
  and the fingerprint seen is exposed for pinning on first use.
- Bounds: one deadline (``timeout``) per request covers connect, request and body; bodies
  are read with a cap, the connection aborted beyond it.
- Secrets: the password, the Digest response and the list URL (its ``sid``) appear in no
  log line and no exception text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives.serialization import Encoding
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from zope.interface import implementer

from dpvoip.config import Secret
from dpvoip.core.errors import summary
from dpvoip.deferreds import within
from dpvoip.fritzbox.calllist import MAX_BYTES, CallList, CallListError, parse_call_list
from dpvoip.http_body import BodyTooBig, read_body
from dpvoip.internals import QuietHTTPConnectionPool
from dpvoip.protocols.digest import (
    Challenge,
    DigestError,
    DigestState,
    new_cnonce,
    parse_challenge,
    soap_auth,
)

ONTEL = "urn:dslforum-org:service:X_AVM-DE_OnTel:1"
CONTROL_URL = "/upnp/control/x_contact"
SOAP_ENVELOPE = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
SOAP_AUTH = "http://soap-authentication.org/digest/2001/10/"
#: A SOAP answer of the box is a few hundred bytes.
MAX_SOAP_BYTES = 65_536

KINDS = ("auth", "rights", "locked", "tls", "timeout", "unreachable", "bad_answer")

_ADVICE = {
    "auth": "check the box's tr064_user and tr064_password (the box refused them); after "
            "several failures the box locks TR-064 logins for a while",
    "rights": "give the TR-064 user the box's right \"Voice messages, faxes, FRITZ!App Fon "
              "and call list\" (System > FRITZ!Box Users) and turn on \"Allow access for "
              "applications\" (Home Network > Network > Network Settings)",
    "locked": "the box has locked TR-064 logins after failed attempts: wait for the "
              "lock-out to end (minutes), and check tr064_password meanwhile",
    "tls": "compare the fingerprint with the one `dpvoip check` shows and with the box's "
           "own certificate (Internet > Permit Access > FRITZ!Box Services); if the box "
           "was reset or renewed its certificate, set tr064_certificate to the new one",
    "timeout": "check that the box answers TR-064 on this host and port (49443 with TLS, "
               "49000 without) and that nothing in between drops the connection",
    "unreachable": "check the host name, the TR-064 port (49443 with TLS, 49000 without) "
                   "and that \"Allow access for applications\" is on in the box",
    "bad_answer": "check that host and tr064_port point at a Fritz!Box's TR-064 port "
                  "(not its web interface or another device)",
}


class Tr064Error(Exception):
    """A call-list request that did not succeed.

    ``kind`` is one of ``KINDS`` (what the caller counts and shows); ``advice`` is one line
    for the administrator. The message says what happened and holds no secret.
    """

    def __init__(self, kind: str, message: str, advice: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown TR-064 error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.advice = advice if advice is not None else _ADVICE[kind]


# -- SOAP, pure ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SoapChallenge:
    """TR-064's in-SOAP authentication state in an answer's header (``Challenge`` or
    ``NextChallenge``)."""

    status: str
    nonce: str
    realm: str


@dataclass(frozen=True)
class SoapAnswer:
    """An action's answer: its out arguments, or the UPnP fault, and the in-SOAP
    challenge when the header carried one."""

    values: Mapping[str, str]
    fault: tuple[int, str] | None = None
    challenge: SoapChallenge | None = None


def soap_request(action: str, service: str, arguments: Mapping[str, str] | None = None,
                 header: str = "") -> bytes:
    """A SOAP 1.1 envelope calling ``action`` of ``service`` (header XML as given)."""
    args = "".join(f"<{name}>{escape(value)}</{name}>"
                   for name, value in (arguments or {}).items())
    head = f"<s:Header>{header}</s:Header>" if header else ""
    return (f'<?xml version="1.0" encoding="utf-8"?>\n'
            f'<s:Envelope xmlns:s="{SOAP_ENVELOPE}" s:encodingStyle="{SOAP_ENCODING}">'
            f'{head}<s:Body><u:{action} xmlns:u="{escape(service, {chr(34): "&quot;"})}">'
            f"{args}</u:{action}></s:Body></s:Envelope>").encode()


def init_challenge(user: str) -> str:
    """The SOAP header asking for an in-SOAP challenge."""
    return (f'<h:InitChallenge xmlns:h="{SOAP_AUTH}" s:mustUnderstand="1">'
            f"<UserID>{escape(user)}</UserID></h:InitChallenge>")


def client_auth(user: str, password: str, realm: str, nonce: str) -> str:
    """The SOAP header answering an in-SOAP challenge."""
    return (f'<h:ClientAuth xmlns:h="{SOAP_AUTH}" s:mustUnderstand="1">'
            f"<Nonce>{escape(nonce)}</Nonce>"
            f"<Auth>{soap_auth(user, realm, password, nonce)}</Auth>"
            f"<UserID>{escape(user)}</UserID><Realm>{escape(realm)}</Realm></h:ClientAuth>")


class SoapError(ValueError):
    """Not a SOAP envelope."""


def read_envelope(data: bytes) -> tuple[Element | None, Element]:
    """The Header (if any) and the Body of a SOAP envelope; ``SoapError`` otherwise."""
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException:
        raise SoapError("a DTD or entities in a SOAP envelope") from None
    except ParseError:
        raise SoapError("not XML") from None
    if local(root.tag) != "Envelope":
        raise SoapError("not a SOAP envelope")
    header = child(root, "Header")
    body = child(root, "Body")
    if body is None:
        raise SoapError("a SOAP envelope without a Body")
    return header, body


def read_soap(data: bytes) -> SoapAnswer:
    """A SOAP answer of the box; ``SoapError`` when it is none."""
    header, body = read_envelope(data)
    challenge = None
    for element in header if header is not None else ():
        nonce = text(element, "Nonce")
        if nonce:
            challenge = SoapChallenge(text(element, "Status"), nonce, text(element, "Realm"))
    first = next(iter(body), None)
    if first is None:
        return SoapAnswer({}, None, challenge)
    if local(first.tag) == "Fault":
        code = next((node.text or "" for node in first.iter() if local(node.tag) == "errorCode"),
                    "").strip()
        description = next((node.text or "" for node in first.iter()
                            if local(node.tag) == "errorDescription"), "").strip()
        return SoapAnswer({}, (int(code) if code.isdigit() else 0, description[:100]),
                          challenge)
    return SoapAnswer({local(node.tag): (node.text or "").strip() for node in first}, None,
                      challenge)


def local(tag: str) -> str:
    """A tag without its ``{namespace}``."""
    return tag.rpartition("}")[2]


def child(parent: Element, name: str) -> Element | None:
    """``parent``'s first child of local name ``name``."""
    return next((node for node in parent if local(node.tag) == name), None)


def text(parent: Element, name: str) -> str:
    found = child(parent, name)
    return "" if found is None else (found.text or "").strip()


# -- TLS: the pinned certificate -----------------------------------------------------------


def normalise_fingerprint(fingerprint: str | None) -> str:
    """Lower-case hex without colons ('' for none)."""
    return (fingerprint or "").replace(":", "").strip().lower()


def certificate_fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as ``certificate`` gives it."""
    return hashlib.sha256(der).hexdigest()


@implementer(IPolicyForHTTPS)
class PinnedCertificatePolicy:
    """TLS for a Fritz!Box: any certificate when nothing is pinned, else only the pinned
    one; the fingerprint of each certificate seen is remembered (``seen``) and one that
    was refused too (``refused``). The check is in OpenSSL's verify callback, so a
    refused handshake ends before the HTTP request is sent."""

    def __init__(self, pinned: str | None = None) -> None:
        self.pinned = normalise_fingerprint(pinned) or None
        self.seen: str | None = None
        self.refused: str | None = None
        options = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2)
        self._context: SSL.Context = options.getContext()
        self._context.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(self, connection: SSL.Connection, certificate: Any, error: int, depth: int,
                ok: int) -> bool:
        if depth != 0:
            return True  # a chain's issuers: only the box's own certificate is pinned
        fingerprint = certificate_fingerprint(
            certificate.to_cryptography().public_bytes(Encoding.DER))
        self.seen = fingerprint
        if self.pinned is not None and fingerprint != self.pinned:
            self.refused = fingerprint
            return False
        return True

    def creatorForNetloc(self, hostname: bytes, port: int) -> _PinnedCreator:
        return _PinnedCreator(self._context)


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedCreator:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


# -- the client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    code: int
    headers: Mapping[str, list[str]]
    body: bytes


class Tr064Client:
    """A Fritz!Box's call list over TR-064 (one box, one user)."""

    def __init__(self, reactor: Any, host: str, port: int, user: str, password: Secret,
                 tls: bool = True, pinned: str | None = None, timeout: float = 10.0,
                 cnonce: Callable[[], str] | None = None,
                 agent: IAgent | None = None) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._user = user
        self._password = password
        self._tls = tls
        self._timeout = timeout
        self._cnonce = cnonce or new_cnonce
        self._policy: PinnedCertificatePolicy | None = None
        if agent is None:
            self._policy = PinnedCertificatePolicy(pinned)
            # Not persistent: a request every few minutes does not need a kept connection,
            # and none is left open between them. Quiet: no "Starting factory" lines.
            agent = Agent(reactor, contextFactory=self._policy,
                          pool=QuietHTTPConnectionPool(reactor, persistent=False),
                          connectTimeout=timeout)
        self._http = HTTPClient(agent)
        self._digest: DigestState | None = None
        self._in_soap = False        # the box offered no Digest: TR-064's own scheme
        self._soap_challenge: SoapChallenge | None = None
        self._origin = f"{'https' if tls else 'http'}://{_netloc(host, port)}"

    @property
    def certificate(self) -> str | None:
        """The SHA-256 fingerprint (hex) of the box's certificate last seen, for pinning
        on first use; None before a TLS handshake (or with an injected agent)."""
        return None if self._policy is None else self._policy.seen

    async def call_list(self, days: int | None = None, max_entries: int | None = None,
                        since: tuple[int, int] | None = None) -> CallList:
        """The box's call list; ``since`` = (last id, list timestamp): only the entries
        newer than that id, when the list still has that timestamp."""
        answer = await self._action("GetCallList")
        location = answer.values.get("NewCallListURL", "")
        if not location:
            raise Tr064Error("bad_answer", "the box's GetCallList answer has no "
                                           "NewCallListURL")
        params: dict[str, int] = {}
        if days is not None:
            params["days"] = days
        if max_entries is not None:
            params["max"] = max_entries
        if since is not None:
            params["id"], params["timestamp"] = since
        url = self._list_url(location, params)
        listed = await self._exchange("GET", url, {}, None, MAX_BYTES, "the call list")
        if listed.code == 503:
            raise Tr064Error("locked", "the box answered the call list with HTTP 503")
        if listed.code != 200:
            raise Tr064Error("bad_answer",
                             f"the box answered the call list with HTTP {listed.code}")
        try:
            return parse_call_list(listed.body)
        except CallListError as error:
            raise Tr064Error("bad_answer", f"the box's call list is unusable: {error}") from None

    def _list_url(self, location: str, params: Mapping[str, int]) -> str:
        """The list's URL on our host and port (a box names itself ``fritz.box``), with
        the parameters added to its query (the session id)."""
        try:
            parts = urlsplit(location)
        except ValueError:
            raise Tr064Error("bad_answer", "the box's NewCallListURL is not a URL") from None
        path = parts.path if parts.path.startswith("/") else "/" + parts.path
        query = "&".join(part for part in (parts.query, urlencode(params)) if part)
        return self._origin + path + ("?" + query if query else "")

    # -- SOAP with authentication

    async def _action(self, action: str) -> SoapAnswer:
        """Call ``action`` on the OnTel service, authenticating as the box asks."""
        answered_fresh = False   # a challenge received in this call was answered
        took_stale = False
        for _ in range(6):
            headers = {"Content-Type": ['text/xml; charset="utf-8"'],
                       "SOAPAction": [f'"{ONTEL}#{action}"']}
            soap_header = ""
            if self._in_soap:
                challenge = self._soap_challenge
                soap_header = (init_challenge(self._user) if challenge is None else client_auth(
                    self._user, self._password.reveal(), challenge.realm, challenge.nonce))
            elif self._digest is not None:
                headers["Authorization"] = [self._authorization()]
            answer = await self._exchange("POST", self._origin + CONTROL_URL, headers,
                                          soap_request(action, ONTEL, header=soap_header),
                                          MAX_SOAP_BYTES, "the SOAP action")
            if answer.code == 503:
                raise Tr064Error("locked", "the box answered HTTP 503 (TR-064 locked)")
            if answer.code == 401:
                challenge_ = self._challenge(answer)
                if challenge_ is None:
                    if self._in_soap:
                        raise Tr064Error("auth", "the box refused TR-064's in-SOAP login "
                                                 "(HTTP 401)")
                    self._in_soap, self._digest = True, None
                    continue
                self._in_soap = False  # it offers Digest (again)
                if challenge_.stale and not took_stale:
                    took_stale = True
                elif answered_fresh:
                    raise Tr064Error("auth", "the box refused the TR-064 user or password "
                                             "(HTTP 401)")
                answered_fresh = True
                self._digest = DigestState(challenge_, self._cnonce)
                continue
            soap = self._read(answer)
            if self._in_soap and soap.challenge is not None:
                sent_answer = self._soap_challenge is not None
                self._soap_challenge = soap.challenge
                if soap.challenge.status.lower() != "authenticated":
                    if sent_answer and answered_fresh:
                        raise Tr064Error("auth", "the box refused the TR-064 user or "
                                                 "password (in-SOAP login)")
                    answered_fresh = True
                    continue
            return self._checked(soap, answer.code)
        raise Tr064Error("auth", "the box kept asking for a new login")

    def _authorization(self) -> str:
        assert self._digest is not None
        try:
            return self._digest.authorization(self._user, self._password.reveal(), "POST",
                                              CONTROL_URL)
        except DigestError as error:
            raise Tr064Error("auth", f"cannot log in: {error}",
                             "tr064_user must be a plain user name") from None

    @staticmethod
    def _challenge(answer: _Answer) -> Challenge | None:
        try:
            return parse_challenge(answer.headers.get("www-authenticate", []))
        except DigestError as error:
            raise Tr064Error("bad_answer", f"the box's login challenge is unusable: {error}"
                             ) from None

    @staticmethod
    def _read(answer: _Answer) -> SoapAnswer:
        try:
            return read_soap(answer.body)
        except SoapError as error:
            raise Tr064Error("bad_answer", f"the box's SOAP answer (HTTP {answer.code}) is "
                                           f"unusable: {error}") from None

    @staticmethod
    def _checked(soap: SoapAnswer, code: int) -> SoapAnswer:
        if soap.fault is not None:
            fault, description = soap.fault
            if fault == 606:
                raise Tr064Error("rights", "the box refused the call list to this user "
                                           "(UPnP error 606, action not authorized)")
            raise Tr064Error("bad_answer", f"the box refused GetCallList: UPnP error "
                                           f"{fault} {description!r}")
        if code != 200:
            raise Tr064Error("bad_answer", f"the box answered the SOAP action with HTTP {code}")
        return soap

    # -- one HTTP exchange, bounded

    async def _exchange(self, method: str, url: str, headers: dict[str, list[str]],
                        data: bytes | None, limit: int, what: str) -> _Answer:
        if self._policy is not None:
            self._policy.refused = None
        work = Deferred.fromCoroutine(self._request(method, url, headers, data, limit))
        try:
            return await within(self._reactor, work, self._timeout, cancel_work=True)
        except CancelledError:
            raise  # our caller gave up (a stopping service): not the box's failure
        except defer.TimeoutError:
            raise Tr064Error("timeout", f"the box did not answer {what} within "
                                        f"{self._timeout:g} s") from None
        except BodyTooBig:
            raise Tr064Error("bad_answer", f"the box's answer to {what} is larger than "
                                           f"{limit} bytes") from None
        except Tr064Error:
            raise
        except Exception as error:
            if any(isinstance(reason, CancelledError) for reason in _reasons(error)):
                # the cancelled request failed first, wrapped by the Agent
                raise CancelledError() from None
            raise self._transport_error(error, what) from None

    async def _request(self, method: str, url: str, headers: dict[str, list[str]],
                       data: bytes | None, limit: int) -> _Answer:
        response = await self._http.request(method, url, headers=Headers(headers), data=data,
                                            allow_redirects=False, unbuffered=True)
        body = await read_body(response, limit)
        raw = {name.decode("latin-1").lower(): [value.decode("latin-1") for value in values]
               for name, values in response.headers.getAllRawHeaders()}
        return _Answer(response.code, raw, body)

    def _transport_error(self, error: Exception, what: str) -> Tr064Error:
        """What a failure below HTTP is shown as (never with the URL: it holds the sid)."""
        policy = self._policy
        if policy is not None and policy.refused is not None:
            return Tr064Error("tls", f"the box's TLS certificate {policy.refused} is not the "
                                     f"pinned one {policy.pinned}")
        if _tls_failure(error):
            return Tr064Error("tls", f"the TLS handshake with the box failed "
                                     f"({_first_reason(error)})")
        if isinstance(error, DNSLookupError):
            return Tr064Error("unreachable", f"the box's host name {self._host!r} does not "
                                             "resolve")
        if isinstance(error, ConnectError):
            return Tr064Error("unreachable", f"cannot connect to the box's TR-064 port "
                                             f"{self._port}: {summary(error)}")
        return Tr064Error("unreachable", f"the connection to the box broke during {what}: "
                                         f"{_first_reason(error)}")


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _reasons(error: Exception) -> list[BaseException]:
    """The failures an Agent error wraps (ResponseFailed, ResponseNeverReceived,
    RequestTransmissionFailed carry ``reasons``), or the error itself."""
    wrapped = getattr(error, "reasons", None)
    if isinstance(wrapped, list):
        return [reason.value for reason in wrapped
                if isinstance(reason, Failure) and reason.value is not None]
    return [error]


def _tls_failure(error: Exception) -> bool:
    return any(isinstance(reason, SSL.Error) for reason in _reasons(error))


def _first_reason(error: Exception) -> str:
    for reason in _reasons(error):
        line = summary(reason)
        if line:
            return line[:200]
    return type(error).__name__
