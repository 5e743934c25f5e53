r"""The CRM's sessions in Redis (issue 13, point 7): ``dpvoip.crm.redis_sessions`` (the
format, the restricted unpickler, ``REDIS_CACHE_URL``), ``dpvoip.store.session_cache``
(txredisapi against a real redis-server started by the suite, ``test/support/redis.py``)
and ``click_to_call.logins`` (Redis first, then ``django_session``; the checks of a
database session).

* Known answers made by the real libraries: Django 5.2.19, django-redis 7.0.0 and
  redis-py 8.2.0 on CPython 3.11 (pickle protocol 4, the CRM's), against redis-server
  7.0.15. The cache settings are the CRM's own (LogistikoCRM fc3a110, webcrm/settings.py:
  django_redis.cache.RedisCache, KEY_PREFIX "logistikocrm", no VERSION, no COMPRESSOR,
  SESSION_ENGINE django.contrib.sessions.backends.cache), plus variants for what a
  setting could change: zlib, gzip and lzma compressors, no KEY_PREFIX with VERSION 3,
  PICKLE_VERSION 5. The sign-in is a real ``django.contrib.auth.login`` (same SECRET_KEY
  and password as test_crm_logins' vectors, so the same ``_auth_user_hash``), followed
  by the CRM's UserMiddleware's ``department_id``. Session keys are Django's own random
  ones; the Redis keys and values are the bytes the server held, with their TTLs.
* Refusals built here: pickles that name a class or function (``os.system`` through
  ``__reduce__`` in every protocol, each opcode that resolves a name), compression bombs,
  truncations, numbers; a property test over arbitrary bytes and over any plain session.

Generator (a throwaway venv: ``pip install "django==5.2.*" django-redis redis``; a
redis-server listening on a unix socket; ``python gen.py /path/to/redis.sock``)::

    import sys

    import django
    from django.conf import settings

    SOCKET = sys.argv[1]
    SECRET_KEY = "django-insecure-dpvoip-test-secret-0123456789abcdefghijklmnop"
    PASSWORD = "pbkdf2_sha256$1000000$dpvoipsalt0123$yt2tg7Zb1TEL9okUcKrAvKVfpDattkwkRytOHrshNe0="


    def cache(db, prefix="logistikocrm", **options):
        # LogistikoCRM's webcrm/settings.py CACHES["default"] (fc3a110), pointed at SOCKET.
        entry = {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"unix://{SOCKET}?db={db}",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": 5,
                "SOCKET_TIMEOUT": 5,
                "RETRY_ON_TIMEOUT": True,
                **options,
            },
        }
        if prefix is not None:
            entry["KEY_PREFIX"] = prefix
        return entry


    settings.configure(
        SECRET_KEY=SECRET_KEY,
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes",
                        "django.contrib.sessions"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
        CACHES={
            "default": cache(1),  # exactly the CRM's
            "zlib": cache(2, COMPRESSOR="django_redis.compressors.zlib.ZlibCompressor"),
            "gzip": cache(3, COMPRESSOR="django_redis.compressors.gzip.GzipCompressor"),
            "lzma": cache(4, COMPRESSOR="django_redis.compressors.lzma.LzmaCompressor"),
            "bare": {**cache(5, prefix=None), "VERSION": 3},
            "pickle5": cache(6, PICKLE_VERSION=5),
        },
        SESSION_ENGINE="django.contrib.sessions.backends.cache",
        SESSION_CACHE_ALIAS="default",
    )
    django.setup()

    import redis
    from django.contrib.auth import login
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.cache import SessionStore
    from django.core.management import call_command
    from django.test import RequestFactory, override_settings

    call_command("migrate", verbosity=0)
    anna = User.objects.create(id=7, username="anna", password=PASSWORD)
    User.objects.create(id=42, username="nikos", password=PASSWORD)


    def dump(name, db, session_key):
        client = redis.Redis(unix_socket_path=SOCKET, db=db)
        keys = client.keys("*")
        assert len(keys) == 1, keys
        (key,) = keys
        assert key.endswith(b"django.contrib.sessions.cache" + session_key.encode()), key
        value = client.get(key)
        print(f"# {name}: db {db}, TTL {client.ttl(key)}")
        print(f"{name}_SESSION_KEY = {session_key!r}")
        print(f"{name}_REDIS_KEY = {key!r}")
        print(f"{name}_VALUE = {value!r}")
        client.flushdb()


    # 1. A real sign-in (django.contrib.auth.login) on the CRM's own cache settings, then the
    #    CRM's UserMiddleware's department_id, saved as SessionMiddleware saves it.
    request = RequestFactory().get("/admin/")
    request.session = SessionStore()
    login(request, anna)
    request.session["department_id"] = None
    request.session.save()
    dump("LOGIN", 1, request.session.session_key)

    LONG = {
        "_auth_user_id": "42",
        "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
        "_auth_user_hash": anna.get_session_auth_hash(),
        "department_id": 3,
        "rate_field_name": "rate_to_state_currency",
        "sort_by_default_Client": True,
        "recent_searches": ["Müller GmbH", "Παπαδόπουλος ΑΕ", "+49 30 1234567"] * 5,
        "ratio": 0.25,
        "pair": (1, "two"),
        "nothing": None,
        "raw": b"\x00\x01",
        "nested": {"a": [1, 2, {"b": False}], "big": 2**70},
    }


    def store(alias, db, data, name, expiry=None):
        # As SessionMiddleware does for a new session: a random key (create()), then save().
        with override_settings(SESSION_CACHE_ALIAS=alias):
            session = SessionStore()
            session.update(data)
            if expiry is not None:
                session.set_expiry(expiry)
            session.save()
        dump(name, db, session.session_key)


    store("default", 1, LONG, "LONG")
    store("zlib", 2, dict(request.session.items()), "ZLIB")
    store("zlib", 2, LONG, "ZLIB_LONG")
    store("gzip", 3, dict(request.session.items()), "GZIP")
    store("lzma", 4, dict(request.session.items()), "LZMA")
    store("bare", 5, dict(request.session.items()), "BARE")
    store("pickle5", 6, dict(request.session.items()), "PICKLE5")
    store("default", 1, {"django_language": "de"}, "ANONYMOUS")
    store("default", 1, dict(request.session.items()), "EXPIRY", expiry=300)

    # 2. What django-redis writes for a plain int (not pickled), under a session's key.
    from django.core.cache import caches

    caches["default"].set("django.contrib.sessions.cache" + "dpvoipinteger000000000000000010", 42)
    dump("INTEGER", 1, "dpvoipinteger000000000000000010")
"""

from __future__ import annotations

import contextlib
import copyreg
import gzip
import lzma
import os
import pickle
import secrets
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.iweb import IRequest

