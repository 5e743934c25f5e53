"""The package's layering, read from the source (``ast``, nothing imported) and enforced.

Why a test: a rule that only lives in a README is broken by the first hurried change.
``core/`` stays pure so that the rules can be tested without a reactor or a database;
only ``store/`` speaks to PostgreSQL (its drivers and its SQL), so that every statement
can be found, reviewed and planned in one place; the fakes in ``testing/`` never reach
production code except the ``cli.py`` commands that serve them; ``web/`` talks to the
services the composition root gives it, never to the store behind them; the wire
protocols know nothing of what is done with their lines.

``IMPORT_RULES`` and ``SQL_RULE`` are the rules as data (the README quotes them). Every
failure names the module, the line and the offending import or SQL text.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dpvoip"


@dataclass(frozen=True)
class ImportRule:
    """Modules under ``within`` (but not under ``exempt``) may not import anything under
    ``forbidden`` (but may import what is under ``allowed``). Names are dotted prefixes:
    ``dpvoip.store`` covers ``dpvoip.store`` and every module below it."""

    name: str
    why: str
    within: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class SqlRule:
    """Modules under ``within`` but not under ``exempt`` hold no SQL text."""

    name: str
    why: str
    within: tuple[str, ...]
    exempt: tuple[str, ...]


IMPORT_RULES: tuple[ImportRule, ...] = (
    ImportRule(
        "core-is-pure",
        "core/ is pure: no I/O library and no dpvoip module outside core/",
        within=("dpvoip.core",),
        forbidden=("twisted", "psycopg2", "txpostgres", "klein", "treq", "werkzeug", "zope",
                   "dpvoip"),
        allowed=("dpvoip.core",),
    ),
    ImportRule(
        "drivers-only-in-store",
        "only store/ imports the PostgreSQL drivers",
        within=("dpvoip",),
        forbidden=("psycopg2", "txpostgres"),
        exempt=("dpvoip.store",),
    ),
    ImportRule(
        "fakes-only-for-cli",
        "nothing but cli.py (the simulator commands) imports the fakes in testing/",
        within=("dpvoip",),
        forbidden=("dpvoip.testing",),
        exempt=("dpvoip.cli", "dpvoip.testing"),
    ),
    ImportRule(
        "web-talks-to-services",
        "web/ imports no store/ module: it talks to the services it is given",
        within=("dpvoip.web",),
        forbidden=("dpvoip.store",),
    ),
    ImportRule(
        "protocols-are-wire-only",
        "protocols/ imports no store/, web/ or spool/ module",
        within=("dpvoip.protocols",),
        forbidden=("dpvoip.store", "dpvoip.web", "dpvoip.spool"),
    ),
)

SQL_RULE = SqlRule(
    "sql-only-in-store",
    "only store/ holds SQL text",
    within=("dpvoip",),
    exempt=("dpvoip.store",),
)


# -- the SQL detector ----------------------------------------------------------------------

#: Statements as they are written in code: upper-case keywords anywhere in a string. English
#: prose does not shout its verbs, and where it names one ("the INSERT fails", "NOTIFY_START")
#: the shape around it is not a statement's.
_SHOUTED = re.compile(
    r"""
      \bSELECT\b(?:(?!;)[\s\S])*?\bFROM\b
    | ^[\s(]*SELECT\s+\S
    | \bINSERT\s+INTO\b
    | \bUPDATE\s+[\w."]+\s+SET\b
    | \bDELETE\s+FROM\b
    | \b(?:CREATE|ALTER|DROP)\s+(?:UNIQUE\s+|TEMP(?:ORARY)?\s+|OR\s+REPLACE\s+)?
        (?:TABLE|INDEX|SCHEMA|DATABASE|ROLE|VIEW|SEQUENCE|FUNCTION|TRIGGER|EXTENSION|TYPE)\b
    | \bWHERE\s+[\w."]+\s*(?:[=<>!]|IN\b|IS\b|LIKE\b|BETWEEN\b|ANY\b)
    | \bJOIN\s+[\w."]+\s+(?:\w+\s+)?(?:ON|USING)\b
    | \b(?:GROUP|ORDER)\s+BY\b
    | \bIS\s+(?:NOT\s+)?(?:NULL|DISTINCT\s+FROM|TRUE|FALSE)\b
    | \b(?:UN)?LISTEN\s+(?:\*|"?[a-z_][\w$]*"?)\s*(?:;|$)
    | \bNOTIFY\s+"?[a-z_][\w$]*"?\s*(?:,|;|$)
    | \bEXECUTE\s+"?[a-z_][\w$]*"?\s*(?:\(|;|$)
    | \b(?:VACUUM|ANALYZE)\b\s*(?:;|$|\(|FULL\b|VERBOSE\b|ANALYZE\b|"|[a-z_])
    | (?:^|;)\s*(?:BEGIN|COMMIT|ROLLBACK|START\s+TRANSACTION)
        \s*(?:;|$|(?:TRANSACTION|WORK|ISOLATION)\b)
    | \bON\s+CONFLICT\b
    | \bRETURNING\s+(?:\*|[a-z_])
    """,
    re.VERBOSE | re.MULTILINE,
)

#: Anywhere, in any case: no English word. A column compared with or set to a driver's
#: placeholder is a fragment of a statement (a SET list, a WHERE condition).
_FUNCTIONS = re.compile(
    r"\bpg_(?:notify|(?:try_)?advisory_\w+)\s*\(|(?<![\w%)])[a-z_][\w.]*\s*(?:=|<>|!=|<=|>=)\s*"
    r"(?:%s|%\(\w+\)s|\$\d)", re.IGNORECASE)

#: Statements written in lower case: only at the start of the string, and only in the shape
#: of a statement (a table and what follows it), because "select one from the list" and
#: "delete from the CRM first" are English.
_QUIET = re.compile(
    r"""
    ^[\s(]*(?:
        with\s+\w+\s+as\s*\(
      | select\s+(?:(?!;).)+?\s+from\s+[\w."]+
      | insert\s+into\s+[\w."]+\s*(?:\(|values\b|select\b|default\b)
      | update\s+[\w."]+\s+set\s+[\w"]+\s*=
      | delete\s+from\s+(?:[\w"]+\.[\w"]+|[\w"]+\s+(?:where|using|returning)\b|[\w"]+\s*;)
      | (?:create|alter|drop)\s+(?:unique\s+)?(?:table|index|schema|database|role)\s+
        (?:if\s+(?:not\s+)?exists\s+)?[\w."]+\s*
        (?:\(|;|$|(?:on|add|drop|alter|rename|owner|cascade|authorization)\b)
      | (?:un)?listen\s+[\w"]+\s*(?:;|$)
      | notify\s+[\w"]+\s*(?:,|;|$)
      | (?:vacuum|analyze)\s*(?:;|$|\(|[\w"]+\.[\w"]+)
      | (?:begin|commit|rollback)\s*;
      | execute\s+\w+\s*(?:\(|;|$)
    )
    """,
    re.VERBOSE | re.IGNORECASE | re.DOTALL,
)

#: What a lower-case SELECT needs besides its shape to be taken for one.
_SQL_MARK = re.compile(
    r"%s|%\(\w+\)s|\$\d|\w\.\w|\(\*\)|\bcount\s*\(|\bjoin\b|\bgroup\s+by\b|\border\s+by\b"
    r"|\blimit\s+\d|\bwhere\s+[\w.\"]+\s*[=<>!]",
    re.IGNORECASE,
)


def reads_as_sql(text: str) -> bool:
    """Whether ``text`` holds an SQL statement (or a telling clause of one)."""
    if _SHOUTED.search(text) or _FUNCTIONS.search(text):
        return True
    quiet = _QUIET.match(text)
    if quiet is None:
        return False
    if re.match(r"[\s(]*select\b", text, re.IGNORECASE):
        return _SQL_MARK.search(text) is not None
    return True


# -- reading a module ----------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} [{self.rule}]"


def module_name(path: str) -> str:
    """``dpvoip/web/app.py`` -> ``dpvoip.web.app``; a package's ``__init__`` is the
    package."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything the module imports: ``from a import b`` is
    ``a.b`` (b may be a module), relative imports resolved, ``importlib.import_module`` and
    ``__import__`` with a literal name included. Imports under ``TYPE_CHECKING`` count:
    a typing-only import couples the layers all the same."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            called = (function.attr if isinstance(function, ast.Attribute)
                      else function.id if isinstance(function, ast.Name) else "")
            first = node.args[0]
            if (called in ("import_module", "__import__") and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)):
                yield node.lineno, first.value


def _text_of(node: ast.AST) -> str | None:
    """The text of a string expression: a literal, an f-string (its holes read as ``x``),
    or a ``+`` of those; None for anything else."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return node.value
        if isinstance(node.value, bytes):
            return node.value.decode("latin-1")
        return None
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) and
                       isinstance(part.value, str) else "x" for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text_of(node.left), _text_of(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def _strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of every string expression, docstrings and other bare string
    statements left out (they document; they are not sent anywhere)."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Expr) and _text_of(node.value) is not None:
            continue
        text = _text_of(node)
        if text is not None:
            yield getattr(node, "lineno", 0), text
            continue
        pending.extend(ast.iter_child_nodes(node))


def _shown(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= 90 else flat[:87] + "...")


def check_source(path: str, source: str) -> list[Violation]:
    """The layering violations of one module (``path`` relative to the project root)."""
    tree = ast.parse(source, filename=path)
    module = module_name(path)
    found: list[Violation] = []
    for line, imported in _imports(tree, module, path.endswith("__init__.py")):
        for rule in IMPORT_RULES:
            if (_under(module, rule.within) and not _under(module, rule.exempt)
                    and _under(imported, rule.forbidden) and not _under(imported, rule.allowed)):
                found.append(Violation(path, line, rule.name,
                                       f"imports {imported} ({rule.why})"))
    if _under(module, SQL_RULE.within) and not _under(module, SQL_RULE.exempt):
        for line, text in _strings(tree):
            if reads_as_sql(text):
                found.append(Violation(path, line, SQL_RULE.name,
                                       f"SQL text {_shown(text)} ({SQL_RULE.why})"))
    return sorted(found, key=lambda v: (v.path, v.line, v.rule))


def package_modules(root: Path = ROOT) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / PACKAGE).rglob("*.py"))


def check_package(root: Path = ROOT) -> list[Violation]:
    found: list[Violation] = []
    for path in package_modules(root):
        found += check_source(path, (root / path).read_text(encoding="utf-8"))
    return found


# -- the package as it is ------------------------------------------------------------------


def test_every_module_of_the_package_is_read() -> None:
    modules = package_modules()
    assert "dpvoip/core/numbers.py" in modules
    assert "dpvoip/store/database.py" in modules
    assert "dpvoip/web/app.py" in modules
    assert len(modules) > 40


@pytest.mark.parametrize("rule", [r.name for r in IMPORT_RULES] + [SQL_RULE.name])
def test_the_package_keeps_its_layering(rule: str) -> None:
    broken = [str(v) for v in check_package() if v.rule == rule]
    assert not broken, "\n".join(["the layering is broken:", *broken])


# -- the checker on small modules: it does report what it must -----------------------------


def rules_broken(path: str, source: str) -> list[tuple[int, str]]:
    return [(v.line, v.rule) for v in check_source(path, source)]


def test_core_may_not_import_io_libraries_or_the_rest_of_dpvoip() -> None:
    source = "\n".join([
        "import re",
        "from dataclasses import dataclass",
        "import phonenumbers",
        "from dpvoip.core.numbers import normalise",
        "from . import outcomes",
        "from .texts import Texts",
        "from twisted.internet.defer import Deferred",
        "import txpostgres.reconnection",
        "from klein import Klein",
        "import treq",
        "from werkzeug.exceptions import NotFound",
        "from zope.interface import implementer",
        "import psycopg2",
        "from dpvoip.config import Config",
        "from dpvoip import __version__",
        "from .. import metrics",
        "from ..store import database",
    ])
    assert rules_broken("dpvoip/core/rules.py", source) == sorted(
        [(line, "core-is-pure") for line in range(7, 18)]
        + [(8, "drivers-only-in-store"), (13, "drivers-only-in-store")])
    [violation] = [v for v in check_source("dpvoip/core/rules.py", source) if v.line == 14]
    assert str(violation).startswith("dpvoip/core/rules.py:14: imports dpvoip.config.Config")


def test_core_package_init_resolves_its_relative_imports() -> None:
    assert rules_broken("dpvoip/core/__init__.py", "from . import numbers\n") == []
    assert rules_broken("dpvoip/core/__init__.py", "from .. import config\n") == [
        (1, "core-is-pure")]


def test_only_the_store_imports_the_drivers() -> None:
    source = "import psycopg2\nfrom txpostgres.reconnection import ConnectionDead\n"
    assert rules_broken("dpvoip/store/pool.py", source) == []
    assert rules_broken("dpvoip/spool/durable.py", source) == [
        (1, "drivers-only-in-store"), (2, "drivers-only-in-store")]
    assert rules_broken("dpvoip/service.py", "if True:\n    import psycopg2.extras\n") == [
        (2, "drivers-only-in-store")]


def test_only_cli_imports_the_fakes() -> None:
    source = ("def serve():\n    from dpvoip.testing.zadarma import serve\n"
              "from dpvoip import testing\n")
    assert rules_broken("dpvoip/cli.py", source) == []
    assert rules_broken("dpvoip/testing/fritzbox.py", source) == []
    assert rules_broken("dpvoip/service.py", source) == [
        (2, "fakes-only-for-cli"), (3, "fakes-only-for-cli")]
    dynamic = "import importlib\nimportlib.import_module('dpvoip.testing.fritzbox')\n"
    assert rules_broken("dpvoip/tap.py", dynamic) == [(2, "fakes-only-for-cli")]


def test_web_does_not_import_the_store() -> None:
    source = "\n".join([
        "from dpvoip.click_to_call.logins import Logins",
        "from dpvoip.deferreds import race",
        "from dpvoip.store.database import race",
        "from ..store import tokens",
        "from typing import TYPE_CHECKING",
        "if TYPE_CHECKING:",
        "    from dpvoip.store.database import Store",
    ])
    assert rules_broken("dpvoip/web/server.py", source) == [
        (3, "web-talks-to-services"), (4, "web-talks-to-services"),
        (7, "web-talks-to-services")]


def test_protocols_do_not_import_store_web_or_spool() -> None:
    source = ("from twisted.protocols.basic import LineReceiver\n"
              "from dpvoip.spool.journal import Spool\nfrom dpvoip.web.app import WebApp\n"
              "from dpvoip.store import database\n")
    assert rules_broken("dpvoip/protocols/callmonitor.py", source) == [
        (2, "protocols-are-wire-only"), (3, "protocols-are-wire-only"),
        (4, "protocols-are-wire-only")]


def test_sql_outside_the_store_is_reported_with_its_line_and_text() -> None:
    source = '''"""A module whose docstring may say SELECT id FROM t: it documents."""
crm = "public"
QUERY = (
    "SELECT s.session_data FROM django_session s"
    " WHERE s.session_key = %s"
)
def record(store, crm):
    """The INSERT INTO x (a) VALUES (1) of the docstring is not reported."""
    return store.read(f"SELECT id FROM {crm}.voip_connection WHERE owner_id = %s")
STATEMENT = "INSERT INTO dpvoip.callback_request (user_id)" + " VALUES (%s)"
MESSAGE = "the database is unavailable; try again"
'''
    assert rules_broken("dpvoip/store/accounts.py", source) == []
    found = check_source("dpvoip/click_to_call/logins.py", source)
    assert [(v.line, v.rule) for v in found] == [
        (4, "sql-only-in-store"), (9, "sql-only-in-store"), (10, "sql-only-in-store")]
    assert str(found[0]) == (
        "dpvoip/click_to_call/logins.py:4: SQL text 'SELECT s.session_data FROM "
        "django_session s WHERE s.session_key = %s' (only store/ holds SQL text) "
        "[sql-only-in-store]")
    assert "x.voip_connection" in found[1].what, "an f-string's holes read as x"


STATEMENTS = [
    "SELECT id, username FROM auth_user WHERE id = %s",
    "  SELECT 1",
    "WITH t AS (UPDATE dpvoip.api_token SET last_used_at = now() RETURNING user_id)"
    " SELECT u.id FROM t JOIN auth_user u ON u.id = t.user_id",
    "INSERT INTO dpvoip.callback_request (user_id, login) VALUES (%s, %s)",
    "UPDATE dpvoip.api_token SET revoked_at = now() WHERE id = %s",
    "DELETE FROM dpvoip.directory_entry WHERE source = %s",
    "CREATE UNIQUE INDEX IF NOT EXISTS call_detail_pbx ON dpvoip.call_detail (pbx_call_id)",
    "CREATE TABLE dpvoip.box_status (box text PRIMARY KEY)",
    "ALTER TABLE dpvoip.call_detail ADD COLUMN recording text",
    "DROP SCHEMA dpvoip CASCADE",
    "LISTEN dpvoip_events",
    "UNLISTEN *",
    "NOTIFY dpvoip_events, 'call'",
    "SELECT pg_notify('dpvoip_events', %s)",
    "pg_notify(%s, %s)",
    "pg_try_advisory_lock(%s)",
    "EXECUTE dpvoip_lookup (%s)",
    "VACUUM (ANALYZE) dpvoip.directory_entry",
    "ANALYZE dpvoip.directory_entry",
    "ANALYZE",
    "BEGIN",
    "COMMIT",
    "BEGIN; SELECT 1",
    "UPDATE x SET y = 1; COMMIT",
    "ROLLBACK",
    " ON CONFLICT (box) DO UPDATE SET host = EXCLUDED.host",
    " RETURNING id",
    " WHERE owner_id = %s AND active",
    " FROM t JOIN auth_user u ON u.id = t.user_id",
    "ORDER BY id",
    "forwarded_to = %s",
    "extension = %s, answered_at = coalesce(answered_at, %s)",
    "ended_at IS NULL AND extension IS DISTINCT FROM %(extension)s",
    "box = $1",
    "CREATE DATABASE {} TEMPLATE {}",
    "create database dpvoip_test;",
    "select id, username from auth_user where id = %s",
    "select count(*) from dpvoip.call_detail",
    "insert into dpvoip.api_token (user_id) values (%s)",
    "update dpvoip.api_token set revoked_at = now()",
    "delete from dpvoip.directory_entry",
    "delete from directory_entry where source = %s",
    "create table box_status (box text)",
    "drop index if exists call_detail_pbx;",
    "listen dpvoip_events;",
    "notify dpvoip_events, 'x'",
    "vacuum dpvoip.directory_entry",
    "begin;",
    "execute dpvoip_lookup (%s)",
]

PROSE = [
    "Answer NOTIFY_START with the matched caller's name for the phones' display.",
    "NOTIFY_RECORD can come first",
    "the call row, its detail, the log lines, the NOTIFY and the CRM's sales side",
    "published with NOTIFY dpvoip_calls in the same transaction",
    "EXECUTE the plan",
    "What PostgreSQL can store of user input: a NUL would make the INSERT fail",
    "the COMMIT rides along behind (and no rows come back)",
    "Select a connection from the list, then press Call.",
    "select one from the list where you like",
    "select the box from the list where it is",
    "Choose one of your connections (callerid)",
    "update the settings set by the CRM",
    "Update your profile first",
    "Insert into the form the number to dial",
    "Delete from the CRM first",
    "Delete from settings",
    "Create table rows for each call",
    "create the tables with `dpvoip migrate`",
    "drop the connection and reconnect",
    "Listen to the box on port 1012",
    "listen on tcp:8443",
    "notify the owner",
    "execute the plan",
    "Analyze the logs",
    "begin again",
    "Commit",
    "commit the changes, then begin",
    "-----BEGIN CERTIFICATE-----",
    "the database is unavailable (OperationalError); events are spooled",
    "From: the box; select: none",
    "DELETE",
    "UPDATE",
    "INSERT",
    "SELECT",
    "RETURNING",
    "WHERE",
    "the call is null and void",
    "tried %s times",
    "%s = %s",
    "%(name)s = %(value)s",
    "Sort the list by number (ORDER: newest first)",
    "join the CRM's team on Monday",
    "Create a database user for dpvoip",
]


@pytest.mark.parametrize("text", STATEMENTS)
def test_the_detector_takes_statements_for_sql(text: str) -> None:
    assert reads_as_sql(text)


@pytest.mark.parametrize("text", PROSE)
def test_the_detector_leaves_prose_alone(text: str) -> None:
    assert not reads_as_sql(text)
