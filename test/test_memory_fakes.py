"""The in-memory stores keep the contract of the real ones: the same expectations run on
``MemoryAccounts`` / ``MemoryCallbacks`` and on ``Accounts`` / ``CallbackRecords`` over
the test PostgreSQL with the CRM's tables.

Why: ``test_routes_memory`` trusts the fakes. Each point the routes depend on (an expired
session is not found, a revoked token is not found, an inactive user is still found so
that ``Logins`` can say why it refuses, only the owner's active connections, a call with
an empty recording has none) is checked here on both, so a fake that drifts from the
SQL fails here rather than letting a route test pass on a lie.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dpvoip.click_to_call.ports import AccountStore, CallbackStore
from dpvoip.config import DatabaseSettings
from dpvoip.crm.logins import api_token_hash
from dpvoip.store.accounts import Account, Accounts
from dpvoip.store.callbacks import CallbackRecords, CallbackRequest
from dpvoip.store.database import Store
from dpvoip.store.dsn import connection_dsn
from dpvoip.store.migrations import prepare
from dpvoip.store.pool import HealingPool
from dpvoip.store.tokens import create_token, revoke_token
from dpvoip.testing.memory import MemoryAccounts, MemoryCallbacks
from test.support.crm import Crm
from test.support.postgres import postgres

PASSWORD = "pbkdf2_sha256$870000$salt$hash="
DATA = "eyJfYXV0aF91c2VyX2lkIjoiNSJ9:1xVqJw:signature"

T = TypeVar("T")


def wait(work: Awaitable[T]) -> defer.Deferred[T]:
    """What a port method answers, as a Deferred (it may be any awaitable)."""

    async def waited() -> T:
        return await work

    return defer.Deferred.fromCoroutine(waited())


if TYPE_CHECKING:
    _Case = TestCase
else:
    _Case = object


class _Postgres(_Case):
    """A fresh CRM database with dpvoip's schema, and a Store on it."""

    timeout = 120  # a hang detector: a fresh database and its schema on a loaded machine

    def start_database(self) -> Any:
        self.dsn = postgres().new_database(crm="2025-12")
        self.crm = Crm(self.dsn)
        pool = HealingPool(reactor, connection_dsn(self.dsn, DatabaseSettings()), 2)
        self.addCleanup(pool.close)
        self.store = Store(pool, reactor)

        async def ready() -> None:
            await pool.start()
            await self.store.write(lambda c: prepare(c, standalone=False, crm_schema="public"))

        return defer.Deferred.fromCoroutine(ready())


# -- the account store ------------------------------------------------------------------------


class AccountsContract(_Case):
    """What every ``AccountStore`` does; a subclass provides the world it reads."""

    accounts: AccountStore

    def user(self, username: str, active: bool = True) -> int:
        raise NotImplementedError

    def session(self, user_id: int, data: str, expired: bool = False) -> str:
        raise NotImplementedError

    def token(self, username: str) -> Any:
        """(id, token), maybe as a Deferred."""
        raise NotImplementedError

    def revoke(self, token_id: int) -> Any:
        raise NotImplementedError

    def deactivate(self, user_id: int) -> None:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_a_live_session_is_read_an_expired_or_unknown_one_is_not(self) -> Any:
        anna = self.user("anna")
        live = self.session(anna, DATA)
        old = self.session(anna, DATA + "old", expired=True)
        self.assertEqual((yield wait(self.accounts.session_data(live))), DATA)
        self.assertIsNone((yield wait(self.accounts.session_data(old))))
        self.assertIsNone((yield wait(self.accounts.session_data("0" * 32))))

    @defer.inlineCallbacks
    def test_an_account_comes_with_its_password_and_its_state(self) -> Any:
        anna = self.user("anna")
        bob = self.user("bob", active=False)
        found = yield wait(self.accounts.account(anna))
        self.assertEqual(found, Account(anna, "anna", "Anna", "Papa", True, PASSWORD))
        found = yield wait(self.accounts.account(bob))
        self.assertFalse(found.is_active)
        self.assertIsNone((yield wait(self.accounts.account(bob + 1000))))

    @defer.inlineCallbacks
    def test_a_live_token_finds_its_user_without_the_password(self) -> Any:
        anna = self.user("anna")
        _, token = yield self.token("anna")
        found = yield wait(self.accounts.use_token(api_token_hash(token)))
        self.assertEqual(found, Account(anna, "anna", "Anna", "Papa", True, None))
        self.deactivate(anna)  # found, so that the login can say why it is refused
        found = yield wait(self.accounts.use_token(api_token_hash(token)))
        self.assertEqual((found.id, found.is_active), (anna, False))

    @defer.inlineCallbacks
    def test_a_revoked_or_unknown_token_is_not_found(self) -> Any:
        self.user("anna")
        token_id, token = yield self.token("anna")
        yield self.revoke(token_id)
        self.assertIsNone(
            (yield wait(self.accounts.use_token(api_token_hash(token)))))
        self.assertIsNone(
            (yield wait(self.accounts.use_token(api_token_hash("dpv_x")))))