from dpvoip.click_to_call.errors import DatabaseUnreachable
from dpvoip.click_to_call.logins import CrmUser, Logins, NotSignedIn
from dpvoip.config import ConfigError, CrmSettings, DatabaseSettings, Secret, load
from dpvoip.crm.logins import LoginRefused, SessionLogin
from dpvoip.crm.redis_sessions import (
    CRM_KEY_PREFIX,
    CRM_KEY_VERSION,
    MAX_CACHED_SESSION,
    ClassRefused,
    RedisAddress,
    parse_redis_url,
    plain_loads,
    read_cached_session,
    session_cache_key,
)
from dpvoip.store.accounts import Accounts
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.pool import HealingPool
from dpvoip.store.session_cache import (
    RedisSessionCache,
    RedisSessionService,
    SessionCacheUnreachable,
)
from test.support.crm import Crm
from test.support.postgres import postgres
from test.support.redis import (
    ACL_PASSWORD,
    ACL_USER,
    DEFAULT_PASSWORD,
    RedisServer,
    private_redis,
    redis,
)
from test.support.waiting import until

# --- Known answers (see the generator above) ----------------------------------------------

SECRET_KEY = "django-insecure-dpvoip-test-secret-0123456789abcdefghijklmnop"
PASSWORD = "pbkdf2_sha256$1000000$dpvoipsalt0123$yt2tg7Zb1TEL9okUcKrAvKVfpDattkwkRytOHrshNe0="
NEW_PASSWORD = "pbkdf2_sha256$1000000$dpvoipsalt4567$pjXheoFyiN9SnFDjerK2MiX3ychZNI9Rn/UmVXKClL4="
AUTH_HASH = "d5be6a6eaf0dc70b0ac9175caabbd17143cd642379c0ab347c27f2a82b655341"
BACKEND = "django.contrib.auth.backends.ModelBackend"
#: SESSION_COOKIE_AGE's default: the TTL of every session the generator saved.
TWO_WEEKS = 1209600

