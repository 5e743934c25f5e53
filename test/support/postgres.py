"""One real PostgreSQL for the whole test run, on a private unix socket.

It is dpvoip's own embedded cluster code (so the tests exercise it too), started once per
test process in a temporary folder and stopped at exit. Each test gets a fresh database,
made quickly from a template that already holds one of the CRM's DDL versions.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psycopg2

from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.migrations import SHIPPED_DDL, ddl_text

_server: TestPostgres | None = None
_names = itertools.count(1)


class TestPostgres:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="dpvoip-test-pg-"))
        self.folder.chmod(0o755)
        self.cluster = EmbeddedPostgres(self.folder / "pg")
        self.cluster.start()
        self._templates: dict[str, str] = {}

    def template(self, crm: str | None) -> str:
        key = crm or "empty"
        if key not in self._templates:
            name = f"tpl_{key.replace('-', '_')}"
            self.cluster.create_database(name)
            if crm is not None:
                ddl = next(f for f in SHIPPED_DDL if crm in f)
                self.execute(name, ddl_text(ddl))
            self._templates[key] = name
        return self._templates[key]

    def new_database(self, crm: str | None = "2025-12") -> str:
        """A fresh database (with the CRM tables of ``crm``, or empty); its DSN."""
        name = f"t{next(_names)}"
        self.cluster.create_database(name, template=self.template(crm))
        return self.cluster.dsn(name)

    def execute(self, database: str, sql: str) -> None:
        query(self.cluster.dsn(database), sql)

    def stop(self) -> None:
        self.cluster.stop(mode="immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def postgres() -> TestPostgres:
    global _server
    if _server is None:
        _server = TestPostgres()
        atexit.register(_server.stop)
    return _server


def query(dsn: str, sql: Any, params: Any = None) -> list[tuple[Any, ...]]:
    """A blocking query for assertions and set-up (outside the code under test); without
    ``params`` the text is sent as it is (a ``%`` is a ``%``, as in the CRM's DDL)."""
    connection = psycopg2.connect(dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def private_cluster(case: Any, prefix: str,
                    crm: str = "2025-12") -> tuple[Path, EmbeddedPostgres, str]:
    """A PostgreSQL cluster of the test's own (one it may stop and start), holding the
    tables of CRM version ``crm`` in database ``crm``: (its folder, the cluster, the DSN).
    Stopped and removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    case.addCleanup(shutil.rmtree, folder, True)
    cluster = EmbeddedPostgres(folder / "pg")
    cluster.start()
    case.addCleanup(lambda: cluster.stop(mode="immediate") if cluster.running() else None)
    cluster.create_database("crm")
    dsn = cluster.dsn("crm")
    query(dsn, ddl_text(f"dpeconomy-{crm}.sql"))
    return folder, cluster, dsn


def take_down(cluster: EmbeddedPostgres) -> None:
    """Stop a test's own cluster as an outage would: a fast shutdown, or, when that does
    not finish in time (its checkpoint on a disk another test run keeps busy), an
    immediate one, which is a crash PostgreSQL recovers from at the next start. What a
    test of an outage checks (nothing acknowledged lost) holds for both."""
    from dpvoip.store.embedded import EmbeddedError

    try:
        cluster.stop("fast")
    except EmbeddedError:
        cluster.stop("immediate")
