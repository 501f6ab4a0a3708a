"""Fixtures for the end-to-end tests: real ``deft serve`` processes on free loopback ports, and a real
PostgreSQL server for the shared registry.

Each server gets its own data folder; the tiny model is built once per session into a shared
temporary cache folder. PostgreSQL: ``DEFT_TEST_POSTGRES_URL`` if set (``.ci/run`` starts one with
``scripts/test-postgres.sh``), else the tests start that script themselves, else they skip.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180


#: the console script of the interpreter running the tests (its bin/ need not be on PATH, as in CI)
DEFT_EXECUTABLE = Path(sys.executable).parent / "deft"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server process: its address, folders and log, and how to stop it."""

    def __init__(
        self, data_dir: Path, cache_dir: Path, log_path: Path, args: list[str], launcher: list[str]
    ) -> None:
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.data_dir, self.log_path = data_dir, log_path
        self.address = f"127.0.0.1:{self.port}"
        command = [
            *launcher,
            *("--port", str(self.port), "--metrics-port", str(self.metrics_port)),
            *("--http-port", str(self.http_port)),
            *("--data-dir", str(data_dir), "--log-level", "INFO", *args),
        ]
        # tests build their adapters for tiny-sdxl (random weights, fast); a --model flag still wins
        env = {
            **os.environ,
            "DEFT_MODEL": "tiny-sdxl",
            "DEFT_CACHE_DIR": str(cache_dir),
            "HF_HUB_OFFLINE": "1",
        }
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("DEFT_SERVER", None)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )

    def wait_ready(self) -> ServerProcess:
        from deft_client import DeftClient, DeftError

        end = time.monotonic() + STARTUP_TIMEOUT_S
        with DeftClient(self.address) as client:
            while time.monotonic() < end:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
                try:
                    client.wait_ready(timeout=2)
                    return self
                except DeftError:
                    continue
        raise TimeoutError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def send(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Terminate (then kill) if still running; always leaves the process reaped."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where servers build and find tiny-sdxl (built by the first server, reused by the others)."""
    return tmp_path_factory.mktemp("deft-model-cache")


class ServerFactory:
    def __init__(self, root: Path, cache_dir: Path) -> None:
        self.root, self.cache_dir = root, cache_dir
        self.started: list[ServerProcess] = []

    def start(
        self,
        *args: str,
        data_dir: Path | None = None,
        via_cli: bool = False,
        prelude: str | None = None,
        wait: bool = True,
    ) -> ServerProcess:
        """``deft serve`` (``via_cli``) or ``python -m deft_server``; ``prelude`` is Python run first
        in the server process (e.g. to slow down model loading)."""
        n = len(self.started)
        data_dir = data_dir or self.root / f"data-{n}"
        if prelude is not None:
            main = f"{prelude}\nimport sys\nfrom deft_cli.app import app\napp(['serve', *sys.argv[1:]])"
            launcher = [sys.executable, "-c", main]
        elif via_cli:
            launcher = [str(DEFT_EXECUTABLE), "serve"]
        else:
            launcher = [sys.executable, "-m", "deft_server"]
        server = ServerProcess(data_dir, self.cache_dir, self.root / f"server-{n}.log", list(args), launcher)
        self.started.append(server)
        return server.wait_ready() if wait else server


@pytest.fixture(scope="module")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_cache: Path
) -> Iterator[ServerFactory]:
    """Start servers with ``server_factory.start(*flags)``; all are stopped when the module ends."""
    factory = ServerFactory(tmp_path_factory.mktemp("deft-servers"), tiny_model_cache)
    yield factory
    for server in factory.started:
        server.stop()


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of a running PostgreSQL server (its admin database)."""
    url = os.environ.get("DEFT_TEST_POSTGRES_URL")
    if url:
        return url
    started = subprocess.run(
        [str(ROOT / "scripts" / "test-postgres.sh"), "start"], capture_output=True, text=True, check=False
    )
    if started.returncode == 3:
        pytest.skip(f"no PostgreSQL server: {started.stderr.strip()}")
    if started.returncode != 0:
        raise RuntimeError(f"scripts/test-postgres.sh start failed:\n{started.stderr}")
    match = re.search(r"DEFT_TEST_POSTGRES_URL=(\S+)", started.stdout)
    assert match is not None, started.stdout
    return match.group(1)


@pytest.fixture(scope="session")
def make_postgres_db(postgres_server: str) -> Iterator[Callable[[], str]]:
    """``make_postgres_db()`` creates an empty database and returns its URL; all are dropped at the end."""
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL tests need: pip install 'deft[postgres]'")
    created: list[str] = []

    def make() -> str:
        name = f"deft_test_{secrets.token_hex(6)}"
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return postgres_server.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(make_postgres_db: Callable[[], str]) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return make_postgres_db()
