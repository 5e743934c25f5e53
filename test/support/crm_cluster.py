"""A PostgreSQL cluster of a test's own (one it may stop and start) holding either shipped
CRM version: ``test.support.postgres.private_cluster`` holds the 2025-12 tables only."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from dpvoip.store.embedded import EmbeddedPostgres
from dpvoip.store.migrations import SHIPPED_DDL, ddl_text
from test.support.postgres import query


def private_crm_cluster(case: Any, prefix: str,
                        crm: str) -> tuple[Path, EmbeddedPostgres, str]:
    """(its folder, the cluster, the DSN of database ``crm`` with the tables of CRM
    version ``crm``, e.g. "2026-08"); stopped and removed after the test."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    case.addCleanup(shutil.rmtree, folder, True)
    cluster = EmbeddedPostgres(folder / "pg")
    cluster.start()
    case.addCleanup(lambda: cluster.stop(mode="immediate") if cluster.running() else None)
    cluster.create_database("crm")
    dsn = cluster.dsn("crm")
    query(dsn, ddl_text(next(f for f in SHIPPED_DDL if crm in f)))
    return folder, cluster, dsn