class MemoryAccountsTests(AccountsContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = MemoryAccounts(self.clock)
        self.accounts = self.memory

    def user(self, username: str, active: bool = True) -> int:
        return self.memory.add_user(username, password=PASSWORD, first_name="Anna",
                                    last_name="Papa", is_active=active)

    def session(self, user_id: int, data: str, expired: bool = False) -> str:
        return self.memory.add_session(data, lifetime=-60.0 if expired else 3600.0)

    def token(self, username: str) -> Any:
        [user_id] = [u.id for u in self.memory.users.values() if u.username == username]
        return defer.succeed(self.memory.issue_token(user_id))

    def revoke(self, token_id: int) -> Any:
        return defer.succeed(self.memory.revoke_token(token_id))

    def deactivate(self, user_id: int) -> None:
        self.memory.change_user(user_id, is_active=False)


class PostgresAccountsTests(AccountsContract, _Postgres, TestCase):
    def setUp(self) -> Any:
        done = self.start_database()
        self.accounts = Accounts(self.store, "public")
        return done

    def user(self, username: str, active: bool = True) -> int:
        return self.crm.user(username, password=PASSWORD, first_name="Anna",
                             last_name="Papa", is_active=active)

    def session(self, user_id: int, data: str, expired: bool = False) -> str:
        key = secrets.token_hex(16)
        when = "now() - interval '1 minute'" if expired else "now() + interval '1 hour'"
        self.crm.query(f"INSERT INTO django_session VALUES (%s, %s, {when}) RETURNING 1",
                       (key, data))
        return key

    def token(self, username: str) -> Any:
        return defer.Deferred.fromCoroutine(create_token(self.store, "public", username))

    def revoke(self, token_id: int) -> Any:
        return defer.Deferred.fromCoroutine(revoke_token(self.store, token_id))

    def deactivate(self, user_id: int) -> None:
        self.crm.update("auth_user", user_id, is_active=False)


# -- the callback store -----------------------------------------------------------------------


class CallbacksContract(_Case):
    """What every ``CallbackStore`` does; a subclass provides the world it reads."""

    callbacks: CallbackStore

    def user(self, username: str) -> int:
        raise NotImplementedError

    def connection(self, owner_id: int, number: str, active: bool = True) -> int:
        raise NotImplementedError

    def call(self, call_id: str, recording: str, extension: int | None = None,
             own_number: str = "") -> int:
        """A call dpvoip recorded, known to the CRM, taken by ``extension`` on the office's
        line ``own_number``: the CRM's id."""
        raise NotImplementedError

    def make_staff(self, user: int) -> None:
        raise NotImplementedError

    def records(self) -> list[CallbackRequest]:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_only_the_owners_active_connections_oldest_first(self) -> Any:
        anna, bob = self.user("anna"), self.user("bob")
        first = self.connection(anna, "100")
        inactive = self.connection(anna, "101", active=False)
        second = self.connection(anna, "102")
        bobs = self.connection(bob, "200")
        rows = yield wait(self.callbacks.connections(anna))
        self.assertEqual([(r[0], r[2]) for r in rows], [(first, "100"), (second, "102")])
        self.assertEqual(rows[0], (first, "pbx", "100", "desk 100", "Zadarma"))
        own = yield wait(self.callbacks.own_connection(first, anna))
        self.assertEqual(own, rows[0])
        self.assertIsNone((yield wait(self.callbacks.own_connection(bobs,
                                                                                     anna))))
        self.assertIsNone((yield wait(self.callbacks.own_connection(inactive, anna))))

    @defer.inlineCallbacks
    def test_every_request_is_kept(self) -> Any:
        anna = self.user("anna")
        requests = [
            CallbackRequest(anna, "jwt", None, None, "69\ufffd1", None, "refused", 400, "no"),
            CallbackRequest(None, "none", 5, None, "6912345678", None, "refused", 401, "who"),
        ]
        for request in requests:
            yield wait(self.callbacks.record(request))
        self.assertEqual(self.records(), requests)

    @defer.inlineCallbacks
    def test_a_calls_recording_by_either_id_and_none_when_empty(self) -> Any:
        with_one = self.call("zd-in_1", "1700000000.123")
        without = self.call("zd-in_2", "")
        for asked, expected in ((self.callbacks.recording_of_crm_call(with_one, None),
                                 "1700000000.123"),
                                (self.callbacks.recording_of_call("zd-in_1", None),
                                 "1700000000.123"),
                                (self.callbacks.recording_of_crm_call(without, None), None),
                                (self.callbacks.recording_of_call("zd-in_2", None), None),
                                (self.callbacks.recording_of_crm_call(without + 100, None),
                                 None),
                                (self.callbacks.recording_of_call("zd-in_9", None), None)):
            self.assertEqual((yield wait(asked)), expected)

    @defer.inlineCallbacks
    def test_a_recording_only_for_staff_and_the_users_whose_connection_was_a_leg(
            self) -> Any:
        """Issue 14 point 7: the office side of the call (its extension, its line) must be
        one of the viewer's connection numbers (digits compared, the last nine when both
        are that long), or the viewer CRM staff."""
        anna, bob, boss = self.user("anna"), self.user("bob"), self.user("boss")
        self.connection(anna, "100")
        self.connection(bob, "+30 210 765 4321")
        self.make_staff(boss)
        by_extension = self.call("zd-in_1", "rec-1", extension=100)
        on_line = self.call("zd-in_2", "rec-2", own_number="302107654321")
        seen = {}
        for name, viewer in (("anna", anna), ("bob", bob), ("boss", boss)):
            seen[name] = (
                (yield wait(self.callbacks.recording_of_crm_call(by_extension, viewer))),
                (yield wait(self.callbacks.recording_of_call("zd-in_2", viewer))),
                (yield wait(self.callbacks.recording_of_crm_call(on_line, viewer))),
            )
        self.assertEqual(seen, {"anna": ("rec-1", None, None),
                                "bob": (None, "rec-2", "rec-2"),
                                "boss": ("rec-1", "rec-2", "rec-2")})


class MemoryCallbacksTests(CallbacksContract, TestCase):
    def setUp(self) -> None:
        self.memory = MemoryCallbacks()
        self.callbacks = self.memory
        self.users = iter(range(1, 100))
        self.crm_calls = iter(range(1, 100))

    def user(self, username: str) -> int:
        return next(self.users)

    def connection(self, owner_id: int, number: str, active: bool = True) -> int:
        return self.memory.add_connection(owner_id, number, callerid=f"desk {number}",
                                          active=active)

    def call(self, call_id: str, recording: str, extension: int | None = None,
             own_number: str = "") -> int:
        crm_id = next(self.crm_calls)
        legs = tuple(str(leg) for leg in (extension, own_number) if leg)
        self.memory.add_call(call_id, recording, crm_call_id=crm_id, legs=legs)
        return crm_id

    def make_staff(self, user: int) -> None:
        self.memory.staff.add(user)

    def records(self) -> list[CallbackRequest]:
        return self.memory.records


class PostgresCallbacksTests(CallbacksContract, _Postgres, TestCase):
    def setUp(self) -> Any:
        done = self.start_database()
        self.callbacks = CallbackRecords(self.store, "public")
        return done

    def user(self, username: str) -> int:
        return self.crm.user(username)

    def make_staff(self, user: int) -> None:
        self.crm.update("auth_user", user, is_staff=True)

    def connection(self, owner_id: int, number: str, active: bool = True) -> int:
        return self.crm.insert("voip_connection", type="pbx", active=active, number=number,
                               callerid=f"desk {number}", provider="Zadarma",
                               owner_id=owner_id)

    def call(self, call_id: str, recording: str, extension: int | None = None,
             own_number: str = "") -> int:
        self.crm.query(
            "INSERT INTO dpvoip.call_detail (call_id, source, direction, started_at,"
            " recording, extension, own_number) VALUES (%s, 'zadarma', 'incoming', now(),"
            " %s, %s, %s) RETURNING 1",
            (call_id, recording, extension, own_number))
        return self.crm.insert("accounting_voipcall", call_id=call_id, direction="incoming",
                               phone_number="6912345678", status="completed")

    def records(self) -> list[CallbackRequest]:
        return [CallbackRequest(*row) for row in self.crm.query(
            "SELECT user_id, login, connection_id, from_number, number_given,"
            " number_dialled, result, http_status, message FROM dpvoip.callback_request"
            " ORDER BY id")]
