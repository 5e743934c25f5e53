"""``twistd dpvoip``: options and the service maker's entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from dpvoip.config import Config, ConfigError, load


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Runs dpvoip: the Fritz!Box CallMonitor clients, the Zadarma webhooks and "
        "click-to-call, recording every call in the CRM's database. Settings come from the "
        "TOML file (see etc/dpvoip.toml.example) and the environment (DATABASE_URL, "
        "FRITZ_HOST, ZADARMA_KEY, DPVOIP_<SECTION>_<KEY>, ...). Secrets are never printed."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: $DPVOIP_CONFIG, else built-in "
         "defaults)."],
    ]

    def postOptions(self) -> None:
        self["loaded"] = load_or_exit(self["config"], os.environ)


def load_or_exit(path: str | None, environ: Any) -> Config:
    """The config, or exit 2 with one line naming the bad setting (nothing has started)."""
    chosen = path or environ.get("DPVOIP_CONFIG") or None
    try:
        return load(Path(chosen) if chosen else None, environ)
    except ConfigError as error:
        sys.stderr.write(f"dpvoip: configuration error: {error}\n")
        raise SystemExit(2) from None


def makeService(options: Options) -> IService:
    from dpvoip import service

    return service.makeService(options["loaded"])
