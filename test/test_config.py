"""The configuration as an administrator meets it: defaults, the TOML file, environment
overrides, error messages that name the setting (and never print a secret), the example file."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from dpvoip import cli
from dpvoip.config import (
    LIST_SECTIONS,
    SECTIONS,
    ClickToCallSettings,
    Config,
    ConfigError,
    CrmSettings,
    DaemonSettings,
    DatabaseSettings,
    DirectorySettings,
    FritzBoxSettings,
    InstanceSettings,
    LegacyMonitorSettings,
    LiveSettings,
    LogSettings,
    PageSettings,
    Secret,
    SpoolSettings,
    TicketSettings,
    WebSettings,
    ZadarmaSettings,
    apply_environment,
    describe,
    from_toml,
    load,
    parse,
)

EXAMPLE_FILE = Path(__file__).parent.parent / "etc" / "dpvoip.toml.example"

SECRETS = {
    "DATABASE_URL": "postgres://u:hunter2@h/db",
    "SECRET_KEY": "s3cr3t-key",
    "ZADARMA_SECRET": "zsecret",
    "FRITZ_API_TOKEN": "tok-123",
}


class ConfigTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="dpvoip-config-"))
        self.addCleanup(shutil.rmtree, self.home, True)

    def write(self, content: str | bytes) -> Path:
        path = self.home / "dpvoip.toml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def load_text(self, text: str, environ: Mapping[str, str] | None = None) -> Config:
        return load(self.write(text), environ or {})

    def error(self, text: str | None, environ: Mapping[str, str] | None = None) -> str:
        """The message of the ConfigError that loading ``text`` (None: no file) raises."""
        path = None if text is None else self.write(text)
        with self.assertRaises(ConfigError, msg=f"accepted {text!r} with {environ!r}") as caught:
            load(path, environ or {})
        return str(caught.exception)


class DefaultTests(ConfigTestCase):
    def test_no_file_and_empty_environment_give_safe_defaults(self) -> None:
        config = load(None, {})
        self.assertEqual(config, Config())
        self.assertEqual(config.web.listen, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(config.web.trusted_proxies, ("127.0.0.1/32", "::1/128"))
        self.assertEqual(
            [(box.name, box.host, box.port) for box in config.fritzbox],
            [("office", "fritz.box", 1012)],
        )
        self.assertFalse(config.database.url)
        self.assertTrue(config.embedded)
        self.assertTrue(config.standalone)
        self.assertEqual(config.state_path(Path("/srv")), Path("/srv/var"))

    def test_an_empty_file_is_the_defaults(self) -> None:
        self.assertEqual(self.load_text(""), Config())


FULL = """
[daemon]
state_dir = "/var/lib/dpvoip"
[instance]
name = "athens-1"
[spool]
max_mb = 16
alarm_percent = 70
deadline_seconds = 0.5
[log]
format = "json"
level = "debug"
[database]
url = "postgresql://crm@db/crm"
mode = "attached"
crm_schema = "crm"
pool_size = 8
connect_timeout = 7
statement_timeout = 2.5
[web]
listen = "tcp:9000:interface=0.0.0.0"
trusted_proxies = ["10.0.0.0/8", "2001:db8::/32"]
access_log = false
[crm]
secret_key = "django"
language = "el"
allowed_origins = ["https://crm.example"]
timezone = "Europe/Berlin"
[tickets]
withheld = true
urgent_at = 4
assign_by_number = { "2107654321" = "anna" }
[directory]
region = "DE"
own_numbers = ["+49 30 1234567"]
page_size = 200
[zadarma]
key = "k"
secret = "s"
sandbox = true
timezone = "Europe/Berlin"
api_url = "http://127.0.0.1:8443/"
api_timeout = 4
api_requests_per_minute = 50
[click_to_call]
allowed_countries = ["GR", "DE"]
blocked_prefixes = ["+30901"]
block_premium = false
per_user_per_minute = 2
session_cookie = "crm_session"
login_url = "/accounts/login/"
[[fritzbox]]
name = "athens"
host = "192.168.1.1"
own_numbers = ["+30 210 1234567"]
answering_machine_extensions = [40]
[[fritzbox]]
name = "berlin"
host = "fritz.berlin"
port = 2012
timezone = "Europe/Berlin"
country = "DE"
area_code = "30"
newline_keepalive_seconds = 30
[legacy_monitor]
token = "t"
[page]
client_url = "/clients/{id}/"
popup_for = "everyone"
[live]
watchers = "staff"
keep_minutes = 30
"""


class FileTests(ConfigTestCase):
    def test_every_section_becomes_typed_values(self) -> None:
        for section in [*SECTIONS, *LIST_SECTIONS]:
            self.assertIn(f"[{section}]", FULL, "a new section: add it to FULL")
        config = self.load_text(FULL)
        self.assertEqual(
            config,
            Config(
                daemon=DaemonSettings(state_dir="/var/lib/dpvoip"),
                instance=InstanceSettings(name="athens-1"),
                spool=SpoolSettings(max_mb=16, alarm_percent=70, deadline_seconds=0.5),
                log=LogSettings(format="json", level="debug"),
                database=replace(
                    DatabaseSettings(), url=Secret("postgresql://crm@db/crm"), mode="attached",
                    crm_schema="crm", pool_size=8, connect_timeout=7.0, statement_timeout=2.5,
                ),
                web=replace(
                    WebSettings(), listen="tcp:9000:interface=0.0.0.0",
                    trusted_proxies=("10.0.0.0/8", "2001:db8::/32"), access_log=False,
                ),
                crm=replace(
                    CrmSettings(), secret_key=Secret("django"), language="el",
                    allowed_origins=("https://crm.example",), timezone="Europe/Berlin",
                ),
                tickets=replace(
                    TicketSettings(), withheld=True, urgent_at=4,
                    assign_by_number={"2107654321": "anna"},
                ),
                directory=replace(
                    DirectorySettings(), region="DE", own_numbers=("+49 30 1234567",),
                    page_size=200,
                ),
                zadarma=replace(
                    ZadarmaSettings(), key=Secret("k"), secret=Secret("s"), sandbox=True,
                    timezone="Europe/Berlin", api_url="http://127.0.0.1:8443/",
                    api_timeout=4.0, api_requests_per_minute=50,
                ),
                click_to_call=ClickToCallSettings(
                    allowed_countries=("GR", "DE"), blocked_prefixes=("+30901",),
                    block_premium=False, per_user_per_minute=2, session_cookie="crm_session",
                    login_url="/accounts/login/",
                ),
                fritzbox=(
                    replace(
                        FritzBoxSettings(), name="athens", host="192.168.1.1",
                        own_numbers=("+30 210 1234567",), answering_machine_extensions=(40,),
                    ),
                    replace(
                        FritzBoxSettings(), name="berlin", host="fritz.berlin", port=2012,
                        timezone="Europe/Berlin", country="DE", area_code="30",
                        newline_keepalive_seconds=30.0,
                    ),
                ),
                legacy_monitor=LegacyMonitorSettings(token=Secret("t")),
                page=PageSettings(client_url="/clients/{id}/", popup_for="everyone"),
                live=replace(LiveSettings(), watchers="staff", keep_minutes=30.0),
            ),
        )
        self.assertIsInstance(config.database.connect_timeout, float)
        self.assertIsInstance(config.database.url, Secret)
        self.assertEqual(config.database.url.reveal(), "postgresql://crm@db/crm")
        self.assertFalse(config.embedded)
        self.assertFalse(config.standalone)

    def test_wrong_or_impossible_settings_name_the_setting_and_the_problem(self) -> None:
        two_offices = '[[fritzbox]]\nhost = "a"\n[[fritzbox]]\nhost = "b"\n'
        cases: list[tuple[str, list[str]]] = [
            ("[web]\nlisten_port = 8080", ["[web] unknown key 'listen_port'", "listen"]),
            ("[webserver]\nlisten = 1", ["unknown section [webserver]", "web"]),
            ("web = 5", ["[web] must be a table"]),
            ('[fritzbox]\nname = "x"', ["[[fritzbox]] must be an array of tables"]),
            ('[database]\npool_size = "4"', ["[database] pool_size: expected an integer",
                                             "got a string"]),
            ("[database]\npool_size = 4.5", ["[database] pool_size: expected an integer"]),
            ("[database]\npool_size = true", ["[database] pool_size: expected an integer",
                                             "got true/false"]),
            ("[web]\naccess_log = 1", ["[web] access_log: expected true or false",
                                       "got an integer"]),
            ('[log]\nlevel = ["info"]', ["[log] level: expected a string", "got a list"]),
            ('[web]\ntrusted_proxies = "10.0.0.1"', ["[web] trusted_proxies: expected a list",
                                                     "got a string"]),
            ("[[fritzbox]]\nport = 70000", ["[[fritzbox]] #1 port", "between 1 and 65535"]),
            ('[[fritzbox]]\nname = "a"\n[[fritzbox]]\nname = "b"\nport = 0',
             ["[[fritzbox]] #2 port", "between 1 and 65535"]),
            ('[web]\nlisten = "tcp:70000"', ["[web] listen", "port number"]),
            ('[web]\nlisten = "8080"', ["[web] listen", "Twisted endpoint"]),
            ('[web]\nlisten = "unix:"', ["[web] listen", "socket path"]),
            ("[database]\npool_size = 0", ["[database] pool_size", "between 1 and 64"]),
            ('[database]\nmode = "remote"', ["[database] mode", "must be one of"]),
            ('[zadarma]\ntimezone = "Mars/Olympus"', ["[zadarma] timezone", "unknown time zone"]),
            ('[zadarma]\ntimezone = "Europe"', ["[zadarma] timezone", "unknown time zone"]),
            ('[[fritzbox]]\ntimezone = "../x"', ["[[fritzbox]] #1 timezone", "unknown time zone"]),
            ('[[fritzbox]]\ncountry = "XX"', ["[[fritzbox]] #1 country", "unknown country"]),
            ('[[fritzbox]]\narea_code = "0-30"', ["[[fritzbox]] #1 area_code", "digits only"]),
            ('[[fritzbox]]\nname = "Office 1"', ["[[fritzbox]] #1 name", "lower-case"]),
            ('[web]\ntrusted_proxies = ["10.0.0.0/33"]',
             ["[web] trusted_proxies", "'10.0.0.0/33' is not an IP address or network"]),
            (two_offices, ["[[fritzbox]] name 'office' is used twice"]),
            ('[database]\nmode = "attached"', ["[database] mode 'attached' needs url"]),
            ("[web\nlisten = 1", ["not valid TOML", "line 1"]),
            ('[crm]\nallowed_origins = ["crm.example.com"]',
             ["[crm] allowed_origins", "not an origin"]),
            ('[click_to_call]\nallowed_countries = ["UK"]',
             ["[click_to_call] allowed_countries", "unknown country 'UK'"]),
            ('[click_to_call]\nblocked_prefixes = ["0901"]',
             ["[click_to_call] blocked_prefixes", "E.164"]),
            ("[click_to_call]\nper_user_per_minute = 0",
             ["[click_to_call] per_user_per_minute", "between 1 and 100"]),
            ('[click_to_call]\nsession_cookie = "a b"', ["[click_to_call] session_cookie"]),
            ('[zadarma]\napi_url = "https://api.zadarma.com/v1/"', ["[zadarma] api_url",
                                                                   "no path"]),
            ('[zadarma]\napi_url = "ftp://x"', ["[zadarma] api_url", "base URL"]),
            ("[zadarma]\napi_requests_per_minute = 101",
             ["[zadarma] api_requests_per_minute", "between 1 and 100"]),
        ]
        for text, fragments in cases:
            message = self.error(text)
            self.assertIn(str(self.home / "dpvoip.toml"), message, text)
            for fragment in fragments:
                self.assertIn(fragment, message, f"for {text!r}")

    def test_an_unreadable_file_is_named_with_the_reason(self) -> None:
        missing = self.home / "nowhere.toml"
        cases: list[tuple[Path, str]] = [
            (missing, "No such file or directory"),
            (self.home, "Is a directory"),
            (self.write(b'[web]\nlisten = "tcp:80\xff"\n'), "not UTF-8"),
        ]
        for path, reason in cases:
            with self.assertRaises(ConfigError) as caught:
                load(path, {})
            self.assertIn(str(path), str(caught.exception))
            self.assertIn(reason, str(caught.exception))


class EnvironmentTests(ConfigTestCase):
    def test_each_variable_sets_its_setting(self) -> None:
        cases: list[tuple[str, str, Callable[[Config], object], object]] = [
            ("DATABASE_URL", "pg://h/db", lambda c: c.database.url, Secret("pg://h/db")),
            ("FRITZ_HOST", "10.0.0.1", lambda c: c.fritzbox[0].host, "10.0.0.1"),
            ("FRITZ_PORT", "1013", lambda c: c.fritzbox[0].port, 1013),
            ("FRITZ_API_TOKEN", "tok", lambda c: c.legacy_monitor.token, Secret("tok")),
            ("ZADARMA_KEY", "zk", lambda c: c.zadarma.key, Secret("zk")),
            ("ZADARMA_SECRET", "zs", lambda c: c.zadarma.secret, Secret("zs")),
            ("SECRET_KEY", "dj", lambda c: c.crm.secret_key, Secret("dj")),
            ("DPVOIP_WEB_LISTEN", "unix:/run/d.sock", lambda c: c.web.listen, "unix:/run/d.sock"),
            ("DPVOIP_DATABASE_POOL_SIZE", " 12 ", lambda c: c.database.pool_size, 12),
            ("DPVOIP_DATABASE_CONNECT_TIMEOUT", "2.5", lambda c: c.database.connect_timeout, 2.5),
            ("DPVOIP_WEB_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1,",
             lambda c: c.web.trusted_proxies, ("10.0.0.0/8", "192.168.1.1")),
            ("DPVOIP_FRITZBOX_ANSWERING_MACHINE_EXTENSIONS", "6,40",
             lambda c: c.fritzbox[0].answering_machine_extensions, (6, 40)),
            ("DPVOIP_ZADARMA_SANDBOX", "yes", lambda c: c.zadarma.sandbox, True),
            ("DPVOIP_ZADARMA_SANDBOX", "off", lambda c: c.zadarma.sandbox, False),
            ("DPVOIP_WEB_ACCESS_LOG", "0", lambda c: c.web.access_log, False),
            ("DPVOIP_WEB_ACCESS_LOG", "TRUE", lambda c: c.web.access_log, True),
        ]
        for name, value, get, want in cases:
            got = get(load(None, {name: value}))
            self.assertEqual(got, want, f"{name}={value!r}")
            self.assertIs(type(got), type(want), f"{name}={value!r}")

    def test_database_url_means_attached_to_the_crm(self) -> None:
        config = load(None, {"DATABASE_URL": "postgres://u@h/db"})
        self.assertFalse(config.embedded)
        self.assertFalse(config.standalone)

    def test_environment_beats_the_file_and_fritz_variables_touch_only_the_first_box(
        self,
    ) -> None:
        config = self.load_text(FULL, {
            "DPVOIP_DATABASE_POOL_SIZE": "9", "DPVOIP_WEB_LISTEN": "tcp:8181",
            "FRITZ_PORT": "4000", "SECRET_KEY": "from-env",
        })
        self.assertEqual(config.database.pool_size, 9)
        self.assertEqual(config.web.listen, "tcp:8181")
        self.assertEqual(config.crm.secret_key, Secret("from-env"))
        self.assertEqual([b.port for b in config.fritzbox], [4000, 2012])
        self.assertEqual([b.name for b in config.fritzbox], ["athens", "berlin"])
        self.assertEqual(config.database.statement_timeout, 2.5)  # untouched file value

    def test_attached_mode_in_the_file_with_database_url_in_the_environment(self) -> None:
        config = self.load_text('[database]\nmode = "attached"\n', {"DATABASE_URL": "pg://h/db"})
        self.assertFalse(config.standalone)

    def test_other_variables_are_ignored_and_dpvoip_config_is_allowed(self) -> None:
        environ = {"DPVOIP_CONFIG": "/etc/dpvoip.toml", "PATH": "/bin", "HOME": "/root"}
        self.assertEqual(load(None, environ), Config())

    def test_bad_variables_are_named(self) -> None:
        cases: list[tuple[dict[str, str], list[str]]] = [
            ({"DPVOIP_FOO_BAR": "1"}, ["DPVOIP_FOO_BAR", "unknown setting"]),
            ({"DPVOIP_WEB_LISTN": "tcp:1"}, ["DPVOIP_WEB_LISTN", "unknown setting"]),
            ({"DPVOIP_DATABASE_POOL_SIZE": "many"},
             ["DPVOIP_DATABASE_POOL_SIZE", "[database] pool_size", "expected an integer"]),
            ({"DPVOIP_DATABASE_POOL_SIZE": "100"}, ["DPVOIP_DATABASE_POOL_SIZE",
                                                    "between 1 and 64"]),
            ({"FRITZ_PORT": "70000"}, ["FRITZ_PORT", "[[fritzbox]] port", "between 1 and 65535"]),
            ({"DPVOIP_WEB_ACCESS_LOG": "maybe"}, ["DPVOIP_WEB_ACCESS_LOG", "true or false"]),
            ({"DPVOIP_WEB_TRUSTED_PROXIES": "10.0.0.0/8,nonsense"},
             ["DPVOIP_WEB_TRUSTED_PROXIES", "'nonsense' is not an IP address"]),
            ({"DPVOIP_ZADARMA_TIMEZONE": "Nowhere/City"},
             ["DPVOIP_ZADARMA_TIMEZONE", "unknown time zone"]),
            ({"DPVOIP_DATABASE_MODE": "attached"}, ["[database] mode 'attached' needs url"]),
        ]
        for environ, fragments in cases:
            message = self.error(None, environ)
            for fragment in fragments:
                self.assertIn(fragment, message, f"for {environ!r}")


class SecretTests(ConfigTestCase):
    def test_a_bad_secret_value_is_never_printed(self) -> None:
        cases: list[tuple[str, str, str]] = [
            ("[database]\nurl = 987654321", "[database] url", "987654321"),
            ('[database]\nurl = ["postgres://u:hunter2@h/db"]', "[database] url", "hunter2"),
            ('[zadarma]\nsecret = ["zsecret"]', "[zadarma] secret", "zsecret"),
            ('[crm]\nsecret_key = {k = "s3cr3t-key"}', "[crm] secret_key", "s3cr3t-key"),
            ("[legacy_monitor]\ntoken = true", "[legacy_monitor] token", "true"),
            ('[database]\nurl = "postgres://u:hunter2@h/db\n', "not valid TOML", "hunter2"),
        ]
        for text, names, secret in cases:
            with self.assertRaises(ConfigError) as caught:
                from_toml(parse(text))
            message = str(caught.exception)
            self.assertIn(names, message)
            self.assertNotIn(secret, message, f"for {text!r}")

    def test_a_loaded_config_masks_every_secret(self) -> None:
        config = load(None, SECRETS)
        for shown in (repr(config), str(config), repr(config.database), str(config.crm)):
            for secret in SECRETS.values():
                self.assertNotIn(secret, shown)
        self.assertIn("Secret('***')", repr(config.database))
        self.assertEqual(config.database.url.reveal(), SECRETS["DATABASE_URL"])
        self.assertEqual(config.crm.secret_key.reveal(), SECRETS["SECRET_KEY"])
        self.assertEqual(config.zadarma.secret.reveal(), SECRETS["ZADARMA_SECRET"])
        self.assertEqual(config.legacy_monitor.token.reveal(), SECRETS["FRITZ_API_TOKEN"])

    def test_secret_compares_by_value_and_is_false_when_empty(self) -> None:
        self.assertEqual(Secret("a"), Secret("a"))
        self.assertNotEqual(Secret("a"), Secret("b"))
        self.assertNotEqual(Secret("a"), "a")
        self.assertFalse(Secret(""))
        self.assertTrue(Secret("a"))
        self.assertEqual(str(Secret("a")), "Secret('***')")


class ExampleConfigTests(ConfigTestCase):
    def test_the_example_is_the_defaults(self) -> None:
        config = from_toml(parse(cli.example_config(), "example"), "example")
        self.assertEqual(config, Config())
        self.assertEqual(apply_environment(config, {}), load(None, {}))

    def test_the_example_shows_every_key_and_its_variables(self) -> None:
        text = cli.example_config()
        data = parse(text)
        for section, key, _default, _doc, envs in describe():
            table = data[section][0] if section == "fritzbox" else data[section]
            self.assertIn(key, table, f"[{section}] {key} missing from the example")
            self.assertIn(f"# environment: {envs}", text)
        self.assertEqual(len(data["fritzbox"]), 1)

    def test_the_example_holds_no_secret(self) -> None:
        self.patch(os, "environ", dict(SECRETS))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli.main(["example-config"]), 0)
        self.assertEqual(out.getvalue(), cli.example_config())
        for secret in SECRETS.values():
            self.assertNotIn(secret, out.getvalue())
        data = parse(out.getvalue())
        for section, key, default, _doc, _envs in describe():
            if isinstance(default, Secret):
                table = data[section]
                shown = table[0] if isinstance(table, list) else table  # [[fritzbox]]
                self.assertEqual(shown[key], "", f"[{section}] {key}")

    def test_the_shipped_example_file_is_current(self) -> None:
        self.assertTrue(EXAMPLE_FILE.exists(),
                        f"{EXAMPLE_FILE} is missing: dpvoip example-config > it")
        self.assertEqual(
            EXAMPLE_FILE.read_text(encoding="utf-8"), cli.example_config(),
            "etc/dpvoip.toml.example is stale: regenerate it with `dpvoip example-config`",
        )


# -- the provider list ([[provider]], issue 20) ----------------------------------------------


class _NullKind:
    """A provider kind of these tests' own (its settings: a secret and a number)."""

    kind = "null"

    def read_settings(self, table: Mapping[str, object], where: str) -> object:
        from dataclasses import dataclass

        from dpvoip.config import read_section, setting

        @dataclass(frozen=True)
        class NullSettings:
            password: Secret = setting(Secret(""), "a secret", lambda v: None if len(
                v.reveal()) >= 8 else "too short")
            lines: int = setting(1, "how many lines")

        return read_section(NullSettings, table, where)

    def check_lines(self, name: str, settings: object) -> list[str]:
        return [f"provider {name} (null)"]

    def build(self, name: str, settings: object, tools: object) -> object:
        raise AssertionError("not built in these tests")


