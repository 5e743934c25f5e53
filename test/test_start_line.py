"""The start line says the address actually listened on: with ``tcp:0`` the port the
system chose (a newcomer copies the ``curl`` it shows), not the configured 0."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from dpvoip.config import WebSettings
from dpvoip.web.server import DpvoipSite, WebService


class StartLineTests(TestCase):
    def serve(self, listen: str) -> tuple[WebService, list[str]]:
        web = WebService(reactor, DpvoipSite(Resource(), WebSettings(), reactor), listen)
        with capturedLogs() as events:
            started = web.startService()
        self.addCleanup(web.stopService)
        self.successResultOf(started)
        return web, [formatEvent(e) for e in events if "listening on" in formatEvent(e)]

    def test_tcp_port_0_is_announced_with_the_port_the_system_chose(self) -> None:
        web, said = self.serve("tcp:0:interface=127.0.0.1")
        assert web.port is not None
        address = web.port.getHost()
        assert isinstance(address, IPv4Address)
        port = address.port
        self.assertNotEqual(port, 0)
        self.assertEqual(len(said), 1)
        self.assertIn(f"listening on http://127.0.0.1:{port} — check it with: curl "
                      f"http://127.0.0.1:{port}/readyz", said[0])

    def test_a_unix_socket_is_announced_with_its_path(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-web-"))
        self.addCleanup(shutil.rmtree, folder, True)
        _, said = self.serve(f"unix:{folder / 'web.sock'}")
        self.assertIn(f"listening on unix:{folder / 'web.sock'} ", said[0])
