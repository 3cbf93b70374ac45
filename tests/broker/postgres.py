"""A throw-away PostgreSQL server for tests: Debian's binaries, a data directory in a temp
dir, a unix socket there and no TCP port at all, stopped at the end.

PostgreSQL refuses to run as root (CI runs as root): then the server runs as the ``postgres``
user the Debian package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path


def binaries() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb, or where $PATH finds initdb."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _major(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.as_user = None
        if os.geteuid() == 0:
            try:
                self.as_user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root and there is no 'postgres' user to run PostgreSQL as"
                ) from None
        # not pytest's tmp_path: it is private to root, and the server may run as postgres
        self.dir = Path(tempfile.mkdtemp(prefix="elastic-gpu-pg-"))
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        if self.as_user:
            os.chown(self.dir, self.as_user.pw_uid, self.as_user.pw_gid)
        self.started = False
        try:
            self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--no-sync")  # fmt: skip
            # fsync off: a throw-away server; the tests are about SQL, not about disks
            opts = f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -c fsync=off"
            self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "start")
            self.started = True
        except BaseException:
            self.stop()
            raise

    def _run(self, tool: str, *args) -> None:
        cmd = [str(self.bindir / tool), *map(str, args)]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user.pw_name, "--", *cmd]
        r = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=120)
        if r.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}{log}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.dir}"

    def new_database(self) -> str:
        """A fresh, empty database: one per test, so that no test sees another's leases."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.dir), user="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
