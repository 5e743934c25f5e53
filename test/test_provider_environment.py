"""A ``[[provider]]`` table's keys from the environment, ``DPVOIP_PROVIDER_<NAME>_<KEY>``:
an administrator keeps a second account's or a PBX's secret out of the configuration
file (systemd's ``EnvironmentFile``, a container's secrets), as ``ZADARMA_SECRET`` does
for the ``[zadarma]`` section. Errors name the variable, never its value."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.asterisk.settings import AsteriskSettings
from dpvoip.config import Config, ConfigError, ZadarmaSettings, load

BRANCH = '[[provider]]\nkind = "zadarma"\nname = "branch"\n'
PBX = ('fritzbox = []\n[[provider]]\nkind = "asterisk"\nname = "pbx"\nhost = "127.0.0.1"\n'
       'username = "dpvoip"\n')


class ProviderEnvironmentTests(SynchronousTestCase):
    def load(self, text: str, **environ: str) -> Config:
        folder = Path(tempfile.mkdtemp(prefix="dpvoip-provider-env-"))
        self.addCleanup(shutil.rmtree, folder, True)
        path = folder / "dpvoip.toml"
        path.write_text(text, encoding="utf-8")
        return load(path, environ)

    def refused(self, text: str, **environ: str) -> str:
        with self.assertRaises(ConfigError) as raised:
            self.load(text, **environ)
        return str(raised.exception)

    def settings(self, config: Config, name: str) -> Any:
        [provider] = [p for p in config.providers if p.name == name]
        return provider.settings

    def test_a_second_zadarma_accounts_keys_from_the_environment(self) -> None:
        config = self.load(BRANCH + 'timezone = "Europe/Berlin"\n',
                           DPVOIP_PROVIDER_BRANCH_SECRET="branch-secret-value",
                           DPVOIP_PROVIDER_BRANCH_CREATE_TICKETS="true",
                           DPVOIP_PROVIDER_BRANCH_ALLOWED_NETWORKS="10.0.0.0/8, 127.0.0.1/32",
                           DPVOIP_PROVIDER_BRANCH_TIMEZONE="Asia/Tokyo")
        settings = self.settings(config, "branch")
        assert isinstance(settings, ZadarmaSettings)
        self.assertEqual(settings.secret.reveal(), "branch-secret-value")
        self.assertIs(type(settings.secret.reveal()), str)
        self.assertTrue(settings.create_tickets)
        self.assertEqual(settings.allowed_networks, ("10.0.0.0/8", "127.0.0.1/32"))
        self.assertEqual(settings.timezone, "Asia/Tokyo", "the environment wins over the file")
        self.assertNotIn("branch-secret-value", repr(config))

    def test_a_pbx_whose_secret_only_the_environment_holds(self) -> None:
        """The table alone is refused (an Asterisk needs its manager secret)."""
        self.assertIn("secret: must be set", self.refused(PBX))
        config = self.load(PBX, DPVOIP_PROVIDER_PBX_SECRET="manager-secret",
                           DPVOIP_PROVIDER_PBX_PORT="5039")
        settings = self.settings(config, "pbx")
        assert isinstance(settings, AsteriskSettings)
        self.assertEqual((settings.secret.reveal(), settings.port), ("manager-secret", 5039))

    def test_a_name_with_a_dash_is_written_with_an_underscore(self) -> None:
        config = self.load(BRANCH.replace('"branch"', '"branch-2"'),
                           DPVOIP_PROVIDER_BRANCH_2_SECRET="s")
        self.assertEqual(self.settings(config, "branch-2").secret.reveal(), "s")

    def test_the_longer_of_two_names_takes_what_fits_it(self) -> None:
        text = BRANCH + BRANCH.replace('"branch"', '"branch_b"')
        config = self.load(text, DPVOIP_PROVIDER_BRANCH_B_SECRET="for-b",
                           DPVOIP_PROVIDER_BRANCH_SECRET="for-branch")
        self.assertEqual(self.settings(config, "branch_b").secret.reveal(), "for-b")
        self.assertEqual(self.settings(config, "branch").secret.reveal(), "for-branch")

    def test_two_names_that_are_one_in_the_environment_are_refused(self) -> None:
        text = BRANCH.replace('"branch"', '"a-b"') + BRANCH.replace('"branch"', '"a_b"')
        message = self.refused(text, DPVOIP_PROVIDER_A_B_SECRET="x")
        self.assertIn("environment DPVOIP_PROVIDER_A_B_SECRET: could set a key of the"
                      " providers 'a-b', 'a_b'", message)

    def test_a_provider_the_file_does_not_declare_is_an_unknown_setting(self) -> None:
        message = self.refused(BRANCH, DPVOIP_PROVIDER_GONE_SECRET="x")
        self.assertIn("environment DPVOIP_PROVIDER_GONE_SECRET: unknown setting", message)

    def test_an_unknown_key_names_the_variable_and_the_known_keys(self) -> None:
        message = self.refused(BRANCH, DPVOIP_PROVIDER_BRANCH_SECERT="typo")
        self.assertIn("environment DPVOIP_PROVIDER_BRANCH_SECERT:", message)
        self.assertIn("has no key 'secert' (known:", message)
        self.assertIn("secret", message)

    def test_a_bad_value_names_the_variable_and_the_type_not_the_value(self) -> None:
        message = self.refused(PBX, DPVOIP_PROVIDER_PBX_SECRET="s",
                               DPVOIP_PROVIDER_PBX_PORT="port-value")
        self.assertIn("environment DPVOIP_PROVIDER_PBX_PORT (", message)
        self.assertIn("[[provider]] 'pbx' port): expected an integer", message)
        self.assertIn("expected", message)
        self.assertNotIn("port-value", message)
        message = self.refused(BRANCH, DPVOIP_PROVIDER_BRANCH_CREATE_TICKETS="maybe-value")
        self.assertIn("environment DPVOIP_PROVIDER_BRANCH_CREATE_TICKETS", message)
        self.assertNotIn("maybe-value", message)

    def test_kind_and_name_stay_in_the_file(self) -> None:
        message = self.refused(BRANCH, DPVOIP_PROVIDER_BRANCH_KIND="asterisk")
        self.assertIn("a provider's kind and name are written in its [[provider]] table",
                      message)

    def test_the_zadarma_sections_names_do_not_reach_a_provider_table(self) -> None:
        """``ZADARMA_SECRET`` is the ``[zadarma]`` section's (the CRM's own name); a
        second account's secret is never taken from it."""
        config = self.load(BRANCH, ZADARMA_SECRET="main-secret")
        self.assertEqual(self.settings(config, "branch").secret.reveal(), "")
