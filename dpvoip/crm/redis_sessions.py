"""The CRM's sessions as it keeps them in Redis, read without Django and without trusting
pickle (crm-schema.md, "How a CRM user is recognised", its last point).

With ``REDIS_CACHE_URL`` set, the CRM (LogistikoCRM's ``webcrm/settings.py``) uses
Django's cache session backend (``SESSION_ENGINE = "django.contrib.sessions.backends.
cache"``, ``SESSION_CACHE_ALIAS = "default"``) on django-redis (``KEY_PREFIX =
"logistikocrm"``, no ``VERSION``, so 1; no ``COMPRESSOR``, no ``SERIALIZER``, so pickle).
A session is then one Redis string:

* key: Django's ``default_key_func``, ``"<KEY_PREFIX>:<VERSION>:<key>"``, where the key
  is ``"django.contrib.sessions.cache" + session_key`` (the ``sessionid`` cookie);
* value: what django-redis's ``DefaultClient.encode`` makes of the session dict: pickled
  (Python's default protocol: 4 on the CRM's Python 3.11), then compressed when the cache
  has a ``COMPRESSOR`` (zlib, gzip and lzma are read here; lz4 and zstd are refused by
  name). The session dict is not signed: Redis itself is the CRM's trust boundary;
* expiry: the key's TTL (``SessionStore.get_expiry_age()``): Redis drops the key when
  the session expires, and Django checks nothing else when it loads one.

Pickle runs code by design: a pickle names callables (``find_class``) and calls them. The
unpickler here never resolves a name: ``find_class`` refuses every one, so only what
pickle builds by itself comes out (dict, list, tuple, set, frozenset, str, bytes,
bytearray, int, float, bool, None). A session holding anything
else (a datetime, a model instance, or a planted ``os.system``) is refused as a whole,
with the name it asked for in the reason, and nothing of it is imported or called.

Pure: bytes in, a ``SessionLogin`` or a ``LoginRefused`` out. The Redis client is
``store.session_cache``; ``click_to_call.logins`` checks the login against the user.
"""

from __future__ import annotations

import io
import lzma
import pickle
import pickletools
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

from dpvoip.crm.logins import LoginRefused, SessionLogin, session_login

#: ``django.contrib.sessions.backends.cache.KEY_PREFIX``: the cache key of a session is
#: this followed by the session key.
SESSION_CACHE_PREFIX = "django.contrib.sessions.cache"
#: The CRM's ``CACHES["default"]["KEY_PREFIX"]`` (LogistikoCRM, webcrm/settings.py).
CRM_KEY_PREFIX = "logistikocrm"
#: Django's default cache ``VERSION``; the CRM sets none.
CRM_KEY_VERSION = 1
#: A real session is a few hundred bytes; a value (or what it inflates to) past this is
#: not one of the CRM's sessions and is not unpickled.
MAX_CACHED_SESSION = 1024 * 1024
#: The longest class name quoted in a refusal (the name comes from the data).
_MAX_NAME = 80

_DIGITS = re.compile(rb"[+-]?[0-9]+")


class ClassRefused(LoginRefused):
    """The session's pickle names a Python object (a class or a function): it is never
    imported, and the session is refused. ``name`` is what the pickle asked for
    (``module.name``, quoted and cut to 80 characters: it comes from the data)."""

    def __init__(self, module: str, name: str) -> None:
        self.name = ascii(f"{module}.{name}"[:_MAX_NAME])
        super().__init__(
            f"session data names a Python object ({self.name}), not plain data: refused, "
            "nothing of it loaded")


def session_cache_key(session_key: str, key_prefix: str = CRM_KEY_PREFIX,
                      version: int = CRM_KEY_VERSION) -> bytes:
    """The Redis key of session ``session_key``: Django's ``default_key_func``
    (``"%s:%s:%s" % (key_prefix, version, key)``) of the cache session backend's key, as
    django-redis's ``make_key`` builds it."""
    return f"{key_prefix}:{version}:{SESSION_CACHE_PREFIX}{session_key}".encode()


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that loads plain data only: every global (GLOBAL, STACK_GLOBAL, INST,
    OBJ and the copyreg extension codes all come through ``find_class``) is refused, and
    so is a persistent id. Without a callable, REDUCE, NEWOBJ and BUILD have nothing to
    call."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise ClassRefused(str(module), str(name))

    def persistent_load(self, pid: Any) -> NoReturn:
        raise LoginRefused("session data holds a persistent reference: refused")


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _memo_in_order(data: bytes) -> None:
    """Refuse a pickle whose memo indexes are not the ones a pickler writes (0, 1, 2, ...
    in order). The unpickler sizes its memo by the largest index it is given: ten bytes
    asking for index 4,294,967,280 made it allocate 32 GiB (found by the property test,
    which the machine's OOM killer then ended). Read with ``pickletools``, which builds
    nothing."""
    count = 0
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name in _MEMO_PUTS:
            if not isinstance(argument, int) or argument > count:
                raise LoginRefused("session data in Redis is not a pickle a pickler writes"
                                   " (a memo index out of order)")
            count = max(count, argument + 1)
        elif opcode.name == "MEMOIZE":
            count += 1
        elif opcode.name in _MEMO_GETS and (not isinstance(argument, int)
                                             or argument >= count):
            raise LoginRefused("session data in Redis reads a memo entry it never wrote")