def _kinds(**extra: Callable[[], object]) -> dict[str, Callable[[], object]]:
    from dpvoip.zadarma.provider import KIND

    return {"zadarma": lambda: KIND, "null": _NullKind, **extra}


class ProviderListTests(ConfigTestCase):
    def config(self, text: str, environ: Mapping[str, str] | None = None) -> Config:
        return load(self.write(text), environ or {}, kinds=_kinds())

    def refused(self, text: str, environ: Mapping[str, str] | None = None) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.config(text, environ)
        return str(caught.exception)

    def test_without_tables_the_zadarma_section_is_the_one_provider(self) -> None:
        for config in (Config(), self.config('[zadarma]\nsecret = "s"\n'),
                       self.config("", {"ZADARMA_SECRET": "s"})):
            [provider] = config.all_providers
            self.assertEqual((provider.name, provider.kind), ("zadarma", "zadarma"))
            self.assertIs(provider.settings, config.zadarma)

    def test_tables_in_their_order_several_of_one_kind(self) -> None:
        config = self.config(
            '[[provider]]\nkind = "zadarma"\nname = "branch"\nsecret = "s2"\n'
            'allowed_networks = ["10.0.0.0/8"]\n'
            '[[provider]]\nkind = "null"\nname = "pbx"\nlines = 4\n'
            '[[provider]]\nkind = "zadarma"\nname = "zadarma"\n')
        self.assertEqual([(p.name, p.kind) for p in config.all_providers],
                         [("branch", "zadarma"), ("pbx", "null"), ("zadarma", "zadarma")])
        branch = config.all_providers[0].settings
        self.assertIsInstance(branch, ZadarmaSettings)
        self.assertEqual((branch.secret, branch.allowed_networks),
                         (Secret("s2"), ("10.0.0.0/8",)))
        self.assertEqual(config.all_providers[1].settings.lines, 4)

    def test_tables_and_an_untouched_zadarma_section_mean_no_zadarma_provider(self) -> None:
        config = self.config('[zadarma]\n[[provider]]\nkind = "null"\nname = "pbx"\n')
        self.assertEqual([p.name for p in config.all_providers], ["pbx"])

    def test_the_zadarma_section_set_by_file_or_environment_comes_first(self) -> None:
        table = '[[provider]]\nkind = "null"\nname = "pbx"\n'
        for text, environ in ((table + '[zadarma]\ncreate_tickets = true\n', {}),
                              (table, {"ZADARMA_KEY": "k"}),
                              (table, {"DPVOIP_ZADARMA_SANDBOX": "true"})):
            self.assertEqual([p.name for p in self.config(text, environ).all_providers],
                             ["zadarma", "pbx"], (text, environ))

    def test_a_table_named_zadarma_beside_the_zadarma_section_is_refused(self) -> None:
        message = self.refused('[[provider]]\nkind = "null"\nname = "zadarma"\n',
                               {"ZADARMA_SECRET": "s"})
        self.assertIn("[[provider]] name 'zadarma' is the [zadarma] section's provider",
                      message)
        self.assertNotIn("s\n", message)

    def test_unknown_kinds_are_refused_naming_the_installed_ones(self) -> None:
        message = self.refused('[[provider]]\nkind = "asterisk"\nname = "pbx"\n')
        self.assertIn("[[provider]] 'pbx' kind: unknown kind 'asterisk' (installed: null, "
                      "zadarma)", message)

    def test_kind_and_name_are_required_and_names_are_checked(self) -> None:
        for text, expected in (
                ('[[provider]]\nname = "pbx"\n', "[[provider]] #1: kind missing"),
                ('[[provider]]\nkind = "null"\n', "[[provider]] #1: name missing"),
                ('[[provider]]\nkind = "null"\nname = "PBX 1"\n',
                 "[[provider]] #1 name: must be 1-20 characters"),
                ('[[provider]]\nkind = "null"\nname = "a"\n[[provider]]\nkind = "zadarma"\n'
                 'name = "a"\n', "[[provider]] name 'a' is used twice"),
                ('[[fritzbox]]\nname = "office"\n[[provider]]\nkind = "null"\nname = "office"\n',
                 "[[provider]] name 'office' is also a [[fritzbox]] name"),
                ('[[provider]]\nkind = "null"\nname = "events"\n',
                 "[[provider]] name 'events' is the path of one of dpvoip's own routes"),
                ('provider = {kind = "null"}\n', "[[provider]] must be an array of tables")):
            self.assertIn(expected, self.refused(text), text)

    def test_a_kinds_own_keys_are_checked_naming_the_key_never_a_secret(self) -> None:
        for text, expected in (
                ('[[provider]]\nkind = "null"\nname = "pbx"\nlines = "four"\n',
                 "[[provider]] 'pbx' lines: expected an integer, got a string"),
                ('[[provider]]\nkind = "null"\nname = "pbx"\ncolour = 1\n',
                 "[[provider]] 'pbx' unknown key 'colour' (known: lines, password)"),
                ('[[provider]]\nkind = "null"\nname = "pbx"\npassword = "hunter2"\n',
                 "[[provider]] 'pbx' password: is not valid"),
                ('[[provider]]\nkind = "zadarma"\nname = "branch"\nsecret = 7\n',
                 "[[provider]] 'branch' secret: expected a string")):
            message = self.refused(text)
            self.assertIn(expected, message, text)
            self.assertNotIn("hunter2", message)
        config = self.config('[[provider]]\nkind = "null"\nname = "pbx"\n'
                             'password = "hunter2-long"\n')
        self.assertNotIn("hunter2", repr(config))

    def test_a_plugin_that_cannot_be_loaded_is_named(self) -> None:
        def broken() -> object:
            raise ImportError("No module named 'dpvoip_broken'")

        with self.assertRaises(ConfigError) as caught:
            load(self.write('[[provider]]\nkind = "broken"\nname = "pbx"\n'), {},
                 kinds=_kinds(broken=broken))
        self.assertIn("[[provider]] 'pbx' kind: the plugin of kind 'broken' cannot be "
                      "loaded: ImportError: No module named 'dpvoip_broken'",
                      str(caught.exception))

    def test_the_installed_kinds_are_the_default(self) -> None:
        config = load(self.write('[[provider]]\nkind = "zadarma"\nname = "branch"\n'), {})
        self.assertEqual([p.kind for p in config.all_providers], ["zadarma"])
        with self.assertRaises(ConfigError) as caught:
            load(self.write('[[provider]]\nkind = "nosuchkind"\nname = "x"\n'), {})
        self.assertIn("installed: ", str(caught.exception))
        self.assertIn("zadarma", str(caught.exception))

    def test_the_example_tells_of_the_provider_list(self) -> None:
        text = cli.example_config()
        self.assertIn("This section is the provider kind = \"zadarma\"", " ".join(
            line.removeprefix("# ") for line in text.splitlines()))
        self.assertIn("/voip/zd/<name>/", text)
