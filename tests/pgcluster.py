"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, ``initdb`` in a temp dir, ``pg_ctl`` on a
free port, stopped and removed after. No docker, no service, nothing outside the temp dir.

``initdb`` refuses to run as root, so as root the cluster runs as Debian's ``postgres`` user (the package makes it);
as anyone else, as that user. The superuser is always ``edgefleet`` with trust authentication on 127.0.0.1 and a
private socket directory. ``fsync`` and ``full_page_writes`` are off (a cluster that lives for one test module
needs speed, and only an OS crash, which no test makes, would lose what they protect); ``synchronous_commit`` stays
on, so a server killed on purpose (``stop("immediate")``) keeps every transaction it committed, as a real one does.

    with Cluster(tmp) as pg:
        url = pg.new_database()      # postgresql://edgefleet@127.0.0.1:PORT/db_1
        pg.restart()                 # stop (fast) and start again on the same port
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "edgefleet"


def bindir() -> Path:
    """The newest installed PostgreSQL's server binaries (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed (/usr/lib/postgresql/*/bin/initdb): "
                           "run `sh scripts/setup.sh test`, which installs Debian's postgresql")
    return Path(found[-1]).parent


class Cluster:
    """One PostgreSQL server in ``root`` (made if missing) on a free port of 127.0.0.1."""

    def __init__(self, root: Path | None = None) -> None:
        from fleet.broker import free_port

        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "postgres.log"
        self.port = free_port("127.0.0.1")
        self.bin = bindir()
        self._user = "postgres" if os.geteuid() == 0 else None
        self._names = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------
    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin / cmd[0]), *cmd[1:]]
        if self._user:
            argv = ["runuser", "-u", self._user, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
        if check and done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {' | '.join(tail)}")
        return done

    def start(self) -> "Cluster":
        if not (self.data / "PG_VERSION").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.sockets.mkdir(exist_ok=True)
            if self._user:
                entry = pwd.getpwnam(self._user)
                self.root.chmod(0o755)
                for p in (self.root, self.sockets):
                    os.chown(p, entry.pw_uid, entry.pw_gid)
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.sockets} "
                "-c fsync=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (clients disconnected, a clean shutdown) or ``immediate`` (as after a crash: recovery at start)."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def close(self) -> None:
        self.stop("immediate")
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- databases -----------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh one per test is cheap) and return its URL."""
        name = name or f"db_{next(self._names)}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql (no driver needed); returns its unaligned, tuples-only output."""
        return self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database,
                         "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout.strip()
