"""This process's files under ``--data-dir``: the index-independent half of the registry's storage.

Layout::

    blobs/sha256/ab/abcdef…                      uploaded bytes by sha256 (SQLite: the blobs themselves;
                                                 PostgreSQL: a cache, filled on first use)
    compiled/<base digest>/<sha256>.safetensors  compiled factors (A, Bᵀ) per layer, float32 (a cache)
    tmp/<pid>-<token>/                          this process's uploads in progress
    tmp/<pid>-<token>.claims/<sha256>           bytes this process is registering (kept from GC)
    .space-reserve                              bytes set aside so deletions work on a full disk

The index (:class:`~deft_server.store.AdapterStore`: SQLite or PostgreSQL) says which sha256s are
registered; this cache holds files by sha256 and never decides that on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from deft_server.compiled_file import (
    COMPILED_FORMAT,
    CompiledReadPlan,
    compiled_tensors,
    plan_compiled_read,
    read_compiled,
)

from deft_runtime.adapter import AdapterKind, BaseFingerprint
from deft_runtime.compile import CompiledAdapter
from deft_runtime.formats.safetensors_io import write_safetensors_atomic

log = logging.getLogger(__name__)

#: bytes kept free in ``--data-dir`` (a file released when the disk is full), so deleting adapters, which
#: needs a little space for SQLite's journal, works on a full disk and frees the space
RESERVE_BYTES = 1 << 20
RESERVE_NAME = ".space-reserve"


#: compiled-file read plans kept in memory (a few hundred bytes per layer each)
_PLANS_KEPT = 1024


class LocalCache:
    """Blobs, compiled factors, uploads in progress and their garbage collection, under one folder.

    Thread-safe (files are written atomically and named by content); every method does blocking I/O.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()
        self.blobs = self.root / "blobs" / "sha256"
        self.compiled = self.root / "compiled"
        self.tmp_root = self.root / "tmp"
        for folder in (self.blobs, self.compiled, self.tmp_root):
            folder.mkdir(parents=True, exist_ok=True)
        _clear_abandoned_tmp(self.tmp_root)
        self.tmp = self.tmp_root / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        self._claims = self.tmp_root / f"{self.tmp.name}.claims"  # beside tmp: uploads stay alone in there
        self._claims.mkdir()
        self._reserve = self.root / RESERVE_NAME
        self.ensure_reserve()
        # this process's claims: sha256 -> how many claims each thread holds (threads may register the
        # same bytes at once; the marker stays while any of them does)
        self._held: dict[str, Counter[int]] = {}
        self._held_lock = threading.Lock()
        # read plans of compiled files (their headers parsed), by path, valid while the file's stamp holds
        self._plans: dict[Path, tuple[tuple[int, int, int], CompiledReadPlan]] = {}
        self._plans_lock = threading.Lock()

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self._claims, ignore_errors=True)

    # ------------------------------------------------------------------ claims and space

    @contextlib.contextmanager
    def claim(self, sha256: str) -> Iterator[None]:
        """Mark the files of ``sha256`` as being written by this process until its row is committed, so
        another process's garbage collection (at its start) leaves them alone; unclaimed files that no row
        names are orphans and are removed at once."""
        marker = self._claims / sha256
        me = threading.get_ident()
        with self._held_lock:
            holders = self._held.setdefault(sha256, Counter())
            if not holders:
                marker.touch()
            holders[me] += 1
        try:
            yield
        finally:
            with self._held_lock:
                holders[me] -= 1
                if holders[me] <= 0:
                    del holders[me]
                if not holders:
                    del self._held[sha256]
                    marker.unlink(missing_ok=True)

    def claimed_by_others(self, sha256: str) -> bool:
        """Whether another thread of this process, or another process, is registering ``sha256`` now
        (its files are then not this caller's to drop: that registration's row will name them)."""
        with self._held_lock:
            holders = self._held.get(sha256, Counter())
            if any(thread != threading.get_ident() for thread in holders):
                return True
        own = self._claims / sha256
        return any(marker != own for marker in self.tmp_root.glob(f"*.claims/{sha256}"))

    def ensure_reserve(self) -> None:
        """Keep :data:`RESERVE_BYTES` set aside (best effort: on a full disk it is made later)."""
        if self._reserve.is_file() and self._reserve.stat().st_size >= RESERVE_BYTES:
            return
        try:
            with self._reserve.open("wb") as f:
                f.write(bytes(RESERVE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            self._reserve.unlink(missing_ok=True)

    def release_reserve(self) -> bool:
        """Free the reserved bytes (the disk is full); whether there were any."""
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            return False
        log.warning(
            "the disk of %s is full: released %d reserved bytes to complete a deletion",
            self.root,
            RESERVE_BYTES,
        )
        return True

    # ------------------------------------------------------------------ blobs

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def place_blob(self, received: Path, sha256: str) -> Path:
        """Move ``received`` into its content-addressed local place (a no-op if already there)."""
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            received.unlink(missing_ok=True)
        else:
            os.replace(received, target)
            _fsync_dir(target.parent)
        return target

    def drop(self, sha256: str) -> None:
        """Forget this process's cached bytes and compiled factors of ``sha256``, unless another
        registration of the same bytes is in progress (it needs them; if it fails it drops them)."""
        if self.claimed_by_others(sha256):
            return
        self.blob_path(sha256).unlink(missing_ok=True)
        for compiled in self.compiled.glob(f"*/{sha256}.safetensors"):
            compiled.unlink(missing_ok=True)

    def collect_garbage(self, registered: Callable[[], set[str]]) -> None:
        """Delete local bytes and compiled files that no registered adapter names and no running process
        is writing (a crash mid-registration leaves such orphans; they are removed at the next start).

        The order makes it safe against processes registering meanwhile: files are listed first, then
        the claims of running processes, then the rows (``registered()``: the sha256s the index names). A file written after the listing is not seen; a
        file seen was claimed before it was written, and its claim is dropped only after its row exists.
        """
        files = [*self.blobs.glob("*/*"), *self.compiled.glob("*/*.safetensors")]
        partial = list(self.compiled.glob("*/.*.tmp-*"))  # atomic writes cut short by a crash
        wanted = self._claimed() | registered()
        removed = 0
        for path in files:
            if path.name.removesuffix(".safetensors") not in wanted:
                path.unlink(missing_ok=True)
                removed += 1
        for path in partial:
            pid = path.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and _alive(int(pid))):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d orphan file(s) from %s", removed, self.root)

    def _claimed(self) -> set[str]:
        """sha256s that running processes (this one included) are registering now."""
        return {marker.name for marker in self.tmp_root.glob("*.claims/*")}

    # ------------------------------------------------------------------ compiled factors

    def compiled_path(self, sha256: str, base_digest: str) -> Path:
        return self.compiled / base_digest / f"{sha256}.safetensors"

    def save_compiled(self, sha256: str, base_digest: str, compiled: CompiledAdapter) -> None:
        metadata = {"format": COMPILED_FORMAT, "kind": compiled.kind.value, "base_digest": base_digest}
        if compiled.fingerprint is not None:
            metadata["fingerprint"] = compiled.fingerprint.to_json()
        write_safetensors_atomic(
            self.compiled_path(sha256, base_digest), compiled_tensors(compiled), metadata
        )

    def plan_compiled(self, sha256: str, base_digest: str) -> CompiledReadPlan | None:
        """Where the cached factors lie in their file, to read them straight into the pool's pages
        (:class:`~deft_server.compiled_file.CompiledReadPlan`); None when not cached for this base or
        not laid out for it (then :meth:`load_compiled` decides)."""
        path = self.compiled_path(sha256, base_digest)
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)  # files are replaced atomically, never edited
        with self._plans_lock:
            hit = self._plans.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        planned = plan_compiled_read(path)
        if planned is None:
            return None
        plan, metadata = planned
        if metadata.get("format") != COMPILED_FORMAT or metadata.get("base_digest") != base_digest:
            return None
        with self._plans_lock:
            self._plans[path] = (stamp, plan)
            while len(self._plans) > _PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def load_compiled(self, sha256: str, base_digest: str) -> CompiledAdapter | None:
        """The cached factors (views of one buffer read at once: :mod:`deft_server.compiled_file`), or
        None when they are not cached (or the file is not ours, or damaged)."""
        read = read_compiled(self.compiled_path(sha256, base_digest))
        if read is None:
            return None
        factors, metadata = read
        if metadata.get("format") != COMPILED_FORMAT or metadata.get("base_digest") != base_digest:
            return None
        try:
            kind = AdapterKind(metadata["kind"])
            fingerprint = (
                BaseFingerprint.from_json(metadata["fingerprint"]) if "fingerprint" in metadata else None
            )
        except (KeyError, ValueError):
            return None
        return CompiledAdapter(kind=kind, factors=factors, fingerprint=fingerprint)  # type: ignore[arg-type]


def _clear_abandoned_tmp(tmp_root: Path) -> None:
    """Remove uploads in progress of processes that no longer run (and files of older layouts)."""
    for entry in tmp_root.iterdir():
        pid = entry.name.split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and _alive(int(pid)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
