"""dpvoip's own schema, versioned, and the CRM tables of standalone mode.

Everything runs in one transaction under an advisory lock, so several instances starting
at once migrate once, and a failure leaves the database as it was. In attached mode the
CRM's tables are only checked, never created or altered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dpvoip.crm.schema import REQUIRED, CrmCapabilities, capabilities, missing

#: The CRM version dpvoip creates in standalone mode (a copy of the CRM's own DDL).
STANDALONE_DDL = "dpeconomy-2025-12.sql"
SHIPPED_DDL = ("dpeconomy-2025-12.sql", "dpeconomy-2026-08.sql")

_LOCK_KEY = 0x64707670  # "dpvp": one advisory lock id for all of dpvoip's schema work


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "dpvoip schema and migration ledger",
        """
        CREATE SCHEMA IF NOT EXISTS dpvoip;
        CREATE TABLE IF NOT EXISTS dpvoip.schema_migration (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        2,
        "instance facts (mode, CRM version seen)",
        """
        CREATE TABLE dpvoip.instance_fact (
            key text PRIMARY KEY,
            value text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        3,
        "phone directory: normalised numbers of the CRM's records",
        """
        CREATE TABLE dpvoip.directory_entry (
            source text NOT NULL,
            record_id bigint NOT NULL,
            field text NOT NULL,
            number text NOT NULL,
            PRIMARY KEY (source, record_id, field)
        );
        CREATE INDEX directory_entry_by_number
            ON dpvoip.directory_entry (number) INCLUDE (source, record_id, field);
        CREATE TABLE dpvoip.directory_watermark (
            source text PRIMARY KEY,
            updated_to timestamptz NOT NULL,
            region text NOT NULL,
            swept_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        4,
        "call details: what the CRM's call row has no column for",
        """
        CREATE TABLE dpvoip.call_detail (
            call_id text PRIMARY KEY,
            source text NOT NULL,
            box text,
            conn_id integer,
            direction text NOT NULL,
            remote_raw text NOT NULL DEFAULT '',
            remote_number text,
            own_number text NOT NULL DEFAULT '',
            line text NOT NULL DEFAULT '',
            extension integer,
            answered_at timestamptz,
            forwarded_to text,
            outcome text,
            started_at timestamptz NOT NULL,
            ended_at timestamptz,
            client_id bigint,
            contact_id integer,
            lead_id integer,
            deal_id integer,
            ticket_id bigint,
            hairpin boolean NOT NULL DEFAULT false,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX call_detail_by_box_connection
            ON dpvoip.call_detail (box, conn_id, started_at DESC);
        CREATE INDEX call_detail_by_remote_number
            ON dpvoip.call_detail (remote_number, started_at DESC);
        """,
    ),
    Migration(
        5,
        "Fritz!Box connection states, for dpvoip check",
        """
        CREATE TABLE dpvoip.box_status (
            box text PRIMARY KEY,
            host text NOT NULL,
            port integer NOT NULL,
            connected boolean NOT NULL,
            since timestamptz,
            last_line_at timestamptz,
            reconnects integer NOT NULL,
            lines bigint NOT NULL,
            bad_lines bigint NOT NULL,
            open_calls integer NOT NULL,
            reported_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        6,
        "Zadarma: the event journal, and what a Zadarma call keeps",
        """
        CREATE TABLE dpvoip.zadarma_event (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            pbx_call_id text NOT NULL,
            event text NOT NULL,
            calltype text NOT NULL,
            internal text NOT NULL,
            destination text NOT NULL,
            form jsonb NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (pbx_call_id, event, calltype, internal, destination)
        );
        ALTER TABLE dpvoip.call_detail
            ADD COLUMN pbx_call_id text,
            ADD COLUMN disposition text,
            ADD COLUMN calltype text,
            ADD COLUMN recording text,
            ADD COLUMN crm_touched boolean NOT NULL DEFAULT false;
        """,
    ),
    Migration(
        7,
        "click-to-call: dpvoip's API tokens and the record of every request",
        """
        CREATE TABLE dpvoip.api_token (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            user_id integer NOT NULL,
            label text NOT NULL DEFAULT '',
            token_sha256 text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now(),
            last_used_at timestamptz,
            revoked_at timestamptz
        );
        CREATE TABLE dpvoip.callback_request (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            requested_at timestamptz NOT NULL DEFAULT now(),
            user_id integer,
            login text NOT NULL,
            connection_id integer,
            from_number text,
            number_given text NOT NULL,
            number_dialled text,
            result text NOT NULL,
            http_status integer NOT NULL,
            message text NOT NULL DEFAULT ''
        );
        CREATE INDEX callback_request_by_user
            ON dpvoip.callback_request (user_id, requested_at DESC);
        """,
    ),
    Migration(
        8,
        "talk time kept apart from the CRM's duration; callbacks found by the phone rung",
        """
        ALTER TABLE dpvoip.call_detail ADD COLUMN talk_seconds integer;
        CREATE INDEX callback_request_by_from_number
            ON dpvoip.callback_request (from_number, requested_at DESC);
        """,
    ),
    Migration(
        9,
        "Zadarma: a signed string belongs to the call first seen with it",
        """
        CREATE TABLE dpvoip.zadarma_binding (
            signed_sha256 bytea NOT NULL,
            pbx_call_id text NOT NULL,
            bound_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (signed_sha256, pbx_call_id)
        );
        CREATE INDEX callback_request_by_number_dialled
            ON dpvoip.callback_request (number_dialled, requested_at DESC);
        """,
    ),
    Migration(
        10,
        "TR-064: how far each box's call list was processed; a call linked to its entry",
        """
        CREATE TABLE dpvoip.call_list_state (
            box text PRIMARY KEY,
            last_id bigint,
            list_timestamp bigint,
            certificate_sha256 text,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        ALTER TABLE dpvoip.call_detail ADD COLUMN list_id bigint;
        CREATE UNIQUE INDEX call_detail_by_list_entry
            ON dpvoip.call_detail (box, list_id) WHERE list_id IS NOT NULL;
        CREATE INDEX call_detail_by_box_start
            ON dpvoip.call_detail (box, started_at);
        """,
    ),
    Migration(
        11,
        "TR-064: each box's call list as the daemon last reported it (for dpvoip check)",
        """
        ALTER TABLE dpvoip.box_status ADD COLUMN call_list jsonb;
        """,
    ),
    Migration(
        12,
        "live events: every change of a call and of a box, kept for the browsers",
        """
        CREATE TABLE dpvoip.live_event (
            id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            kind text NOT NULL,
            call_id text,
            legs text[] NOT NULL DEFAULT '{}',
            data jsonb NOT NULL
        );
        CREATE INDEX live_event_by_call ON dpvoip.live_event (call_id, id)
            WHERE call_id IS NOT NULL;
        CREATE INDEX live_event_by_age ON dpvoip.live_event (at);
        CREATE FUNCTION dpvoip.box_status_live() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            event dpvoip.live_event;
        BEGIN
            IF TG_OP = 'INSERT' OR NEW.connected IS DISTINCT FROM OLD.connected THEN
                INSERT INTO dpvoip.live_event (kind, data) VALUES ('box',
                    jsonb_build_object('box', NEW.box, 'connected', NEW.connected,
                        'since', to_char(NEW.since AT TIME ZONE 'UTC',
                                         'YYYY-MM-DD"T"HH24:MI:SS"Z"')))
                    RETURNING * INTO event;
                PERFORM pg_notify('dpvoip_calls', (jsonb_build_object('event', 'box')
                    || event.data || jsonb_build_object('id', event.id))::text);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER box_status_live AFTER INSERT OR UPDATE ON dpvoip.box_status
            FOR EACH ROW EXECUTE FUNCTION dpvoip.box_status_live();
        """,
    ),
    Migration(
        13,
        "click-to-call: the requests counted against the per-user limit, on every instance",
        """
        ALTER TABLE dpvoip.callback_request ADD COLUMN counted_at timestamptz;
        CREATE INDEX callback_request_counted
            ON dpvoip.callback_request (user_id, counted_at) WHERE counted_at IS NOT NULL;
        """,
    ),
    Migration(
        14,
        "call details by ticket: a grouped missed call counts its ticket's calls",
        """
        CREATE INDEX call_detail_by_ticket
            ON dpvoip.call_detail (ticket_id) WHERE ticket_id IS NOT NULL;
        """,
    ),
    Migration(
        15,
        "Zadarma's journal found by age, to be pruned (BRIN: nearly free to keep up)",
        """
        CREATE INDEX zadarma_event_by_arrival
            ON dpvoip.zadarma_event USING brin (received_at);
        CREATE INDEX zadarma_binding_by_age
            ON dpvoip.zadarma_binding USING brin (bound_at);
        """,
    ),
    Migration(
        16,
        "phone directory: each entry's text as the CRM held it (a lookup parses it no more)",
        """
        ALTER TABLE dpvoip.directory_entry ADD COLUMN raw text;
        DROP INDEX dpvoip.directory_entry_by_number;
        CREATE INDEX directory_entry_by_number
            ON dpvoip.directory_entry (number) INCLUDE (source, record_id, field, raw);
        """,
    ),
    Migration(
        17,
        "phone directory: every record read again once, for its entries' text",
        # The next refresh re-reads every record in pages, in the background, each page's
        # entries replaced in one transaction (no lookup misses meanwhile); before, a
        # lookup parses what it finds without a text, as it always did.
        """
        UPDATE dpvoip.directory_watermark SET updated_to = least(updated_to, 'epoch');
        """,
    ),
)


class SchemaMismatch(Exception):
    """The CRM's tables lack what dpvoip needs; ``problems`` lists every missing item."""

    def __init__(self, schema: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"the CRM database (schema {schema!r}) lacks what dpvoip needs: "
            + "; ".join(problems)
        )


@dataclass(frozen=True)
class SchemaReport:
    mode: str
    schema_version: int
    applied_now: tuple[int, ...]
    crm_tables: tuple[str, ...]
    created_crm_tables: bool
    crm: CrmCapabilities = field(default_factory=CrmCapabilities)


def ddl_text(name: str) -> str:
    return resources.files("dpvoip.crm").joinpath("sql", name).read_text(encoding="utf-8")


async def read_catalogue(cursor: Any, schema: str) -> dict[str, set[str]]:
    await cursor.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = ANY(%s)",
        (schema, [*REQUIRED]),
    )
    present: dict[str, set[str]] = {}
    for table, column in cursor.fetchall():
        present.setdefault(table, set()).add(column)
    return present


async def prepare(cursor: Any, *, standalone: bool, crm_schema: str) -> SchemaReport:
    """Check (attached) or create (standalone) the CRM tables, then migrate ``dpvoip``."""
    await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
    present = await read_catalogue(cursor, crm_schema)
    created = False
    if standalone and not present:
        await cursor.execute(ddl_text(STANDALONE_DDL))
        await cursor.execute("RESET ALL")
        present = await read_catalogue(cursor, crm_schema)
        created = True
    problems = missing(present)
    if problems:
        raise SchemaMismatch(crm_schema, problems)
    applied = await _migrate(cursor)
    version = MIGRATIONS[-1].version
    mode = "standalone" if standalone else "attached"
    await cursor.execute(
        "INSERT INTO dpvoip.instance_fact (key, value) VALUES ('mode', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        (mode,),
    )
    return SchemaReport(
        mode=mode,
        schema_version=version,
        applied_now=tuple(applied),
        crm_tables=tuple(sorted(present)),
        created_crm_tables=created,
        crm=capabilities(present),
    )


async def _migrate(cursor: Any) -> list[int]:
    await cursor.execute(MIGRATIONS[0].sql)
    await cursor.execute("SELECT version FROM dpvoip.schema_migration")
    done = {row[0] for row in cursor.fetchall()}
    applied: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        if migration.version != 1:
            await cursor.execute(migration.sql)
        await cursor.execute(
            "INSERT INTO dpvoip.schema_migration (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
        applied.append(migration.version)
    return applied


async def schema_version(cursor: Any) -> int:
    """The newest applied migration, 0 when dpvoip's schema does not exist yet."""
    await cursor.execute("SELECT to_regclass('dpvoip.schema_migration') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return 0
    await cursor.execute("SELECT coalesce(max(version), 0) FROM dpvoip.schema_migration")
    return int(cursor.fetchone()[0])