# LOGIN: TTL 1209600 s
LOGIN_SESSION_KEY = 'kt0iwl06id6rpeh93fjrf9zdauzbh2xc'
LOGIN_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cachekt0iwl06id6rpeh93fjrf9zdauzbh2xc'
LOGIN_VALUE = (
    b'\x80\x04\x95\xc0\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\r_auth_user_id\x94\x8c\x01'
    b'7\x94\x8c\x12_auth_user_backend\x94\x8c)django.contrib.auth.backends.ModelBackend'
    b'\x94\x8c\x0f_auth_user_hash\x94\x8c@d5be6a6eaf0dc70b0ac9175caabbd17143cd642379c0a'
    b'b347c27f2a82b655341\x94\x8c\rdepartment_id\x94Nu.'
)
# LONG: TTL 1209600 s
LONG_SESSION_KEY = '3t14qncvrsokzoe8ae0e2iambcl4cv9b'
LONG_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cache3t14qncvrsokzoe8ae0e2iambcl4cv9b'
LONG_VALUE = (
    b'\x80\x04\x95\xdf\x01\x00\x00\x00\x00\x00\x00}\x94(\x8c\r_auth_user_id\x94\x8c\x02'
    b'42\x94\x8c\x12_auth_user_backend\x94\x8c)django.contrib.auth.backends.ModelBacken'
    b'd\x94\x8c\x0f_auth_user_hash\x94\x8c@d5be6a6eaf0dc70b0ac9175caabbd17143cd642379c0'
    b'ab347c27f2a82b655341\x94\x8c\rdepartment_id\x94K\x03\x8c\x0frate_field_name\x94'
    b'\x8c\x16rate_to_state_currency\x94\x8c\x16sort_by_default_Client\x94\x88\x8c\x0fr'
    b'ecent_searches\x94]\x94(\x8c\x0cM\xc3\xbcller GmbH\x94\x8c\x1d\xce\xa0\xce\xb1'
    b'\xcf\x80\xce\xb1\xce\xb4\xcf\x8c\xcf\x80\xce\xbf\xcf\x85\xce\xbb\xce\xbf\xcf\x82 '
    b'\xce\x91\xce\x95\x94\x8c\x0e+49 30 1234567\x94h\rh\x0eh\x0fh\rh\x0eh\x0fh\rh\x0eh'
    b'\x0fh\rh\x0eh\x0fe\x8c\x05ratio\x94G?\xd0\x00\x00\x00\x00\x00\x00\x8c\x04pair\x94'
    b'K\x01\x8c\x03two\x94\x86\x94\x8c\x07nothing\x94N\x8c\x03raw\x94C\x02\x00\x01\x94'
    b'\x8c\x06nested\x94}\x94(\x8c\x01a\x94]\x94(K\x01K\x02}\x94\x8c\x01b\x94\x89se\x8c'
    b'\x03big\x94\x8a\t\x00\x00\x00\x00\x00\x00\x00\x00@uu.'
)
# ZLIB: TTL 1209600 s
ZLIB_SESSION_KEY = 'ko0isdqi47ni0hg2bqxr03gsr9k798xn'
ZLIB_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cacheko0isdqi47ni0hg2bqxr03gsr9k798xn'
ZLIB_VALUE = (
    b'x\x9cM\x8eK\n\xc20\x14E\x15\x9c\x16\xc1U\xe8$\xe4\x1f;\x13\xe7\xba\x85\xf2^\x12m'
    b'\xfd\xa4\xd2\xcfPp\x01\x19\xc6\xfd\xb84-*\xf4\x0e\xef9\\\xeec\xf6|M\xbe\xb9\xa7e'
    b'\xcc\n\xe8\xbb\xb2\xe8[\xdf\x14\x95KqjR\\\x8c:\x04{\xf6\xe1\x03V\xee\x04\xe1X\x13'
    b'[\x87\xae\xa9\x90\x0c\n\xf9\xd1\x96\xecj\xe7/\xdb\xbf;\x1f\r\x94\xd0\x96)n\x9cB'
    b'\xafA{8Pg\rE\n6gFY\x00D\xc7\x0c\x93\xc2:-\xb90\xb9\xa5\x80B\x1a\xcb\xcd\x81\xc3'
    b'\x9a\xa3VJH\x96b\xe6\xfc\r\x9a\xee\xeaC7<\xdd\xf7\xe4\r\xae\xbeF\x98'
)
# ZLIB_LONG: TTL 1209600 s
ZLIB_LONG_SESSION_KEY = 'esvlytd99fkev6j6a15k2mo4s2lhyfba'
ZLIB_LONG_REDIS_KEY = (
    b'logistikocrm:1:django.contrib.sessions.cacheesvlytd99fkev6j6a15k2mo4s2lhyfba'
)
ZLIB_LONG_VALUE = (
    b"x\x9ceQMk\x14A\x10\xdd\xd9\x8d\x8a\xe0f\xc1\x837a\x8f\x8a0\xcc\xf7\xb8'Cr\x88\xb0"
    b'\xc4\x7f Muw\xed\xce\xe8lO\xe8\xe9!\xe4\x10\x08\x82A\xa5.B\xe5\xee_\x08xS\xf0\xe0'
    b'}\xd6\x7f\xe0_q&F\x08X\x87WE\xbd\xc7\xe3Qu\xbes\xf9\xdb\x1b]\xd7\x19?\xa1\xa9\x80'
    b'\xd6\x15\xa2m\xd0\x8aR3\x8d\x93\x88\xe9\xe1\xad\xa5\x04\xf5\x16M\xcf<\xd5o\xc0'
    b'\xack_\xd5\xc6\xd9R\xfa\x83\xc4\xbfa\x1b\xff\xa8\xd6X\xed\xff\xd3\xcen\x19\x14'
    b'\xd0\x14L{:\x95\x98A\x86\xb0\n\xb4\xca\x03\x19\x80Z\x84y\xaa\x00\xa4\xd4a\x1e&'
    b'\xb1\xd2Y\x12\xc5\xf9B\x05 \xe3$WQ\xbe\x8a\xe0y$\xb34\x8d\x93\x90i\xaa\xf1\x18'
    b'\xac\xdb\xa0qC\xd4\xe5\x84f\x16\x1c\x8aU\x89\x95\x16\x066\xc8\xf4\xe8z\xe3j\xd1'
    b"\xb8aP\xad\xb5h\xd4iO4\xb5uB\x9e\n\x8d+h+'\x0e\xaa\xb27\xe2\x0f\xbd\t\xaa\xc1\xb2"
    b'A\xb0\xaa\xc0\x86_\xf7gyp\xf4\xf3{U\xa1\x9d\x1fn\xe4K\xa6\xc7\xdd\x97\xeej{\xde]u'
    b'_\xb7\xd4\xf7\x1f\xdb\xf7\xdd\xb7\x1e\xdf\xcd\xbb\xcf\xdd%\xd3\xee\xb3d1\x8f\x83y'
    b'\x18\xc5I\x9a\xe5\\L\x8b\xddb\xf6?"\xdd\xe9\x03\x965\x1f\xbe\xf8\xf5\xf7\x07\xb4s'
    b"\x0c\xa5\xe5\xa5G\x13wR\xf3\x05\xd3=S\xbb\xa24k~E\x13\x0b'|0\x1eyLw\r6\x0e5\x0f?"
    b'\xf3`\xc8\xb8\xf4\x96\xe33&O\xf2\xc7\x06i"\xcb5\x7f\xba?\xba\xa9\xbd\xb6\xf5\xff'
    b'\x00\x94\xf3\xb3\xa9'
)
# GZIP: TTL 1209600 s
GZIP_SESSION_KEY = 'caobqxdfvjbjpgr51h9mna51ze2wic2w'
GZIP_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cachecaobqxdfvjbjpgr51h9mna51ze2wic2w'
GZIP_VALUE = (
    b'\x1f\x8b\x08\x00M-\x15k\x02\xffM\x8eK\n\xc20\x14E\x15\x9c\x16\xc1U\xe8$\xe4\x1f;'
    b'\x13\xe7\xba\x85\xf2^\x12m\xfd\xa4\xd2\xcfPp\x01\x19\xc6\xfd\xb84-*\xf4\x0e\xef9'
    b'\\\xeec\xf6|M\xbe\xb9\xa7e\xcc\n\xe8\xbb\xb2\xe8[\xdf\x14\x95KqjR\\\x8c:\x04{\xf6'
    b'\xe1\x03V\xee\x04\xe1X\x13[\x87\xae\xa9\x90\x0c\n\xf9\xd1\x96\xecj\xe7/\xdb\xbf;'
    b'\x1f\r\x94\xd0\x96)n\x9cB\xafA{8Pg\rE\n6gFY\x00D\xc7\x0c\x93\xc2:-\xb90\xb9\xa5'
    b'\x80B\x1a\xcb\xcd\x81\xc3\x9a\xa3VJH\x96b\xe6\xfc\r\x9a\xee\xeaC7<\xdd\xf7\xe4\r'
    b'\x87\xe4\x81A\xcb\x00\x00\x00'
)
# LZMA: TTL 1209600 s
LZMA_SESSION_KEY = 'ygvhh8d978ud09hk2gfx6dwzkymipkqe'
LZMA_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cacheygvhh8d978ud09hk2gfx6dwzkymipkqe'
LZMA_VALUE = (
    b'\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4F\x02\x00!\x01\x14\x00\x00\x00\xff\xe7\xec\t\xe0'
    b'\x00\xca\x00\xa1]\x00@\x01\x0ey\xec\xc5\x15\x9b::\xf3N0 \x1fC\n\xe2%J\x8e3\x12'
    b'\xbe\xa3i6\xbd\x1f\xa7JW\x86\xee\xec\x15\x83J\xc1\x94\xdal\x0e\x9c\xbe\xc61J\xca'
    b'\x8e\xbb\xf5\tS\xbf\xc0\x17j\xb1\x82\x7f>\xb2\xb5:\xed\x92!\x10r\x93\x91p-\xf2'
    b'\xa2\xb5\x80\xf3\x83\xe8`$\xb6\xc2?\xee\xfe1I[\x02h\x9dQ\xd4\xbf\xeeR\x0f0\x97\r$'
    b'1c\x1b&@*(j\xfe=\xe2h\xc0<\xe8\xd1\xd4\xcbR\xa2\xbd0\x97\xbb\xd2\xa5\xd2#Q;\xcd'
    b'\xd7\xd2\xe4\xb1\xfe\xfd\xdd}sC}\x17D(\xe0\xc8\xec\x0b\xf5Q9Q\x93\x83\xec*\x00'
    b'\x00\x00\x00\x12\xa9\xd6\x99W\xcf\x14\xd3\x00\x01\xbd\x01\xcb\x01\x00\x00\xf6\xfe'
    b'\xef\xf8\xb1\xc4g\xfb\x02\x00\x00\x00\x00\x04YZ'
)
# BARE: TTL 1209600 s
BARE_SESSION_KEY = 'wejjho4ar2mibspbc8b3wzs93crojt4p'
BARE_REDIS_KEY = b':3:django.contrib.sessions.cachewejjho4ar2mibspbc8b3wzs93crojt4p'
BARE_VALUE = (
    b'\x80\x04\x95\xc0\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\r_auth_user_id\x94\x8c\x01'
    b'7\x94\x8c\x12_auth_user_backend\x94\x8c)django.contrib.auth.backends.ModelBackend'
    b'\x94\x8c\x0f_auth_user_hash\x94\x8c@d5be6a6eaf0dc70b0ac9175caabbd17143cd642379c0a'
    b'b347c27f2a82b655341\x94\x8c\rdepartment_id\x94Nu.'
)
# PICKLE5: TTL 1209600 s
PICKLE5_SESSION_KEY = '2ifmsryj8uihfnzrnssilbihwd9687f8'
PICKLE5_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cache2ifmsryj8uihfnzrnssilbihwd9687f8'
PICKLE5_VALUE = (
    b'\x80\x05\x95\xc0\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\r_auth_user_id\x94\x8c\x01'
    b'7\x94\x8c\x12_auth_user_backend\x94\x8c)django.contrib.auth.backends.ModelBackend'
    b'\x94\x8c\x0f_auth_user_hash\x94\x8c@d5be6a6eaf0dc70b0ac9175caabbd17143cd642379c0a'
    b'b347c27f2a82b655341\x94\x8c\rdepartment_id\x94Nu.'
)
# ANONYMOUS: TTL 1209600 s
ANONYMOUS_SESSION_KEY = 'fcgfnzq8a6wtsjknc6dx2p44ltmue717'
ANONYMOUS_REDIS_KEY = (
    b'logistikocrm:1:django.contrib.sessions.cachefcgfnzq8a6wtsjknc6dx2p44ltmue717'
)
ANONYMOUS_VALUE = (
    b'\x80\x04\x95\x1b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x0fdjango_language\x94\x8c'
    b'\x02de\x94s.'
)
# EXPIRY: TTL 300 s
EXPIRY_SESSION_KEY = '8b81ta3s2hat9d8nu92ys1kq80d6sroo'
EXPIRY_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cache8b81ta3s2hat9d8nu92ys1kq80d6sroo'
EXPIRY_VALUE = (
    b'\x80\x04\x95\xd5\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\r_auth_user_id\x94\x8c\x01'
    b'7\x94\x8c\x12_auth_user_backend\x94\x8c)django.contrib.auth.backends.ModelBackend'
    b'\x94\x8c\x0f_auth_user_hash\x94\x8c@d5be6a6eaf0dc70b0ac9175caabbd17143cd642379c0a'
    b'b347c27f2a82b655341\x94\x8c\rdepartment_id\x94N\x8c\x0f_session_expiry\x94M,\x01u'
    b'.'
)
# INTEGER: TTL 300 s
INTEGER_SESSION_KEY = 'dpvoipinteger000000000000000010'
INTEGER_REDIS_KEY = b'logistikocrm:1:django.contrib.sessions.cachedpvoipinteger000000000000000010'
INTEGER_VALUE = b'42'

