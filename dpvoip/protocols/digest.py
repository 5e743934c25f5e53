"""HTTP Digest authentication (RFC 7616: MD5, qop=auth) and TR-064's in-SOAP hash.

Pure: header text in, header text out. No maintained Digest implementation exists for
treq or Twisted (treq's issue #389 is open, its pull request #84 was closed unmerged), so
this is a small one, checked against RFC 7616 section 3.9.1's MD5 example and the
Fritz!Box vector of the specification.

A Fritz!Box answers TR-064 requests with ``WWW-Authenticate: Digest realm="F!Box
SOAP-Auth", nonce=..., algorithm=MD5, qop="auth"``. ``parse_challenge`` reads that
(among other schemes, quoted strings with escaped quotes and commas), ``DigestState``
keeps the nonce and counts ``nc`` for the requests that follow, and ``verify`` is the
server's side (the fake box). MD5 is what the box speaks; it is not used here to store
anything. Credentials are arguments, never attributes, so no state's ``repr`` can show
them, and no error message here carries a password, a hash or a nonce.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

#: The longest header this module reads: a box's challenge is about 150 bytes.
MAX_HEADER = 8192

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_SPACE = re.compile(r"[ \t]*")


class DigestError(ValueError):
    """A challenge or an authorization that cannot be used; the message says why (and
    never holds a credential)."""


def md5_hex(text: str) -> str:
    """MD5 of UTF-8 ``text`` as 32 lower-case hex digits (the hash Digest-MD5 and TR-064
    prescribe; not used for anything dpvoip stores)."""
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def soap_auth(user: str, realm: str, password: str, nonce: str) -> str:
    """TR-064's in-SOAP ``Auth``: ``MD5(MD5(user:realm:password) + ":" + nonce)``."""
    return md5_hex(md5_hex(f"{user}:{realm}:{password}") + ":" + nonce)


# -- reading header parameters ------------------------------------------------------------


def parse_params(text: str) -> list[tuple[str, dict[str, str]]]:
    """The challenges (or credentials) of one header value, as (scheme, parameters) in
    order; parameter names lower-cased, quoted values unescaped.

    ``Basic realm="a, b", Digest realm="x", nonce="y"`` gives two. A scheme's token68
    (``Bearer abc==``) is skipped. Raises ``DigestError`` on text that is no header.
    """
    if len(text) > MAX_HEADER:
        raise DigestError("the authentication header is too long")
    found: list[tuple[str, dict[str, str]]] = []
    position = 0
    while True:
        position = _skip(text, position, " \t,")
        if position >= len(text):
            return found
        token = _TOKEN.match(text, position)
        if token is None:
            raise DigestError(f"unexpected character in an authentication header at "
                              f"offset {position}")
        position = _skip(text, token.end(), " \t")
        if position < len(text) and text[position] == "=" and found:
            # a parameter of the current scheme
            position = _skip(text, position + 1, " \t")
            value, position = _value(text, position)
            found[-1][1][token.group().lower()] = value
        else:
            found.append((token.group(), {}))


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _value(text: str, position: int) -> tuple[str, int]:
    """A quoted string (unescaped) or a token at ``position``; a token68's trailing ``=``
    are part of it."""
    quoted = _QUOTED.match(text, position)
    if quoted is not None:
        return re.sub(r"\\(.)", r"\1", quoted.group(1), flags=re.S), quoted.end()
    if position < len(text) and text[position] == '"':
        raise DigestError("an unterminated quoted string in an authentication header")
    end = position
    while end < len(text) and text[end] not in ", \t":
        end += 1
    return text[position:end], end


# -- the challenge --------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """A server's ``Digest`` challenge (``WWW-Authenticate``)."""

    realm: str
    nonce: str
    qop: tuple[str, ...] = ()       # offered; empty: RFC 2069 (no nc, no cnonce)
    algorithm: str = "MD5"
    opaque: str | None = None
    stale: bool = False

    def header(self) -> str:
        """The ``WWW-Authenticate`` value a server sends for this challenge."""
        parts = [f"realm={quote(self.realm)}", f"nonce={quote(self.nonce)}",
                 f"algorithm={self.algorithm}"]
        if self.qop:
            parts.append(f"qop={quote(', '.join(self.qop))}")
        if self.opaque is not None:
            parts.append(f"opaque={quote(self.opaque)}")
        if self.stale:
            parts.append("stale=true")
        return "Digest " + ", ".join(parts)


def parse_challenge(values: Iterable[str]) -> Challenge | None:
    """The Digest challenge among ``WWW-Authenticate`` values, or None when the server
    offers no Digest (another scheme only, or no header).

    Raises ``DigestError`` when the Digest challenge cannot be answered: no realm or
    nonce, an algorithm other than MD5, a qop without ``auth``.
    """
    for value in values:
        for scheme, params in parse_params(value):
            if scheme.lower() == "digest":
                return _challenge(params)
    return None


