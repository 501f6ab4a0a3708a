"""What a shared registry costs: PostgreSQL against the single-machine SQLite store, side by side.

Two costs matter to a replica:

- **per request**: whether the request's adapter exists is asked of the store every time (so a
  registration or deletion on another replica is seen at once). Measured as the latency of
  ``store.find(name)`` among ``--adapters`` registered names, round-robin between the two stores.
- **first use on a replica**: the uploaded bytes come from the database into the replica's cache once.
  Measured as ``blob_path`` on a cold cache against reading the same bytes from a local file.

``python -m benchmarks registry [--registry postgresql://…]`` (default: the test server of
``scripts/test-postgres.sh``, started if needed). Writes ``results/registry.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, run_suite, string_params

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks registry", description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", help="postgresql:// URL of an empty database (default: a test server)")
    p.add_argument("--adapters", type=int, default=1000, help="names registered before timing lookups")
    p.add_argument("--lookups", type=int, default=2000, help="lookups timed per store")
    p.add_argument("--blob-mib", type=int, nargs="+", default=[8, 64], help="blob sizes fetched cold")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="report name (default: registry)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the report is written")
    return p.parse_args(argv)


def test_database() -> str:
    """A fresh database on the server ``scripts/test-postgres.sh`` runs (started if needed)."""
    import psycopg

    server = os.environ.get("DEFT_TEST_POSTGRES_URL")
    if not server:
        out = subprocess.run(
            [str(ROOT / "scripts" / "test-postgres.sh"), "start"], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"DEFT_TEST_POSTGRES_URL=(\S+)", out)
        assert match is not None, out
        server = match.group(1)
    name = f"deft_bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + f"/{name}"


def _record(name: str, data: bytes) -> Any:
    from deft_server.store import AdapterRecord

    return AdapterRecord(
        name, hashlib.sha256(data).hexdigest(), "safetensors", "deft", "deft", "qr", (4,), 1, len(data), 0
    )


def _fill(store: Any, n: int) -> list[str]:
    names = [f"user-{i:05d}" for i in range(n)]
    for name in names:
        data = name.encode()
        path = store.cache.tmp / "upload"
        path.write_bytes(data)
        store.commit(_record(name, data), path)
    return names


def lookups(stores: dict[str, Any], names: list[str], count: int) -> dict[str, dict[str, float]]:
    """Microseconds per ``find``, the stores interleaved lookup by lookup."""
    samples: dict[str, list[float]] = {key: [] for key in stores}
    for i in range(count):
        name = names[(i * 7919) % len(names)]
        for key, store in stores.items():
            start = time.perf_counter()
            assert store.find(name) is not None
            samples[key].append((time.perf_counter() - start) * 1e6)
    return {
        key: {
            "p50_us": statistics.median(v),
            "p99_us": sorted(v)[int(0.99 * (len(v) - 1))],
        }
        for key, v in samples.items()
    }


def blob_fetch(url: str, root: Path, mib: int, repeats: int) -> dict[str, float]:
    """Seconds to bring ``mib`` MiB from the database into a cold cache, against a local file read."""
    from deft_server.store_postgres import PostgresStore

    data = torch.randint(
        0, 256, (mib << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(mib)
    )
    blob = data.numpy().tobytes()
    writer = PostgresStore(url, root / f"writer-{mib}")
    record = _record(f"blob-{mib}", blob)
    upload = writer.cache.tmp / "upload"
    upload.write_bytes(blob)
    start = time.perf_counter()
    writer.commit(record, upload)
    commit_s = time.perf_counter() - start
    local = writer.cache.blob_path(record.sha256)
    fetch, read = [], []
    for i in range(repeats):
        reader = PostgresStore(url, root / f"reader-{mib}-{i}")
        start = time.perf_counter()
        path = reader.blob_path(record.sha256)
        fetch.append(time.perf_counter() - start)
        assert path.stat().st_size == len(blob)
        reader.close()
        start = time.perf_counter()
        with local.open("rb") as f:
            while f.read(8 << 20):
                pass
        read.append(time.perf_counter() - start)
    writer.close()
    fetch_s, read_s = statistics.median(fetch), statistics.median(read)
    return {
        "mib": mib,
        "commit_s": commit_s,
        "fetch_s": fetch_s,
        "file_read_s": read_s,
        "fetch_mib_per_s": mib / fetch_s,
        "fetch_over_file_read": fetch_s / read_s,
    }


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from deft_server.store import SQLiteStore
    from deft_server.store_postgres import PostgresStore

    url = args.registry or test_database()
    stores = {"sqlite": SQLiteStore(root / "sqlite"), "postgresql": PostgresStore(url, root / "pg")}
    names = _fill(stores["sqlite"], args.adapters)
    _fill(stores["postgresql"], args.adapters)
    lookup = lookups(stores, names, args.lookups)
    for store in stores.values():
        store.close()
    blobs = [blob_fetch(url, root, mib, args.repeats) for mib in args.blob_mib]
    return {
        "lookup_us": lookup,
        "lookup_p50_postgresql_over_sqlite": lookup["postgresql"]["p50_us"] / lookup["sqlite"]["p50_us"],
        "blobs": blobs,
    }


def report(args: argparse.Namespace, payload: dict[str, Any]) -> str:
    rows = [{"store": key, **value} for key, value in payload["lookup_us"].items()]
    return "\n\n".join(
        [
            f"# registry ({args.adapters} adapters registered, {args.lookups} lookups each, interleaved)",
            "Per-request existence check (`store.find`), microseconds:",
            markdown_table(rows, ["store", "p50_us", "p99_us"]),
            f"PostgreSQL ÷ SQLite, p50: {payload['lookup_p50_postgresql_over_sqlite']:.2f}",
            "First use on a replica: blob streamed from PostgreSQL into a cold cache vs a local file read:",
            markdown_table(
                payload["blobs"],
                ["mib", "commit_s", "fetch_s", "file_read_s", "fetch_mib_per_s", "fetch_over_file_read"],
            ),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_suite(
        "registry",
        args.out or "registry",
        lambda root: measure(args, root),
        machine=lambda: machine_info(torch.device("cpu")),
        params=string_params(args, leave_out=["registry"]),  # the URL may hold a password
        report=lambda _name, payload: report(args, payload),
        out_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