#: Every vector written for a signed-in user: (Redis key, value, key prefix, version, user).
SIGNED_IN = {
    "login": (LOGIN_SESSION_KEY, LOGIN_REDIS_KEY, LOGIN_VALUE, CRM_KEY_PREFIX, 1, 7),
    "long": (LONG_SESSION_KEY, LONG_REDIS_KEY, LONG_VALUE, CRM_KEY_PREFIX, 1, 42),
    "zlib": (ZLIB_SESSION_KEY, ZLIB_REDIS_KEY, ZLIB_VALUE, CRM_KEY_PREFIX, 1, 7),
    "zlib-long": (ZLIB_LONG_SESSION_KEY, ZLIB_LONG_REDIS_KEY, ZLIB_LONG_VALUE, CRM_KEY_PREFIX,
                  1, 42),
    "gzip": (GZIP_SESSION_KEY, GZIP_REDIS_KEY, GZIP_VALUE, CRM_KEY_PREFIX, 1, 7),
    "lzma": (LZMA_SESSION_KEY, LZMA_REDIS_KEY, LZMA_VALUE, CRM_KEY_PREFIX, 1, 7),
    "bare": (BARE_SESSION_KEY, BARE_REDIS_KEY, BARE_VALUE, "", 3, 7),
    "pickle5": (PICKLE5_SESSION_KEY, PICKLE5_REDIS_KEY, PICKLE5_VALUE, CRM_KEY_PREFIX, 1, 7),
    "expiry": (EXPIRY_SESSION_KEY, EXPIRY_REDIS_KEY, EXPIRY_VALUE, CRM_KEY_PREFIX, 1, 7),
}
LOGIN = {"_auth_user_id": "7", "_auth_user_backend": BACKEND, "_auth_user_hash": AUTH_HASH,
         "department_id": None}
LONG = {
    "_auth_user_id": "42",
    "_auth_user_backend": BACKEND,
    "_auth_user_hash": AUTH_HASH,
    "department_id": 3,
    "rate_field_name": "rate_to_state_currency",
    "sort_by_default_Client": True,
    "recent_searches": ["Müller GmbH", "Παπαδόπουλος ΑΕ", "+49 30 1234567"] * 5,
    "ratio": 0.25,
    "pair": (1, "two"),
    "nothing": None,
    "raw": b"\x00\x01",
    "nested": {"a": [1, 2, {"b": False}], "big": 2**70},
}


def refused(match: str) -> Any:
    return pytest.raises(LoginRefused, match=match)


# --- The format: keys and values as Django and django-redis write them -------------------


class TestKnownAnswers:
    @pytest.mark.parametrize("name", sorted(SIGNED_IN))
    def test_the_key_is_the_one_django_redis_wrote(self, name: str) -> None:
        session_key, redis_key, _, prefix, version, _ = SIGNED_IN[name]
        assert session_cache_key(session_key, prefix, version) == redis_key

    def test_the_crm_s_own_settings_are_the_defaults(self) -> None:
        assert session_cache_key(LOGIN_SESSION_KEY) == LOGIN_REDIS_KEY
        assert (CRM_KEY_PREFIX, CRM_KEY_VERSION) == ("logistikocrm", 1)

    @pytest.mark.parametrize("name", sorted(SIGNED_IN))
    def test_every_vector_reads_as_its_login(self, name: str) -> None:
        _, _, value, _, _, user = SIGNED_IN[name]
        assert read_cached_session(value) == SessionLogin(user, AUTH_HASH)

    def test_the_whole_session_comes_back_as_plain_data(self) -> None:
        assert plain_loads(LOGIN_VALUE) == LOGIN
        assert plain_loads(LONG_VALUE) == LONG
        assert plain_loads(zlib.decompress(ZLIB_LONG_VALUE)) == LONG
        assert plain_loads(EXPIRY_VALUE) == dict(LOGIN, _session_expiry=300)

    def test_the_compressed_vectors_were_compressed(self) -> None:
        """So that each decompression branch is exercised by the real library's output."""
        assert zlib.decompress(ZLIB_VALUE) == LOGIN_VALUE
        assert gzip.decompress(GZIP_VALUE) == LOGIN_VALUE
        assert lzma.decompress(LZMA_VALUE) == LOGIN_VALUE
        assert PICKLE5_VALUE[:2] == b"\x80\x05" and LOGIN_VALUE[:2] == b"\x80\x04"

    def test_a_session_without_a_login(self) -> None:
        with refused("no logged-in user"):
            read_cached_session(ANONYMOUS_VALUE)

    def test_a_number_is_no_session(self) -> None:
        """django-redis stores ints unpickled (``b"42"``)."""
        assert session_cache_key(INTEGER_SESSION_KEY) == INTEGER_REDIS_KEY
        with refused("a number, not a session"):
            read_cached_session(INTEGER_VALUE)


# --- Refusals: only plain data is ever loaded ----------------------------------------------