def plain_loads(data: bytes) -> object:
    """Unpickle ``data`` if it is plain data only; ``ClassRefused`` when it names any
    Python object, ``LoginRefused`` when it is not a pickle. Nothing is imported or
    called, whatever the bytes say, and nothing is allocated beyond what they hold."""
    try:
        _memo_in_order(data)
        return _PlainUnpickler(io.BytesIO(data), fix_imports=False).load()
    except LoginRefused:
        raise
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, ValueError...
        raise LoginRefused("session data in Redis is not a readable pickle") from e


def _bounded(decompress: Any, data: bytes, what: str) -> bytes:
    """``decompress(data, limit)`` (a decompressor object's method) at most
    MAX_CACHED_SESSION bytes out: a compression bomb is refused, not inflated."""
    try:
        out: bytes = decompress(data, MAX_CACHED_SESSION + 1)
    except (zlib.error, lzma.LZMAError, EOFError, ValueError) as e:
        raise LoginRefused(f"session data in Redis does not decompress ({what})") from e
    if len(out) > MAX_CACHED_SESSION:
        raise LoginRefused("session data in Redis decompresses to more than 1 MiB")
    return out


def _zlib_header(data: bytes) -> bool:
    """A zlib stream's two header bytes: deflate (CM 8) and the FCHECK multiple of 31."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _decompressed(value: bytes) -> bytes:
    """The pickle inside ``value``: django-redis compresses only values longer than the
    compressor's ``min_length`` and tries to decompress every value, keeping it as it is
    when that fails; here the compressor is told by its magic bytes instead (a pickle of
    protocol 2 or later starts with 0x80, which none of them does)."""
    if value[:1] == b"\x80":
        return value
    if value[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(wbits=31)
        out = _bounded(inflater.decompress, value, "gzip")
        if not inflater.eof:
            raise LoginRefused("session data in Redis does not decompress (gzip)")
        return out
    if value[:6] == b"\xfd7zXZ\x00":
        xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = _bounded(xz.decompress, value, "lzma")
        if not xz.eof:
            raise LoginRefused("session data in Redis does not decompress (lzma)")
        return out
    if value[:4] == b"\x28\xb5\x2f\xfd":
        raise LoginRefused("session data in Redis is zstd-compressed, which dpvoip does "
                           "not read (use the zlib, gzip or lzma compressor, or none)")
    if value[:4] == b"\x04\x22\x4d\x18":
        raise LoginRefused("session data in Redis is lz4-compressed, which dpvoip does "
                           "not read (use the zlib, gzip or lzma compressor, or none)")
    if _zlib_header(value):
        inflater = zlib.decompressobj()
        out = _bounded(inflater.decompress, value, "zlib")
        if not inflater.eof:
            raise LoginRefused("session data in Redis does not decompress (zlib)")
        return out
    return value  # an older pickle protocol, or garbage: the unpickler tells


def read_cached_session(value: bytes) -> SessionLogin:
    """The login of a session value as django-redis stored it (``GET`` of
    ``session_cache_key``): decompressed if it was, unpickled with ``plain_loads``, and
    read as ``crm.logins.session_login`` reads a database session.

    Refused (``LoginRefused``, or its ``ClassRefused``): a value over 1 MiB (or inflating
    past it), a plain integer (django-redis stores ints unpickled: no session is one), a
    compression dpvoip does not read, anything that is not a pickle of a dict, a pickle
    naming any Python object, a session without a logged-in user.

    The session's expiry is not in the value: Redis drops the key when it expires.
    """
    if len(value) > MAX_CACHED_SESSION:
        raise LoginRefused("session data in Redis is larger than 1 MiB")
    if _DIGITS.fullmatch(value):
        raise LoginRefused("session data in Redis is a number, not a session")
    session = plain_loads(_decompressed(value))
    if not isinstance(session, dict):
        raise LoginRefused("session data in Redis is not a dict")
    return session_login(session)


# -- where the CRM's Redis is: its REDIS_CACHE_URL -------------------------------------------


@dataclass(frozen=True)
class RedisAddress:
    """A parsed ``REDIS_CACHE_URL``. ``password`` never shows in ``repr``; ``where`` is
    what logs may say."""

    host: str = "localhost"
    port: int = 6379
    unix_path: str = ""  # set for unix:// URLs (host and port are then unused)
    tls: bool = False
    db: int = 0
    username: str = ""
    password: str = field(default="", repr=False)

    def where(self) -> str:
        """The address without credentials, for logs."""
        db = f" database {self.db}"
        if self.unix_path:
            return f"unix socket {self.unix_path}{db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}{db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or
    ``unix://[[user]:password@]/path/to/socket[?db=N]``, read as redis-py's ``from_url``
    reads the CRM's ``REDIS_CACHE_URL`` (user and password percent-decoded; a ``db``
    query argument wins over the path; other query arguments, the client's tuning, are
    ignored). ``ValueError`` names what is wrong, never the URL (it may hold a
    password)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError("is not a URL with a valid port") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must start with redis://, rediss:// or unix://")
    query = parse_qs(parts.query)
    db_text = query["db"][0] if "db" in query else ""
    if not db_text and scheme != "unix":
        db_text = unquote(parts.path).strip("/")
    if not db_text:
        db = 0
    elif db_text.isascii() and db_text.isdigit() and len(db_text) <= 9:
        db = int(db_text)
    else:
        raise ValueError("has a database number that is not a number")
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if scheme == "unix":
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError("needs the socket's absolute path (unix:///path/to/redis.sock)")
        return RedisAddress(unix_path=path, db=db, username=username, password=password)
    if port == 0:
        raise ValueError("is not a URL with a valid port")
    return RedisAddress(host=unquote(parts.hostname or "") or "localhost",
                        port=port or 6379, tls=scheme == "rediss", db=db,
                        username=username, password=password)
