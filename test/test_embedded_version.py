"""An embedded data folder made by another PostgreSQL major version: started with the
binaries that made it when they are installed, else refused in one line saying what to
do, before anything runs. And the embedded server's own bookkeeping: an object stops only
the server it started, and a postmaster that is gone is told from one that runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from dpvoip.store.embedded import (
    EmbeddedError,
    EmbeddedPostgres,
    binaries_major,
    candidate_bindirs,
    choose_bindir,
    major_of,
    postmaster_alive,
    shared_memory_attached,
)


def folder_of(case: SynchronousTestCase) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="dpvoip-pgver-"))
    folder.chmod(0o755)
    case.addCleanup(shutil.rmtree, folder, True)
    return folder


def installed_major() -> str:
    major = binaries_major(candidate_bindirs()[0])
    assert major is not None
    return major


def other_major() -> str:
    """A major version that is certainly not installed here."""
    return "9.4"


def fake_bindir(folder: Path, version: str) -> Path:
    """Binaries that say they are ``version`` and do nothing else."""
    bindir = folder / f"fake-{version}" / "bin"
    bindir.mkdir(parents=True)
    for name in ("pg_ctl", "initdb", "postgres"):
        program = bindir / name
        program.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) {version}'\nexit 1\n")
        program.chmod(0o755)
    return bindir


class VersionsTests(SynchronousTestCase):
    def test_major_versions_as_postgresql_spells_them(self) -> None:
        self.assertEqual(major_of("15\n"), "15")
        self.assertEqual(major_of("9.6\n"), "9.6")
        self.assertEqual(major_of("pg_ctl (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"), "15")
        self.assertEqual(major_of("pg_ctl (PostgreSQL) 9.6.24"), "9.6")
        self.assertEqual(major_of("pg_ctl (PostgreSQL) 17beta1"), "17")
        self.assertIsNone(major_of("not a version"))

    def test_the_binaries_that_made_the_folder_are_chosen(self) -> None:
        a, b, c = Path("/a"), Path("/b"), Path("/c")
        installed = [(a, "17"), (b, "16"), (c, None)]
        self.assertEqual(choose_bindir(None, installed), a, "a new folder: the preferred")
        self.assertEqual(choose_bindir("16", installed), b)
        self.assertIsNone(choose_bindir("15", installed))


class OtherMajorVersionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = folder_of(self) / "pg"
        self.data = self.folder / "data"
        self.data.mkdir(parents=True)

    def test_a_folder_no_installed_version_made_is_refused_in_one_line(self) -> None:
        (self.data / "PG_VERSION").write_text(f"{other_major()}\n")
        before = sorted(p.name for p in self.folder.rglob("*"))
        cluster = EmbeddedPostgres(self.folder)
        with self.assertRaises(EmbeddedError) as refused:
            cluster.start()
        message = str(refused.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"the embedded database {self.data} was made by PostgreSQL "
                      f"{other_major()}, which is not installed (found: PostgreSQL "
                      f"{installed_major()}", message)
        self.assertIn(f"install PostgreSQL {other_major()} to run it as it is", message)
        self.assertIn(f"pg_dumpall and move {self.folder} aside", message)
        # Nothing ran: no log file, no lock file, no socket folder, the data as it was.
        self.assertEqual(sorted(p.name for p in self.folder.rglob("*")), before)
        self.assertFalse(cluster.running())
        cluster.stop()  # and nothing to stop

    def test_the_binaries_that_made_it_start_it_when_another_version_is_preferred(self
                                                                                   ) -> None:
        EmbeddedPostgres(self.folder).initialise()  # made by the installed version
        preferred = fake_bindir(self.folder.parent, "99.1")
        real = candidate_bindirs()
        cluster = EmbeddedPostgres(self.folder, search=lambda: [preferred, *real])
        self.assertEqual(cluster.bindir, real[0])
        cluster.start()
        self.addCleanup(cluster.stop, "immediate")
        self.assertTrue(cluster.running())
        self.assertEqual(cluster.started_pid, cluster.server_pid())
        # A folder new to the same search is made by the preferred version.
        fresh = EmbeddedPostgres(self.folder.parent / "new", search=lambda: [preferred, *real])
        self.assertEqual(fresh.bindir, preferred)


class OwnServerTests(SynchronousTestCase):
    """``stop`` after ``start`` stops only what that start started or adopted."""

    folder: Path

    @classmethod
    def setUpClass(cls) -> None:
        cls.folder = Path(tempfile.mkdtemp(prefix="dpvoip-pgown-")) / "pg"
        cls.folder.parent.chmod(0o755)
        EmbeddedPostgres(cls.folder).initialise()  # once: initdb is the slow part

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.folder.parent, True)

    def setUp(self) -> None:
        self.cluster = EmbeddedPostgres(self.folder)
        self.cluster.start()
        self.addCleanup(lambda: EmbeddedPostgres(self.folder).stop("immediate"))

    def test_a_failed_start_stops_nothing(self) -> None:
        # A start that failed before it had a server of its own (here: no binaries found)
        # must not stop, on its way out, the server another process runs on the folder.
        second = EmbeddedPostgres(self.folder, search=list)
        with self.assertRaises(EmbeddedError):
            second.start()
        second.stop()
        self.assertTrue(self.cluster.running())

    def test_a_server_another_process_started_since_is_not_stopped(self) -> None:
        pid = self.cluster.server_pid()
        assert pid is not None
        self.cluster.started_pid = pid + 1  # as if ours had died and another had started
        self.cluster.stop()
        self.assertTrue(self.cluster.running())
        self.cluster.started_pid = pid
        self.cluster.stop()
        self.assertFalse(self.cluster.running())
        self.assertFalse(postmaster_alive(pid))

    def test_an_adopted_server_is_stopped_by_its_adopter(self) -> None:
        adopter = EmbeddedPostgres(self.folder)
        adopter.start()  # a killed dpvoip's server, adopted under the state folder's lock
        self.assertEqual(adopter.started_pid, self.cluster.server_pid())
        adopter.stop()
        self.assertFalse(self.cluster.running())

    def test_a_running_postmaster_holds_its_shared_memory(self) -> None:
        pid = self.cluster.server_pid()
        assert pid is not None
        self.assertTrue(postmaster_alive(pid))
        self.assertFalse(postmaster_alive(os.getpid()), "a pid that is not a postmaster")
        lines = (self.folder / "data" / "postmaster.pid").read_text().splitlines()
        copy = self.folder.parent / "copy.pid"
        copy.write_text("\n".join(lines) + "\n")
        attached = shared_memory_attached(copy)
        if attached is not None:  # System V shared memory is listed (Linux)
            self.assertGreater(attached, 0)
            lines[6] = "  5432001 2147483000"  # a segment that does not exist
            copy.write_text("\n".join(lines) + "\n")
            self.assertEqual(shared_memory_attached(copy), 0)

    def test_a_lock_file_naming_another_program_does_not_block_the_start(self) -> None:
        # After a reboot (or a postmaster killed and left unreaped), postmaster.pid names a
        # pid that is no server: PostgreSQL, like `pg_ctl status`, takes any live pid for
        # one and refuses to start beside it.
        self.cluster.stop()
        data = self.folder / "data"
        (data / "postmaster.pid").write_text(
            f"{os.getpid()}\n{data}\n1700000000\n5432\n{self.cluster.socket_dir}\n\n"
            "  5432001 2147483000\nready   \n")
        self.assertFalse(self.cluster.running())
        again = EmbeddedPostgres(self.folder)
        again.start()
        self.assertTrue(again.running())
        self.assertNotEqual(again.server_pid(), os.getpid())
