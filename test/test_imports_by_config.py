"""The daemon loads the code of what its configuration uses, and no more.

Every module imported stays in the daemon's memory for its whole life; an office without
a Fritz!Box, or whose box is read on its CallMonitor port only, should not carry the
box's connection, its leadership among instances, the TR-064 client or an XML parser.
Each case builds the daemon (``service.build``, nothing started) in a fresh interpreter
from a configuration file, and lists which of those modules it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from test.support.daemon import scratch

#: Modules only some configurations need, as the build reports them.
WATCHED = ("dpvoip.fritzbox.box", "dpvoip.fritzbox.service", "dpvoip.fritzbox.assembly",
           "dpvoip.store.leases", "dpvoip.protocols.callmonitor",
           "dpvoip.fritzbox.list_assembly", "dpvoip.protocols.tr064",
           "dpvoip.fritzbox.reconciler", "xml.etree.ElementTree", "defusedxml",
           "dpvoip.asterisk.service")

_BUILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from twisted.internet import reactor
    from dpvoip.config import load
    from dpvoip.service import build
    daemon = build(load(Path(sys.argv[1]), {}), reactor, base=Path(sys.argv[2]))
    print(json.dumps({"boxes": len(daemon.boxes), "providers": sorted(daemon.providers),
                      "imported": [name for name in json.loads(sys.argv[3])
                                   if name in sys.modules]}))
""")

DATABASE = '[database]\nurl = "postgresql://dpvoip@127.0.0.1:1/crm"\n'
ZADARMA = '[zadarma]\nsecret = "webhook-secret"\n'
BOX = '[[fritzbox]]\nname = "office"\nhost = "127.0.0.1"\n'
TR064 = 'tr064_user = "dpvoip"\ntr064_password = "box-password"\n'
PBX = ('[[provider]]\nkind = "asterisk"\nname = "pbx"\nhost = "127.0.0.1"\n'
       'username = "dpvoip"\nsecret = "pbx-secret"\n')


class ImportsByConfigurationTests(SynchronousTestCase):
    def built(self, toml: str) -> dict[str, object]:
        folder = scratch(self)
        config = folder / "dpvoip.toml"
        config.write_text(toml, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-c", _BUILD, str(config), str(folder), json.dumps(WATCHED)],
            capture_output=True, text=True, check=False, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def test_without_a_box_none_of_the_boxes_code_is_loaded(self) -> None:
        built = self.built("fritzbox = []\n" + DATABASE + ZADARMA)
        self.assertEqual((built["boxes"], built["imported"]), (0, []))

    def test_a_box_without_tr064_leaves_the_call_lists_code_out(self) -> None:
        built = self.built(DATABASE + ZADARMA + BOX)
        self.assertEqual(built["boxes"], 1)
        self.assertEqual(built["imported"], ["dpvoip.fritzbox.box", "dpvoip.fritzbox.service",
                                             "dpvoip.fritzbox.assembly", "dpvoip.store.leases",
                                             "dpvoip.protocols.callmonitor"])

    def test_a_box_with_a_tr064_user_loads_its_call_list(self) -> None:
        built = self.built(DATABASE + ZADARMA + BOX + TR064)
        self.assertEqual(built["boxes"], 1)
        self.assertEqual(built["imported"], [name for name in WATCHED
                                             if name != "dpvoip.asterisk.service"])

    def test_a_pbx_without_a_box_loads_no_box_code(self) -> None:
        built = self.built("fritzbox = []\n" + DATABASE + PBX)
        self.assertEqual(built["providers"], ["pbx"])
        self.assertEqual(built["imported"], ["dpvoip.asterisk.service"])