class _RunsACommand:
    """Pickles as ``os.system(command)``: what a planted session would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _login_with(**extra: object) -> dict[str, object]:
    return dict(LOGIN, **extra)


class TestOnlyPlainData:
    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    def test_os_system_is_refused_and_never_run(self, protocol: int, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        planted = pickle.dumps(_login_with(x=_RunsACommand(f"touch {marker}")), protocol)
        with pytest.raises(ClassRefused, match=r"names a Python object \('(posix|nt)\.system'"):
            read_cached_session(planted)
        assert not marker.exists()

    @pytest.mark.parametrize(
        "data",
        [
            # GLOBAL then REDUCE (protocol 0)
            b"cbuiltins\neval\n(S'1/0'\ntR.",
            # STACK_GLOBAL (protocol 4)
            b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x031/0\x85R.",
            # INST: the class named inline
            b"(S'1/0'\nibuiltins\neval\n.",
            # OBJ: the class from the stack (a GLOBAL first)
            b"(cbuiltins\neval\nS'1/0'\no.",
        ],
        ids=["global", "stack-global", "inst", "obj"],
    )
    def test_every_opcode_that_names_an_object_is_refused(self, data: bytes) -> None:
        with pytest.raises(ClassRefused, match=r"builtins\.eval"):
            plain_loads(data)

    def test_a_copyreg_extension_code_is_refused(self) -> None:
        """EXT1 looks the name up in copyreg's registry, then through find_class."""
        copyreg.add_extension("builtins", "eval", 0xF1)
        try:
            with pytest.raises(ClassRefused, match=r"builtins\.eval"):
                plain_loads(b"\x80\x02\x82\xf1X\x03\x00\x00\x001/0\x85R.")
        finally:
            copyreg.remove_extension("builtins", "eval", 0xF1)

    def test_a_persistent_id_is_refused(self) -> None:
        with refused("persistent reference"):
            plain_loads(b"\x80\x02X\x01\x00\x00\x00xQ.")
        with refused("persistent reference"):
            plain_loads(b"Px\n.")

    def test_objects_the_crm_might_store_are_refused_too(self) -> None:
        """A datetime is harmless, but loading it means importing by name: refused."""
        import datetime as dt

        value = pickle.dumps(_login_with(seen=dt.datetime(2026, 1, 2, tzinfo=dt.UTC)), 4)
        with pytest.raises(ClassRefused, match=r"datetime\.datetime"):
            read_cached_session(value)

    def test_bytes_in_protocol_2_need_a_name_and_are_refused(self) -> None:
        """Protocols 0-2 pickle bytes as ``_codecs.encode(...)``: a django-redis cache with
        PICKLE_VERSION below 3 and bytes in a session is refused (the CRM uses 4)."""
        with pytest.raises(ClassRefused, match=r"_codecs\.encode"):
            read_cached_session(pickle.dumps(_login_with(raw=b"\x00"), 2))
        assert read_cached_session(pickle.dumps(LOGIN, 2)) == SessionLogin(7, AUTH_HASH)

    def test_sets_and_bytes_need_no_name(self) -> None:
        value = pickle.dumps(_login_with(s={1, 2}, f=frozenset("ab"), b=bytearray(b"x")), 5)
        assert read_cached_session(value) == SessionLogin(7, AUTH_HASH)

    def test_out_of_band_buffers_are_refused(self) -> None:
        value = pickle.dumps(pickle.PickleBuffer(b"abc"), 5, buffer_callback=lambda _: False)
        with refused("not a readable pickle"):
            plain_loads(value)

    @pytest.mark.parametrize("length", [0, 1, 2, 11, 12, 50, len(LOGIN_VALUE) - 1])
    def test_a_truncated_session_is_refused(self, length: int) -> None:
        with pytest.raises(LoginRefused):
            read_cached_session(LOGIN_VALUE[:length])

    @pytest.mark.parametrize("length", [2, 10, len(ZLIB_VALUE) - 1])
    def test_a_truncated_compressed_session_is_refused(self, length: int) -> None:
        with refused("does not decompress"):
            read_cached_session(ZLIB_VALUE[:length])

    def test_not_a_dict(self) -> None:
        with refused("not a dict"):
            read_cached_session(pickle.dumps(["_auth_user_id", "7"], 4))

    def test_garbage(self) -> None:
        with refused("not a readable pickle"):
            read_cached_session(b"<html>session</html>")

    def test_larger_than_a_mebibyte(self) -> None:
        value = pickle.dumps(_login_with(pad="x" * MAX_CACHED_SESSION), 4)
        with refused("larger than 1 MiB"):
            read_cached_session(value)

    @pytest.mark.parametrize(
        "compress",
        [zlib.compress, gzip.compress, lzma.compress],
        ids=["zlib", "gzip", "lzma"],
    )
    def test_a_compression_bomb_is_not_inflated(self, compress: Any) -> None:
        bomb = compress(pickle.dumps(_login_with(pad="x" * (64 * MAX_CACHED_SESSION)), 4))
        assert len(bomb) < MAX_CACHED_SESSION
        with refused("decompresses to more than 1 MiB"):
            read_cached_session(bomb)

    @pytest.mark.parametrize(
        ("magic", "name"),
        [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4")],
    )
    def test_compressors_dpvoip_does_not_read_are_named(self, magic: bytes, name: str) -> None:
        with refused(f"{name}-compressed"):
            read_cached_session(magic + b"\x00" * 20)


_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


#: A pickle of ten bytes whose memo index asks the unpickler for 32 GiB (LONG_BINPUT).
MEMO_BOMB = b"\x80\x04N" + b"r" + (0xFFFFFFF0).to_bytes(4, "little") + b"."

#: Run in a child process whose address space is capped at 1 GiB: were the bomb ever
#: let through again, the child fails with a MemoryError instead of the machine's OOM
#: killer ending the whole test run (as it did once, from the property test below).
_CAPPED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from dpvoip.crm.logins import LoginRefused
from dpvoip.crm.redis_sessions import plain_loads, read_cached_session
for read in (plain_loads, read_cached_session):
    try:
        read(bytes.fromhex(sys.argv[1]))
    except LoginRefused as refusal:
        print(type(refusal).__name__, refusal)
"""


def test_a_memo_bomb_is_refused_without_allocating() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CAPPED, MEMO_BOMB.hex()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("a memo index out of order") == 2, done.stdout


def test_memo_entries_a_pickler_writes_still_load() -> None:
    """Shared values (one list in two places) are memo entries, in every protocol."""
    shared = [1, 2, {"x": "y"}]
    session = {"_auth_user_id": "5", "a": shared, "b": shared, "n": list(range(300))}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = plain_loads(pickle.dumps(session, protocol))
        assert loaded == session
        assert isinstance(loaded, dict) and loaded["a"] is loaded["b"]


class TestProperties:
    @settings(max_examples=300)
    @given(st.binary(max_size=300))
    def test_any_bytes_are_a_login_or_a_refusal(self, value: bytes) -> None:
        with contextlib.suppress(LoginRefused):
            read_cached_session(value)

    @settings(max_examples=300)
    @given(value=st.binary(min_size=1, max_size=len(LONG_VALUE)), at=st.integers(0, 500))
    def test_any_splice_into_a_real_session_is_a_login_or_a_refusal(
            self, value: bytes, at: int) -> None:
        with contextlib.suppress(LoginRefused):
            read_cached_session(LONG_VALUE[:at] + value + LONG_VALUE[at + len(value):])

    @settings(max_examples=200)
    @given(user=st.integers(0, 2**63 - 1), extra=st.dictionaries(st.text(max_size=10), _plain),
           protocol=st.integers(3, pickle.HIGHEST_PROTOCOL),
           compress=st.sampled_from([None, zlib.compress, gzip.compress, lzma.compress]))
    def test_any_plain_session_reads_as_its_login(
            self, user: int, extra: dict[str, object], protocol: int, compress: Any) -> None:
        session = {**extra, "_auth_user_id": str(user), "_auth_user_hash": AUTH_HASH}
        value = pickle.dumps(session, protocol)
        if compress is not None:
            value = compress(value)
        assert read_cached_session(value) == SessionLogin(user, AUTH_HASH)


# --- REDIS_CACHE_URL -----------------------------------------------------------------------


class TestRedisUrl:
    @pytest.mark.parametrize(
        ("url", "address"),
        [
            ("redis://redis:6379/1", RedisAddress("redis", 6379, db=1)),  # the CRM's compose
            ("redis://localhost", RedisAddress()),
            ("redis://:s%40cret@10.0.0.5:6380/2",
             RedisAddress("10.0.0.5", 6380, db=2, password="s@cret")),
            ("redis://crm:pw@[::1]/0?socket_timeout=5",
             RedisAddress("::1", db=0, username="crm", password="pw")),
            ("redis://redis:6379/1?db=4", RedisAddress("redis", db=4)),
            ("rediss://cache.example:6390/3", RedisAddress("cache.example", 6390, tls=True,
                                                            db=3)),
            ("unix:///run/redis/redis.sock?db=5", RedisAddress(unix_path="/run/redis/redis.sock",
                                                               db=5)),
            ("unix://:pw@/run/redis.sock", RedisAddress(unix_path="/run/redis.sock",
                                                        password="pw")),
        ],
    )
    def test_read_as_redis_py_reads_it(self, url: str, address: RedisAddress) -> None:
        assert parse_redis_url(url) == address

    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            ("http://:hunter2@redis/1", "must start with redis://"),
            ("redis://:hunter2@redis:notaport/1", "valid port"),
            ("redis://:hunter2@redis:0/1", "valid port"),
            ("redis://:hunter2@redis/one", "database number"),
            ("unix://:hunter2@relative.sock", "absolute path"),
        ],
    )
    def test_a_bad_url_is_explained_without_repeating_it(self, url: str, problem: str) -> None:
        with pytest.raises(ValueError, match=problem) as caught:
            parse_redis_url(url)
        assert "hunter2" not in str(caught.value)

    def test_the_password_never_shows(self) -> None:
        address = parse_redis_url("redis://crm:hunter2@redis:6379/1")
        assert "hunter2" not in repr(address)
        assert address.where() == "redis://redis:6379 database 1"
        assert parse_redis_url("unix://:hunter2@/r.sock?db=2").where() == (
            "unix socket /r.sock database 2")


class TestConfig:
    def test_the_crm_s_own_variable_sets_it(self) -> None:
        config = load(None, {"REDIS_CACHE_URL": "redis://:hunter2@redis:6379/1"})
        assert config.crm.redis_url == Secret("redis://:hunter2@redis:6379/1")
        assert "hunter2" not in repr(config)
        assert (config.crm.redis_key_prefix, config.crm.redis_key_version) == (
            "logistikocrm", 1)

    def test_dpvoip_s_variable_and_the_file_set_it_too(self) -> None:
        config = load(None, {"DPVOIP_CRM_REDIS_URL": "unix:///run/redis.sock?db=2",
                             "DPVOIP_CRM_REDIS_KEY_PREFIX": "other",
                             "DPVOIP_CRM_REDIS_KEY_VERSION": "3"})
        assert config.crm.redis_url.reveal() == "unix:///run/redis.sock?db=2"
        assert (config.crm.redis_key_prefix, config.crm.redis_key_version) == ("other", 3)

    def test_a_bad_url_names_the_setting_never_the_value(self) -> None:
        with pytest.raises(ConfigError, match="REDIS_CACHE_URL") as caught:
            load(None, {"REDIS_CACHE_URL": "http://:hunter2@redis/1"})
        assert "hunter2" not in str(caught.value)

    def test_empty_means_no_redis(self) -> None:
        assert not load(None, {}).crm.redis_url


# --- The Redis client against a real redis-server ------------------------------------------


class LogCapture:
    """Every log event while a test runs (Twisted's and txredisapi's), as text."""

    def __init__(self, case: Any) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def text(self) -> str:
        return "\n".join(formatEvent(event) or "" for event in self.events)

    def lines(self, namespace: str) -> list[str]:
        return [formatEvent(event) or "" for event in self.events
                if event.get("log_namespace") == namespace]


def fresh_key() -> str:
    """A session key as Django makes them: 32 of [a-z0-9]."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(32))


class RedisCase(TestCase):
    timeout = 120  # a hang detector: a lookup takes milliseconds
    #: The lookup deadline on the real clock: only a hang reaches it.
    patience = 60.0

    def cache(self, url: str, clock: Clock | None = None, prefix: str = CRM_KEY_PREFIX,
              version: int = 1) -> RedisSessionCache:
        cache = RedisSessionCache(parse_redis_url(url), prefix, version, self.patience,
                                  reactor, clock)
        cache.start()
        self.addCleanup(cache.stop)
        return cache

    def lookup(self, cache: RedisSessionCache, session_key: str) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(cache.cached_session(session_key))

    def store(self, server: RedisServer, redis_key: bytes, value: bytes, db: int = 1,
              ttl: int = TWO_WEEKS) -> None:
        """Write a value as django-redis does (``SET key value EX ttl``)."""
        assert server.command("SET", redis_key, value, "EX", ttl, db=db) == b"OK"


class RedisSessionCacheTests(RedisCase):
    async def test_each_vector_comes_back_byte_for_byte(self) -> None:
        server = redis()
        cache = self.cache(server.tcp_url(1))
        for name, (_, _, value, prefix, version, _) in SIGNED_IN.items():
            if (prefix, version) != (CRM_KEY_PREFIX, 1):
                continue
            # Each vector's own key would be shared by every run of the suite: its value
            # goes under a fresh session key, its own key is checked above.
            key = fresh_key()
            self.store(server, session_cache_key(key), value)
            self.assertEqual(await self.lookup(cache, key), value, name)
            self.assertIsNone(await self.lookup(cache, fresh_key()), name)

    async def test_the_key_prefix_and_version_are_the_configured_ones(self) -> None:
        server = redis()
        key = fresh_key()
        self.store(server, session_cache_key(key, "", 3), BARE_VALUE)
        crm_s = self.cache(server.tcp_url(1))
        bare = self.cache(server.tcp_url(1), prefix="", version=3)
        self.assertIsNone(await self.lookup(crm_s, key))
        self.assertEqual(await self.lookup(bare, key), BARE_VALUE)

    async def test_every_way_of_naming_the_server(self) -> None:
        server = redis()
        key = fresh_key()
        self.store(server, session_cache_key(key), LOGIN_VALUE, db=2)
        urls = [server.tcp_url(2), server.unix_url(2),
                server.tcp_url(2, user=ACL_USER, password=ACL_PASSWORD)]
        for url in urls:
            self.assertEqual(await self.lookup(self.cache(url), key), LOGIN_VALUE, url)
        # Another database of the same server holds other sessions.
        self.assertIsNone(await self.lookup(self.cache(server.tcp_url(3)), key))

    async def test_an_expired_session_is_gone(self) -> None:
        """Redis expires the key with the session (its TTL); a key whose expiry passed is
        never handed out."""
        server = redis()
        key = fresh_key()
        self.store(server, session_cache_key(key), LOGIN_VALUE)
        cache = self.cache(server.tcp_url(1))
        self.assertEqual(await self.lookup(cache, key), LOGIN_VALUE)
        self.assertEqual(server.command("PEXPIREAT", session_cache_key(key), 1, db=1), 1)
        self.assertIsNone(await self.lookup(cache, key))

    async def test_a_wrong_password_fails_closed_and_is_never_logged(self) -> None:
        logs = LogCapture(self)
        server = redis()
        clock = Clock()
        wrong = "not-the-password-4711"
        cache = self.cache(server.tcp_url(1, password=wrong), clock)
        first = self.lookup(cache, fresh_key())
        await until(lambda: any("refused dpvoip" in line
                                for line in logs.lines("dpvoip.logins")))
        self.assertIn("WRONGPASS", logs.text())
        self.assertNoResult(first)
        clock.advance(self.patience)
        self.failureResultOf(first, SessionCacheUnreachable)
        # Refused for good: later lookups fail at once.
        later = self.lookup(cache, fresh_key())
        self.failureResultOf(later, SessionCacheUnreachable)
        self.assertNotIn(wrong, logs.text())

    async def test_redis_down_fails_closed_then_reconnects(self) -> None:
        server = private_redis(self)
        key = fresh_key()
        self.store(server, session_cache_key(key), LOGIN_VALUE, db=0)
        clock = Clock()
        cache = self.cache(server.unix_url(0), clock)
        found = self.lookup(cache, key)
        await until(lambda: found.called)
        self.assertEqual(self.successResultOf(found), LOGIN_VALUE)

        server.stop_process()
        # Sent before the client has seen the connection go: lost with it.
        lost = self.lookup(cache, key)
        await until(lambda: lost.called)
        failure = self.failureResultOf(lost, SessionCacheUnreachable)
        self.assertEqual(str(failure.value), "Lost connection")
        # Sent while Redis is known to be down: waits for it, up to the deadline.
        waiting = self.lookup(cache, key)
        self.assertNoResult(waiting)
        clock.advance(self.patience)
        failure = self.failureResultOf(waiting, SessionCacheUnreachable)
        self.assertIn("no answer within 60 s", str(failure.value))
        self.assertNotIn(key, str(failure.value))

        server.start()  # empty: Redis kept nothing (no persistence), the session is gone
        self.store(server, session_cache_key(key), LOGIN_VALUE, db=0)
        again = self.lookup(cache, key)
        await until(lambda: again.called)
        self.assertEqual(self.successResultOf(again), LOGIN_VALUE)

    async def test_the_service_opens_and_closes_the_connection(self) -> None:
        server = private_redis(self)
        cache = RedisSessionCache(parse_redis_url(server.unix_url(0)), CRM_KEY_PREFIX, 1,
                                  self.patience, reactor)
        service = RedisSessionService(cache)
        closed = defer.Deferred.fromCoroutine(cache.cached_session(fresh_key()))
        self.failureResultOf(closed, SessionCacheUnreachable)  # not started: no connection

        def clients() -> int:
            listing: bytes = server.command("CLIENT", "LIST")
            return listing.count(b"\n")  # this query's own connection included

        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.assertIsNone(await self.lookup(cache, fresh_key()))
        self.assertEqual(clients(), 2)
        await service.stopService()
        await until(lambda: clients() == 1)
        gone = defer.Deferred.fromCoroutine(cache.cached_session(fresh_key()))
        self.failureResultOf(gone, SessionCacheUnreachable)


# --- Who is asking: Redis first, then django_session, the same checks ----------------------


class CookieRequest:
    """What ``Logins.identify`` reads of a request: no Authorization, the session cookie."""

    def __init__(self, session_key: str) -> None:
        self.session_key = session_key

    def getHeader(self, name: bytes) -> bytes | None:
        return None

    def getCookie(self, name: bytes) -> bytes | None:
        return self.session_key.encode() if name == b"sessionid" else None


class LoginsTests(RedisCase):
    """``Logins`` on the real CRM tables (PostgreSQL) and the real Redis."""

    def setUp(self) -> Any:
        self.dsn = postgres().new_database(crm="2026-08")
        self.crm = Crm(self.dsn)
        self.anna = self.crm.user("anna", id=7, password=PASSWORD, first_name="Anna",
                                  last_name="Papa")
        self.server = redis()
        self.clock = Clock()
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 1)
        self.addCleanup(pool.close)
        self.accounts = Accounts(Store(pool, reactor), "public")
        self.logs = LogCapture(self)
        return pool.start()

    def logins(self, url: str | None = None, clock: Clock | None = None) -> Logins:
        sessions = self.cache(url or self.server.tcp_url(1), clock)
        return Logins(self.accounts, Secret(SECRET_KEY), Secret(""), "sessionid", self.clock,
                      sessions)

    def identify(self, logins: Logins, session_key: str) -> defer.Deferred[CrmUser]:
        request = cast(IRequest, CookieRequest(session_key))
        return defer.Deferred.fromCoroutine(logins.identify(request))

    async def refusal(self, logins: Logins, session_key: str) -> str:
        try:
            user = await self.identify(logins, session_key)
        except NotSignedIn as refused:
            self.assertTrue(refused.presented)
            return refused.message
        raise AssertionError(f"signed in as {user}")

    def in_redis(self, value: bytes) -> str:
        key = fresh_key()
        self.store(self.server, session_cache_key(key), value)
        return key

    def in_database(self, key: str, data: str, expires: str = "now() + interval '1 day'",
                    ) -> None:
        self.crm.query(f"INSERT INTO django_session VALUES (%s, %s, {expires}) RETURNING 1",
                       (key, data))

    async def test_the_crm_s_real_sign_in_is_recognised(self) -> None:
        user = await self.identify(self.logins(), self.in_redis(LOGIN_VALUE))
        self.assertEqual(user, CrmUser(7, "anna", "Anna Papa", "session"))

    async def test_a_compressed_session_too(self) -> None:
        user = await self.identify(self.logins(), self.in_redis(GZIP_VALUE))
        self.assertEqual(user.id, 7)

    async def test_a_changed_password_signs_the_session_out(self) -> None:
        self.crm.update("auth_user", self.anna, password=NEW_PASSWORD)
        message = await self.refusal(self.logins(), self.in_redis(LOGIN_VALUE))
        self.assertIn("the password changed", message)

    async def test_an_inactive_user_is_refused(self) -> None:
        self.crm.update("auth_user", self.anna, is_active=False)
        message = await self.refusal(self.logins(), self.in_redis(LOGIN_VALUE))
        self.assertEqual(message, "the CRM user is not active")

    async def test_a_user_who_is_gone_is_refused(self) -> None:
        message = await self.refusal(self.logins(), self.in_redis(LONG_VALUE))  # user 42
        self.assertEqual(message, "the CRM user no longer exists")

    async def test_a_session_without_a_login_is_refused(self) -> None:
        message = await self.refusal(self.logins(), self.in_redis(ANONYMOUS_VALUE))
        self.assertIn("no logged-in user", message)

    async def test_a_planted_pickle_is_refused_logged_and_never_run(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-test-planted-"))
        self.addCleanup(shutil.rmtree, folder, True)
        marker = folder / "ran"
        planted = pickle.dumps(_login_with(x=_RunsACommand(f"touch {marker}")), 4)
        key = self.in_redis(planted)
        message = await self.refusal(self.logins(), key)
        self.assertIn("it holds more than plain data", message)
        self.assertFalse(marker.exists())
        (line,) = self.logs.lines("dpvoip.logins")[-1:]
        self.assertIn("CRM session from Redis refused", line)
        self.assertIn("system", line)
        self.assertNotIn(key, self.logs.text())

    async def test_no_session_in_redis_then_django_session_is_asked(self) -> None:
        """A CRM that moved to Redis still has the sessions it made before (or one that
        fell back to the database without django-redis): their rows are read and checked
        as always."""
        from test.test_crm_logins import session

        key = fresh_key()
        self.in_database(key, session(dict(LOGIN, _auth_user_id=str(self.anna)), SECRET_KEY))
        user = await self.identify(self.logins(), key)
        self.assertEqual(user.username, "anna")

    async def test_nowhere_is_expired(self) -> None:
        message = await self.refusal(self.logins(), fresh_key())
        self.assertEqual(message,
                         "the CRM session has expired or was signed out; sign in again")

    async def test_redis_decides_when_it_has_the_session(self) -> None:
        """An anonymous session in Redis is not overruled by a signed-in row of the same
        key in django_session."""
        from test.test_crm_logins import session

        key = self.in_redis(ANONYMOUS_VALUE)
        self.in_database(key, session(LOGIN, SECRET_KEY))
        message = await self.refusal(self.logins(), key)
        self.assertIn("no logged-in user", message)

    async def test_redis_down_refuses_as_a_database_down_does(self) -> None:
        server = private_redis(self)
        key = fresh_key()
        self.store(server, session_cache_key(key), LOGIN_VALUE, db=0)
        clock = Clock()
        logins = self.logins(server.unix_url(0), clock)
        found = self.identify(logins, key)
        await until(lambda: found.called)
        self.assertEqual(self.successResultOf(found).id, 7)

        server.stop_process()
        lost = self.identify(logins, key)  # on the connection that has just died
        await until(lambda: lost.called)
        self.failureResultOf(lost, DatabaseUnreachable)
        waiting = self.identify(logins, key)  # while Redis is known to be down
        self.assertNoResult(waiting)
        clock.advance(self.patience)
        self.failureResultOf(waiting, DatabaseUnreachable)
        lines = [line for line in self.logs.lines("dpvoip.logins")
                 if "Redis did not answer" in line]
        self.assertEqual(len(lines), 2)
        self.assertIn("CRM session login refused", lines[0])
        self.assertIn("no answer within 60 s", lines[1])
        self.assertNotIn(key, self.logs.text())

    async def test_the_password_in_the_url_is_never_logged(self) -> None:
        user = await self.identify(self.logins(self.server.tcp_url(1)),
                                   self.in_redis(LOGIN_VALUE))
        self.assertEqual(user.id, 7)
        self.assertNotIn(DEFAULT_PASSWORD, self.logs.text())
        self.assertNotIn("p%40ss", self.logs.text())


class RedisDownPageTests(SynchronousTestCase):
    """In memory: the page answers Redis's silence with 503, never 500."""

    def test_503(self) -> None:
        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from dpvoip.web.callback import CallbackPages
        from dpvoip.web.errors import HttpError

        class Silent:
            async def cached_session(self, session_key: str) -> bytes | None:
                raise SessionCacheUnreachable("no answer within 3 s")

        accounts: Any = object()  # never asked: Redis is asked first and fails
        logins = Logins(accounts, Secret(SECRET_KEY), Secret(""), "sessionid", Clock(),
                        Silent())
        pages = CallbackPages(logins, cast(Any, None), (), "/login/", Clock())
        request = Request(DummyChannel())
        request.method, request.uri, request.args = b"GET", b"/voip/get-callback/", {}
        request.received_cookies = {b"sessionid": fresh_key().encode()}
        done = defer.Deferred.fromCoroutine(pages.page(request))
        failure = self.failureResultOf(done, HttpError)
        self.assertEqual(failure.value.status, 503)


class DaemonTests(RedisCase):
    """The composition root wires it: ``[crm] redis_url`` set, the popup's cookie-only
    GET finds the session in Redis, and stopping the daemon closes the connection."""

    async def test_the_popup_signs_in_from_redis(self) -> None:
        import treq
        from twisted.web.client import HTTPConnectionPool

        from dpvoip.config import ZadarmaSettings
        from dpvoip.service import build
        from test.support.daemon import scratch
        from test.support.wiring import in_process

        dsn = postgres().new_database(crm="2026-08")
        crm = Crm(dsn)
        anna = crm.user("anna", id=7, password=PASSWORD, first_name="Anna")
        crm.insert("voip_connection", type="pbx", active=True, number="100",
                   callerid="Anna desk", provider="Zadarma", owner_id=anna)
        server = private_redis(self)
        key = fresh_key()
        self.store(server, session_cache_key(key), LOGIN_VALUE, db=4)
        config = in_process(
            dsn,
            crm=CrmSettings(secret_key=Secret(SECRET_KEY),
                            redis_url=Secret(server.unix_url(4)), redis_timeout=self.patience),
            zadarma=ZadarmaSettings(timezone="Europe/Athens"))  # no account to ask
        daemon = build(config, reactor, scratch(self))
        self.assertIsNotNone(daemon.sessions)
        daemon.service.startService()
        self.addCleanup(lambda: daemon.service.running and daemon.service.stopService())
        await daemon.service.started

        pool = HTTPConnectionPool(reactor, persistent=False)
        port = daemon.web.port.getHost().port  # type: ignore[union-attr]
        headers: dict[bytes | str, bytes | str] = {"Cookie": f"sessionid={key}",
                                                   "Accept": "application/json"}
        response = await treq.get(
            f"http://127.0.0.1:{port}/voip/get-callback/?number=2101234567",
            headers=headers, pool=pool)
        body = await response.json()
        self.assertEqual((response.code, body["user"]), (200, "anna"))
        self.assertEqual([c["number"] for c in body["connections"]], ["100"])

        def clients() -> int:
            listing: bytes = server.command("CLIENT", "LIST")
            return listing.count(b"\n")

        self.assertEqual(clients(), 2)
        await daemon.service.stopService()
        await until(lambda: clients() == 1)
