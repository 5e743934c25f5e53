"""The configuration of a daemon that a test builds in its own process
(``dpvoip.service.build``): the database the test made, the web on a loopback port the
system picks (the test reads it from ``daemon.web.port``), no Fritz!Box unless the test
serves one, and any other section as the test sets it.

Every in-process daemon test needs those three; written once here, each test says only
what is particular to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from dpvoip.config import Config, DatabaseSettings, FritzBoxSettings, Secret, WebSettings

LOOPBACK = "127.0.0.1"


def in_process(database_url: str, *, boxes: Iterable[FritzBoxSettings] = (),
               pool_size: int | None = None, connect_timeout: float | None = None,
               **sections: Any) -> Config:
    """The daemon's configuration: PostgreSQL at ``database_url`` (with this pool size or
    connect timeout, else the defaults), the web on ``tcp:0`` of loopback, the ``boxes``,
    and ``sections`` (``zadarma=``, ``spool=``, ...) as given."""
    database = replace(DatabaseSettings(), url=Secret(database_url))
    if pool_size is not None:
        database = replace(database, pool_size=pool_size)
    if connect_timeout is not None:
        database = replace(database, connect_timeout=connect_timeout)
    return Config(database=database,
                  web=replace(WebSettings(), listen=f"tcp:0:interface={LOOPBACK}"),
                  fritzbox=tuple(boxes), **sections)


def loopback_box(name: str, port: int, **settings: Any) -> FritzBoxSettings:
    """A Fritz!Box that the test serves on loopback ``port``."""
    return replace(FritzBoxSettings(), name=name, host=LOOPBACK, port=port, **settings)


async def running(case: Any, daemon: Any) -> int:
    """Start ``daemon`` (a ``dpvoip.service.Daemon``; stopped when the test ends), wait
    until its schema is prepared, and give its web port."""
    from test.support.daemon import PATIENCE
    from test.test_database import eventually

    daemon.service.startService()
    case.addCleanup(daemon.service.stopService)
    await daemon.service.started
    await eventually(lambda: daemon.schema.fired, PATIENCE)
    return int(daemon.web.port.getHost().port)