def _challenge(params: Mapping[str, str]) -> Challenge:
    realm, nonce = params.get("realm"), params.get("nonce")
    if realm is None or not nonce:
        raise DigestError("the Digest challenge has no realm or no nonce")
    if not _printable(realm) or not _printable(nonce):
        raise DigestError("the Digest challenge's realm or nonce holds control characters")
    algorithm = params.get("algorithm", "MD5")
    if algorithm.upper() != "MD5":
        raise DigestError(f"the Digest challenge asks for algorithm {algorithm[:20]!r}; "
                          "only MD5 is spoken")
    qop = tuple(part.strip().lower() for part in params.get("qop", "").split(",")
                if part.strip())
    if qop and "auth" not in qop:
        raise DigestError("the Digest challenge offers no qop=auth")
    return Challenge(realm, nonce, qop, "MD5", params.get("opaque"),
                     params.get("stale", "").lower() == "true")


def _printable(text: str) -> bool:
    return all(ch == "\t" or (ch >= " " and ch != "\x7f") for ch in text)


def quote(text: str) -> str:
    """An RFC 9110 quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- the answer ----------------------------------------------------------------------------


def response(user: str, password: str, challenge: Challenge, method: str, uri: str,
             nc: int, cnonce: str) -> str:
    """The ``response`` parameter (RFC 7616 section 3.4.1, MD5, qop=auth or none)."""
    ha1 = md5_hex(f"{user}:{challenge.realm}:{password}")
    ha2 = md5_hex(f"{method}:{uri}")
    if not challenge.qop:
        return md5_hex(f"{ha1}:{challenge.nonce}:{ha2}")
    return md5_hex(f"{ha1}:{challenge.nonce}:{nc:08x}:{cnonce}:auth:{ha2}")


def new_cnonce() -> str:
    """A client nonce: 128 random bits."""
    return secrets.token_hex(16)


class DigestState:
    """One server nonce and the count of requests made with it (``nc``).

    The client keeps one per server: each request after the first challenge carries the
    next ``nc`` without a round trip; a new challenge replaces the state.
    """

    def __init__(self, challenge: Challenge,
                 cnonce: Callable[[], str] = new_cnonce) -> None:
        self.challenge = challenge
        self._cnonce = cnonce
        self.nc = 0

    def authorization(self, user: str, password: str, method: str, uri: str) -> str:
        """The next ``Authorization`` value (``nc`` counted up)."""
        if not _printable(user) or not _printable(uri):
            raise DigestError("the user name or the URI holds control characters")
        self.nc += 1
        challenge = self.challenge
        cnonce = self._cnonce() if challenge.qop else ""
        digest = response(user, password, challenge, method, uri, self.nc, cnonce)
        parts = [f"username={quote(user)}", f"realm={quote(challenge.realm)}",
                 f"nonce={quote(challenge.nonce)}", f"uri={quote(uri)}",
                 f"algorithm={challenge.algorithm}"]
        if challenge.qop:
            parts += ["qop=auth", f"nc={self.nc:08x}", f"cnonce={quote(cnonce)}"]
        parts.append(f"response={quote(digest)}")
        if challenge.opaque is not None:
            parts.append(f"opaque={quote(challenge.opaque)}")
        return "Digest " + ", ".join(parts)


# -- the server's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What a client sent in ``Authorization: Digest ...`` (the server's view)."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    qop: str | None
    nc: int | None
    cnonce: str | None


def parse_authorization(value: str) -> Credentials | None:
    """A Digest ``Authorization`` value, or None when it is another scheme.

    Raises ``DigestError`` when a Digest value lacks what a response needs.
    """
    for scheme, params in parse_params(value):
        if scheme.lower() != "digest":
            continue
        try:
            qop = params.get("qop")
            nc = params.get("nc")
            return Credentials(params["username"], params["realm"], params["nonce"],
                               params["uri"], params["response"], qop,
                               int(nc, 16) if nc is not None else None, params.get("cnonce"))
        except KeyError as missing:
            raise DigestError(f"the Digest authorization has no {missing.args[0]}") from None
        except ValueError:
            raise DigestError("the Digest authorization's nc is not hexadecimal") from None
    return None


def verify(credentials: Credentials, password: str, challenge: Challenge,
           method: str) -> bool:
    """Whether ``credentials`` answer ``challenge`` with ``password`` for ``method``
    (constant-time comparison)."""
    if credentials.realm != challenge.realm or credentials.nonce != challenge.nonce:
        return False
    if challenge.qop and (credentials.qop != "auth" or credentials.nc is None
                          or credentials.cnonce is None):
        return False
    expected = response(credentials.username, password, challenge, method, credentials.uri,
                        credentials.nc or 0, credentials.cnonce or "")
    return secrets.compare_digest(expected, credentials.response.lower())
