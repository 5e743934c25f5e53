"""Contract tests of the private Twisted and txpostgres hooks in ``dpvoip/internals.py``.

Each builds the real object and checks that the private attribute is there and does
what dpvoip relies on: run these first on any new Twisted or txpostgres before raising a
cap in ``setup.py``. The last test keeps private access out of every other module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg2.extensions
from twisted.internet import reactor
from twisted.internet.base import ReactorBase
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http
from txpostgres import txpostgres

from dpvoip import internals
from dpvoip.internals import (
    ChannelHooks,
    forget_exit_signal,
    has_unread_bytes,
    leave_form_to_caller,
    raw_connection,
    request_line,
    tolerate_closed_descriptors,
    twistd_options,
)
from test.support.daemon import scratch
from test.support.postgres import postgres

PACKAGE = Path(internals.__file__).parent


class _BareReactor(ReactorBase):
    """The reactor base class every real reactor derives from, without any I/O."""

    def installWaker(self) -> None:
        pass


class ExitSignalTests(SynchronousTestCase):
    def test_sigterm_is_stored_where_twistd_reads_it_and_can_be_forgotten(self) -> None:
        bare = _BareReactor()
        self.assertTrue(_ISupportsExitSignalCapturing.providedBy(bare))
        self.assertIn("_exitSignal", _ISupportsExitSignalCapturing.names())
        self.assertIsNone(bare._exitSignal)
        bare.sigTerm(15)
        self.assertEqual(bare._exitSignal, 15)
        forget_exit_signal(bare)
        self.assertIsNone(bare._exitSignal)

    def test_the_installed_reactor_captures_exit_signals(self) -> None:
        self.assertTrue(_ISupportsExitSignalCapturing.providedBy(reactor))
        self.assertIsInstance(reactor, ReactorBase)

    def test_a_reactor_without_the_attribute_fails_loudly(self) -> None:
        with self.assertRaises(AttributeError):
            forget_exit_signal(object())


def channel(kind: type[http.HTTPChannel] = http.HTTPChannel,
            request: type[http.Request] = http.Request) -> tuple[Any, StringTransport]:
    """A real HTTP/1.1 channel on a string transport, as a Site builds it."""
    built = kind()
    built.requestFactory = request
    transport = StringTransport()
    built.makeConnection(transport)
    return built, transport


class RequestLineTests(SynchronousTestCase):
    def test_the_request_line_is_on_the_channel_before_the_body(self) -> None:
        reading, _ = channel()
        reading.dataReceived(b"POST /voip/zd/?zd_echo=1 HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 10\r\n\r\n12345")
        self.assertEqual(request_line(reading), (b"POST", b"/voip/zd/?zd_echo=1"))
        self.assertNotEqual(reading.requests[0].method, b"POST")  # not given to it yet


class _Recording(http.HTTPChannel):
    """Records, as dpvoip's channel does, whether more bytes wait when a request is in."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.unread: list[bool] = []

    def allContentReceived(self) -> None:
        super().allContentReceived()
        self.unread.append(has_unread_bytes(self))


class UnreadBytesTests(SynchronousTestCase):
    def test_a_pipelined_request_is_seen_when_the_first_is_in(self) -> None:
        for rest in (b"GET /b HT", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"):
            with self.subTest(rest=rest):
                reading, _ = channel(_Recording)
                reading.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + rest)
                self.assertEqual(reading.unread, [True])

    def test_nothing_more_is_nothing(self) -> None:
        reading, _ = channel(_Recording)
        reading.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(reading.unread, [False])


class _LeavingForm(http.Request):
    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        leave_form_to_caller(self)
        super().requestReceived(command, path, version)


FORM = (b"POST /voip/zd/?zd_echo=1 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 13\r\n\r\n"
        b"event=NOTIFY_")


class FormTests(SynchronousTestCase):
    def test_twisted_parses_the_form_unless_told_not_to(self) -> None:
        parsed, _ = channel()
        parsed.dataReceived(FORM)
        self.assertEqual(parsed.requests[0].args,
                         {b"zd_echo": [b"1"], b"event": [b"NOTIFY_"]})
        left, _ = channel(request=_LeavingForm)
        left.dataReceived(FORM)
        self.assertEqual(left.requests[0].args, {b"zd_echo": [b"1"]})
        self.assertEqual(left.requests[0].content.read(), b"event=NOTIFY_")


