"""A real PostgreSQL server for the tests, started as the tests' own process: Debian's package, on
127.0.0.1 at a free port, with a throw-away data folder (``make test`` installs the package when missing).

``postgres_server`` (one per test session) yields a function that creates a fresh database and returns
its URL, so that every test starts from an empty storage.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotInstalled(RuntimeError):
    """Debian's PostgreSQL binaries are not on this machine."""


@contextmanager
def postgres(root: Path) -> Iterator[Callable[[str], str]]:
    """A PostgreSQL server of its own on 127.0.0.1 with its data under ``root`` (a new folder); yields a
    function that creates a fresh, empty database and returns its URL. Used by the tests and by
    benchmarks/controller.py."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise NotInstalled("PostgreSQL is not installed (make test installs Debian's postgresql package)")
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    # PostgreSQL refuses to run as root: as root, run it as Debian's postgres user.
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        root.chmod(0o755)
        for parent in root.parents:  # the user must be able to reach its folder
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
    port = _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "sbsearch", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    import psycopg

    def new_database(name: str) -> str:
        with psycopg.connect(host="127.0.0.1", port=port, user="sbsearch", dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://sbsearch@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False, capture_output=True)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    try:
        with postgres(tmp_path_factory.mktemp("postgres")) as new_database:
            yield new_database
    except NotInstalled as e:
        pytest.skip(str(e))