EXPECTING = (b"POST /voip/zd/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
             b"Content-Length: 5\r\n\r\n")


class _NoContinue(ChannelHooks):
    def may_send_continue(self) -> bool:
        return False


class _OwnAnswer(ChannelHooks):
    def answer_malformed(self) -> None:
        assert self.transport is not None
        self.transport.write(b"our own 400")
        self.loseConnection()


class ChannelHookTests(SynchronousTestCase):
    def test_the_100_continue_goes_through_the_hook(self) -> None:
        sent, transport = channel(ChannelHooks)
        sent.dataReceived(EXPECTING)
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        held, transport = channel(_NoContinue)
        held.dataReceived(EXPECTING)
        self.assertEqual(transport.value(), b"")

    def test_malformed_requests_go_through_the_hook(self) -> None:
        for malformed in (b"NONSENSE\r\n", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                          b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
            with self.subTest(malformed=malformed):
                twisted_way, transport = channel(ChannelHooks)
                twisted_way.dataReceived(malformed)
                self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"))
                ours, transport = channel(_OwnAnswer)
                ours.dataReceived(malformed)
                self.assertEqual(transport.value(), b"our own 400")
                self.assertTrue(transport.disconnecting)


class RawConnectionTests(TestCase):
    timeout = 60

    async def test_the_psycopg2_connection_behind_a_txpostgres_connection(self) -> None:
        dsn = postgres().new_database(crm=None)
        connection = txpostgres.Connection(reactor=reactor)
        self.assertIsNone(raw_connection(connection))
        await connection.connect(dsn)
        raw = raw_connection(connection)
        assert raw is not None
        self.assertIsInstance(raw, psycopg2.extensions.connection)
        self.assertFalse(raw.closed)
        [(pid,)] = await connection.runQuery("SELECT pg_backend_pid()")
        self.assertEqual(raw.get_backend_pid(), pid)  # the session queries run on
        connection.close()
        self.assertTrue(raw.closed)
        self.assertIs(raw_connection(connection), raw)
        await connection.connect(dsn)
        self.addCleanup(connection.close)
        again = raw_connection(connection)
        self.assertIsNot(again, raw)  # a new session: its prepared statements are gone
        assert again is not None
        self.assertFalse(again.closed)


# -- nowhere else -------------------------------------------------------------------------

# os._exit is public (the underscore keeps it from clashing with sys.exit).
_PUBLIC = {"_exit"}
# dpvoip's own, on an object of the same class.
_OWN = {("config.py", "_value")}  # Secret.__eq__ compares with the other Secret


def private_reaches(source: str) -> list[tuple[int, str]]:
    """``something._name`` on anything but ``self``, ``cls`` or ``super()``, and
    ``getattr``/``setattr``/``hasattr`` with a ``"_name"``: (line, name) of each."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            name, owner = node.attr, node.value
            own = ((isinstance(owner, ast.Name) and owner.id in ("self", "cls"))
                   or (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                       and owner.func.id == "super"))
            if not own:
                found.append((node.lineno, name))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            found.append((node.lineno, node.args[1].value))
    return [(line, name) for line, name in found
            if name.startswith("_") and not name.startswith("__") and name not in _PUBLIC]


class _Watched:
    """A selectable for a socket that can be closed behind the reactor's back (as libpq
    closes a broken session's socket): it still gives its old number afterwards."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "watched"


class ClosedDescriptorTests(SynchronousTestCase):
    def watched_then_closed(self, hardened: bool) -> tuple[Any, _Watched]:
        import socket

        from twisted.internet.epollreactor import EPollReactor

        epoll = EPollReactor()
        if hardened:
            tolerate_closed_descriptors(epoll)
        first, second = socket.socketpair()
        self.addCleanup(second.close)
        watched = _Watched(first.fileno())
        epoll.addReader(watched)
        first.close()  # behind the reactor's back
        return epoll, watched

    def test_twisted_loses_track_of_a_descriptor_closed_while_watched(self) -> None:
        """The failure the hook exists for: Twisted's removal fails in epoll_ctl after it
        deleted the selectable, and its sets name a descriptor nothing stands for."""
        epoll, watched = self.watched_then_closed(hardened=False)
        with self.assertRaises(OSError):
            epoll.removeReader(watched)
        with self.assertRaises(KeyError):
            epoll.removeAll()

    def test_the_hardened_reactor_forgets_it_and_watches_the_next_socket(self) -> None:
        import socket

        epoll, watched = self.watched_then_closed(hardened=True)
        epoll.removeReader(watched)
        self.assertNotIn(watched, epoll.getReaders())
        self.assertEqual(epoll.removeAll(), [])
        third, fourth = socket.socketpair()  # the lowest free number: the closed one
        self.addCleanup(third.close)
        self.addCleanup(fourth.close)
        fresh = _Watched(third.fileno())
        epoll.addReader(fresh)
        self.assertIn(fresh, epoll.getReaders())
        tolerate_closed_descriptors(epoll)  # twice: wrapped once
        self.assertEqual(epoll.removeAll(), [fresh])


#: Parses twistd's options for ``dpvoip --config FILE`` in a fresh interpreter, with the
#: options class the first argument names, and prints the plugin it would run and whether
#: the modules only Twisted's other plugins need were imported.
_PARSE = textwrap.dedent("""
    import sys
    from twisted.plugins.dpvoip_plugin import dpvoip
    from twisted.scripts._twistd_unix import ServerOptions
    from dpvoip.internals import twistd_options
    options = (twistd_options(dpvoip) if sys.argv[1] == "dpvoip's" else ServerOptions)()
    options.parseOptions(["--nodaemon", "dpvoip", "--config", sys.argv[2]])
    print(options.loadedPlugins[options.subCommand] is dpvoip,
          sorted(name for name in ("unittest", "twisted.trial.itrial", "twisted.words.iwords")
                 if name in sys.modules))
""")


class TwistdOptionsTests(SynchronousTestCase):
    """``dpvoip run`` hands twistd options that read no other plugin: twistd's own
    ``_getPlugins`` is where they are read."""

    def parsed(self, which: str) -> str:
        config = scratch(self) / "dpvoip.toml"
        config.write_text("fritzbox = []\n", encoding="utf-8")
        done = subprocess.run([sys.executable, "-c", _PARSE, which, str(config)],
                              capture_output=True, text=True, check=False, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def test_plain_twistd_imports_what_the_other_plugins_need(self) -> None:
        self.assertEqual(self.parsed("twistd's"),
                         "True ['twisted.trial.itrial', 'twisted.words.iwords', 'unittest']")

    def test_dpvoips_options_run_dpvoip_and_import_none_of_it(self) -> None:
        self.assertEqual(self.parsed("dpvoip's"), "True []")

    def test_dpvoip_is_the_only_subcommand(self) -> None:
        from twisted.plugins.dpvoip_plugin import dpvoip

        names = [command[0] for command in twistd_options(dpvoip)().subCommands]
        self.assertEqual(names, ["dpvoip"])


class NowhereElseTests(SynchronousTestCase):
    def test_the_guard_sees_what_it_must(self) -> None:
        self.assertEqual(
            private_reaches("a._b\nself._c\nsuper()._d()\ngetattr(x, '_e', 1)\na.__dict__\n"),
            [(1, "_b"), (4, "_e")])

    def test_only_internals_reaches_private_names_of_other_objects(self) -> None:
        offenders = []
        for path in sorted(PACKAGE.rglob("*.py")):
            if path.name == "internals.py" and path.parent == PACKAGE:
                continue
            relative = path.relative_to(PACKAGE).as_posix()
            for line, name in private_reaches(path.read_text(encoding="utf-8")):
                if (relative, name) not in _OWN:
                    offenders.append(f"dpvoip/{relative}:{line} {name}")
        self.assertEqual(offenders, [], "private access outside dpvoip/internals.py")
