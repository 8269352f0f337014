"""The content-addressed feature store: one folder per cache key, sharded ``.npy`` arrays plus a manifest.

Layout under the cache root (``layout.features_cache`` or ``features.cache_dir``)::

    <key>/key.json                       what the key stands for (base, alpha, weights sha256, size, ...)
    <key>/manifest.json                  committed shards, in commit order (the ONLY list readers trust)
    <key>/shards/<shard>.x.npy           features [rows, dim] in features.dtype
    <key>/shards/<shard>.ids.npy         structured [rows]: sha256 (S64), view (U), label (U)
    <key>/.lock                          serialises manifest updates between concurrent writers
    <key>/.in_use                        held shared by every features run writing the key, for its whole run
                                         (:meth:`FeatureCache.in_use`); ``prune_keys`` needs it exclusively

Every file is written atomically by :mod:`tasks.io.atomic` (temp file in the same folder, fsync, rename, fsync of the
folder). A shard is
committed by adding it to the manifest after both of its files are in place, so a run killed at any moment leaves
at worst orphan files that no reader sees (they are removed later). Arrays are read with ``allow_pickle=False``.
No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import InputError
from tasks.io.atomic import TMP_PREFIX, atomic_write, atomic_write_json, temp_writer_pid
from tasks.io.locking import pid_alive

CACHE_FORMAT = 1
KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
LOCK_FILE = ".lock"
IN_USE_FILE = ".in_use"

Pair = tuple[str, str]  # (image sha256, view id)


# --------------------------------------------------------------------------------------------------- key
@dataclass(frozen=True)
class KeySpec:
    """Everything that changes a feature vector for a given (image, view): the cache key's components."""

    base: str
    alpha: float | None
    weights_sha256: str
    image_size: tuple[int, int]
    preprocessing: str  # the base's preprocess mode and the resize interpolation
    pooling: str
    dtype: str
    feature_dim: int
    format: int = CACHE_FORMAT
    # cut-point activations (tail fine-tuning): the layer whose output is stored, flattened to feature_dim
    # values, and its shape. None for pooled features (and then left out of the key: their keys are unchanged)
    cut: str | None = None
    shape: tuple[int, ...] | None = None
    # the engine of the forward pass when it is not Keras (``tasks.models.engines``, e.g. "litert-2.3.0"): features
    # from different engines never mix. None for Keras (left out of the key: Keras keys are unchanged)
    engine: str | None = None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        if self.cut is None:
            del out["cut"], out["shape"]
        else:
            out["shape"] = list(self.shape or ())
        if self.engine is None:
            del out["engine"]
        return out

    @property
    def key(self) -> str:
        return cache_key(self)


def cache_key(spec: KeySpec) -> str:
    """``<base>-<16 hex>``: a hash of every component of ``spec`` (stable across runs and machines)."""
    blob = json.dumps(spec.as_json(), sort_keys=True, separators=(",", ":")).encode()
    return f"{spec.base}-{hashlib.sha256(blob).hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------ atomic files
def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` (no pickle) through :func:`tasks.io.atomic.atomic_write` (shard names are unique: no sweep)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, array, allow_pickle=False)

    atomic_write(path, write, sweep=False)


def _flock_stable(path: Path, operation: int) -> int:
    """An fd of ``path`` holding ``flock(operation)``, created (with its folder) when missing. Retries when the file
    was deleted or replaced while this process waited (a prune removed the key folder): the lock held is then on
    the file a later locker also finds at ``path``. Raises BlockingIOError for a busy ``LOCK_NB`` request."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            now = os.stat(path)
            held = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file went away under us: lock the one there now


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = _flock_stable(folder / LOCK_FILE, fcntl.LOCK_EX)
    try:
        yield
    finally:
        _unlock(fd)


def _writer_pid(name: str) -> int | None:
    """PID encoded in a shard or temp file name (``<time>-<pid>-<rand>...`` / ``.tmp-<pid>-...``)."""
    if name.startswith(TMP_PREFIX):
        return temp_writer_pid(name)
    parts = name.split("-")
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ store
@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int


@dataclass
class FeatureCache:
    """One cache key's folder: look up stored (sha256, view) pairs, append shards, read feature rows."""

    folder: Path
    spec: KeySpec
    _locations: dict[Pair, tuple[int, int]] | None = field(default=None, repr=False)
    _shards: list[ShardInfo] = field(default_factory=list, repr=False)
    broken: list[str] = field(default_factory=list)  # committed shards that no longer read back

    @classmethod
    def open(cls, root: Path, spec: KeySpec, *, create: bool = True) -> FeatureCache:
        """The folder of ``spec``'s key under ``root``; created (with ``key.json``) when missing."""
        folder = Path(root) / spec.key
        key_file = folder / KEY_FILE
        if not key_file.is_file():
            if not create:
                raise FileNotFoundError(f"no features cached for key {spec.key} under {root}")
            atomic_write_json(key_file, spec.as_json())
        else:
            stored = json.loads(key_file.read_text())
            if stored != spec.as_json():
                raise InputError(f"{key_file} does not describe key {spec.key}: {stored!r}")
        cache = cls(folder, spec)
        if create:
            cache.remove_orphans()
        return cache

    @contextlib.contextmanager
    def in_use(self) -> Iterator[FeatureCache]:
        """Hold this key's ``.in_use`` lock (shared: concurrent writers of one key are fine) for the ``with`` body,
        so :func:`prune_keys` skips the key instead of deleting it under a running writer. If a prune removed the
        folder between :meth:`open` and here, ``key.json`` is written again."""
        fd = _flock_stable(self.folder / IN_USE_FILE, fcntl.LOCK_SH)
        try:
            if not (self.folder / KEY_FILE).is_file():
                atomic_write_json(self.folder / KEY_FILE, self.spec.as_json())
                self._locations = None
            yield self
        finally:
            _unlock(fd)

    # ---- manifest
    @property
    def shards_dir(self) -> Path:
        return self.folder / SHARDS_DIR

    def read_manifest(self) -> list[ShardInfo]:
        path = self.folder / MANIFEST_FILE
        if not path.is_file():
            return []
        data = json.loads(path.read_text())
        return [ShardInfo(s["name"], int(s["rows"])) for s in data.get("shards", [])]

    def _commit(self, shard: ShardInfo) -> None:
        with _locked(self.folder):
            shards = self.read_manifest()
            shards.append(shard)
            atomic_write_json(
                self.folder / MANIFEST_FILE,
                {"format": CACHE_FORMAT, "key": self.spec.key, "shards": [asdict(s) for s in shards]},
            )
        if self._locations is not None:
            ids = self._read_ids(shard.name)
            index = len(self._shards)
            self._shards.append(shard)
            for row, (sha, view) in enumerate(zip(ids["sha256"], ids["view"], strict=True)):
                self._locations.setdefault((sha.decode(), str(view)), (index, row))

    def remove_orphans(self) -> list[Path]:
        """Delete temp files and uncommitted shard files left by writers that are no longer running."""
        removed: list[Path] = []
        with _locked(self.folder):
            committed = {s.name for s in self.read_manifest()}
            for folder in (self.folder, self.shards_dir):
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    name = path.name
                    if name.startswith(TMP_PREFIX):
                        shard = None
                    elif folder == self.shards_dir:
                        shard = name.split(".", 1)[0]
                        if shard in committed:
                            continue
                    else:
                        continue
                    pid = _writer_pid(name if shard is None else shard)
                    if pid is None or pid == os.getpid() or not pid_alive(pid):
                        path.unlink(missing_ok=True)
                        removed.append(path)
        return removed

    # ---- lookup
    def _read_ids(self, shard: str) -> np.ndarray:
        return np.load(self.shards_dir / f"{shard}.ids.npy", allow_pickle=False)

    def locations(self) -> dict[Pair, tuple[int, int]]:
        """(sha256, view) -> (shard index, row) for every committed row (first occurrence wins).

        A committed shard that no longer reads back whole (deleted or damaged outside this code) is skipped and
        listed in ``broken``: its rows count as missing, so the stage computes them again.
        """
        if self._locations is None:
            self._shards = self.read_manifest()
            self.broken = []
            locations: dict[Pair, tuple[int, int]] = {}
            for index, shard in enumerate(self._shards):
                ids = self._checked_ids(shard)
                if ids is None:
                    self.broken.append(shard.name)
                    continue
                for row, (sha, view) in enumerate(zip(ids["sha256"], ids["view"], strict=True)):
                    locations.setdefault((sha.decode(), str(view)), (index, row))
            self._locations = locations
        return self._locations

    def _checked_ids(self, shard: ShardInfo) -> np.ndarray | None:
        """The shard's ids when both of its files load with the manifest's row count and feature size."""
        try:
            ids = self._read_ids(shard.name)
            x = np.load(self.shards_dir / f"{shard.name}.x.npy", mmap_mode="r", allow_pickle=False)
            ok = len(ids) == shard.rows and x.shape == (shard.rows, self.spec.feature_dim)
            del x
        except (OSError, ValueError, EOFError):
            return None
        return ids if ok else None

    def refresh(self) -> None:
        """Forget the rows looked up so far: the next lookup reads the manifest again (other writers' shards)."""
        self._locations = None

    def missing(self, pairs: Iterable[Pair]) -> list[Pair]:
        have = self.locations()
        return [p for p in pairs if p not in have]

    # ---- read
    def read(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Features of ``pairs`` as float32 ``[len(pairs), dim]``; KeyError lists what is not cached."""
        have = self.locations()
        absent = [p for p in pairs if p not in have]
        if absent:
            raise KeyError(
                f"{len(absent)} of {len(pairs)} (sha256, view) pairs are not in feature cache {self.spec.key} "
                f"(first: {absent[:3]}); run `retrainflow features` first"
            )
        out = np.empty((len(pairs), self.spec.feature_dim), dtype=np.float32)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, pair in enumerate(pairs):
            shard, row = have[pair]
            by_shard.setdefault(shard, []).append((i, row))
        for shard, items in by_shard.items():
            info = self._shards[shard]
            x = np.load(self.shards_dir / f"{info.name}.x.npy", mmap_mode="r", allow_pickle=False)
            if x.shape != (info.rows, self.spec.feature_dim):
                raise ValueError(
                    f"shard {info.name}: shape {x.shape}, expected {(info.rows, self.spec.feature_dim)}"
                )
            dest = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
            rows = np.fromiter((r for _, r in items), dtype=np.int64, count=len(items))
            out[dest] = x[rows]
            del x
        return out

    def row_locations(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row) arrays of ``pairs`` (all must be cached: :meth:`missing` first), for streaming
        readers that gather rows batch by batch from :meth:`shard_array`."""
        have = self.locations()
        where = np.asarray([have[p] for p in pairs], dtype=np.int64).reshape(-1, 2)
        return where[:, 0], where[:, 1]

    def shard_array(self, index: int) -> np.ndarray:
        """Committed shard ``index`` (of :meth:`locations`' shards) memory-mapped read-only: ``[rows, dim]``."""
        info = self._shards[index]
        x = np.load(self.shards_dir / f"{info.name}.x.npy", mmap_mode="r", allow_pickle=False)
        if x.shape != (info.rows, self.spec.feature_dim):
            raise ValueError(
                f"shard {info.name}: shape {x.shape}, expected {(info.rows, self.spec.feature_dim)}"
            )
        return x

    # ---- write
    def write_shard(
        self, shas: Sequence[str], views: Sequence[str], labels: Sequence[str], x: np.ndarray
    ) -> ShardInfo:
        """Store one shard (both files atomically) and commit it to the manifest."""
        n = len(shas)
        if (
            not (len(views) == len(labels) == n == len(x))
            or x.ndim != 2
            or x.shape[1] != self.spec.feature_dim
        ):
            raise ValueError(
                f"write_shard: {n} ids, {len(views)} views, {len(labels)} labels, features {x.shape}"
            )
        ids = np.empty(
            n,
            dtype=[
                ("sha256", "S64"),
                ("view", f"U{max((len(v) for v in views), default=1)}"),
                ("label", f"U{max((len(s) for s in labels), default=1)}"),
            ],
        )
        ids["sha256"] = [s.encode() for s in shas]
        ids["view"] = list(views)
        ids["label"] = list(labels)
        name = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        atomic_save_npy(self.shards_dir / f"{name}.x.npy", np.ascontiguousarray(x, dtype=self.spec.dtype))
        atomic_save_npy(self.shards_dir / f"{name}.ids.npy", ids)
        info = ShardInfo(name, n)
        self._commit(info)
        return info


class ShardWriter:
    """Buffers computed rows and writes a shard every ``shard_size`` rows: memory stays bounded."""

    def __init__(self, cache: FeatureCache, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"features.shard_size: expected >= 1, got {shard_size!r}")
        self.cache = cache
        self.shard_size = shard_size
        self.written = 0
        self.shards = 0
        self.names: list[str] = []  # the shards written, in order
        self._ids: list[tuple[str, str, str]] = []
        self._x: list[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: Sequence[tuple[str, str, str]], x: np.ndarray) -> None:
        """Append rows ((sha256, view, label), features); flushes whole shards as they fill."""
        if len(ids) != len(x):
            raise ValueError(f"ShardWriter.add: {len(ids)} ids for {len(x)} feature rows")
        self._ids.extend(ids)
        self._x.append(np.asarray(x, dtype=self.cache.spec.dtype))
        self._buffered += len(x)
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> None:
        if self._buffered:
            self._flush(self._buffered)

    def _flush(self, n: int) -> None:
        x = np.concatenate(self._x) if len(self._x) > 1 else self._x[0]
        ids, self._ids = self._ids[:n], self._ids[n:]
        rest = x[n:]
        self._x = [rest] if len(rest) else []
        self._buffered = len(rest)
        info = self.cache.write_shard([i[0] for i in ids], [i[1] for i in ids], [i[2] for i in ids], x[:n])
        self.names.append(info.name)
        self.written += n
        self.shards += 1


# --------------------------------------------------------------------------------------------- admin
@dataclass(frozen=True)
class KeyInfo:
    key: str
    spec: dict[str, Any]
    shards: int
    rows: int
    bytes: int


def list_keys(root: Path) -> list[KeyInfo]:
    """Every cache key under ``root`` with its shard and row counts and its size on disk."""
    root = Path(root)
    out: list[KeyInfo] = []
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        key_file = folder / KEY_FILE
        spec = json.loads(key_file.read_text()) if key_file.is_file() else {}
        manifest = folder / MANIFEST_FILE
        shards = json.loads(manifest.read_text()).get("shards", []) if manifest.is_file() else []
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        out.append(KeyInfo(folder.name, spec, len(shards), sum(int(s["rows"]) for s in shards), size))
    return out


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_keys` removed (or would remove) and the keys it left because a writer holds them."""

    removed: list[KeyInfo]
    in_use: list[KeyInfo]


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[bool]:
    """Try to hold both of a key's locks exclusively without waiting: ``.in_use`` (no features run is writing the
    key) and ``.lock`` (no manifest commit is under way). Yields whether both were free."""
    held: list[int] = []
    try:
        for name in (IN_USE_FILE, LOCK_FILE):
            try:
                held.append(_flock_stable(folder / name, fcntl.LOCK_EX | fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        for fd in reversed(held):
            _unlock(fd)


def prune_keys(root: Path, keep: set[str], *, dry_run: bool) -> PruneResult:
    """Remove (or with ``dry_run`` only list) every key folder under ``root`` not in ``keep``.

    Each folder is removed while this process holds its locks exclusively; a key a running writer holds
    (:meth:`FeatureCache.in_use`, or a commit in progress) is left alone and listed in ``in_use``. A writer that
    starts on a key while it is being removed waits, then writes it afresh.
    """
    result = PruneResult([], [])
    for info in list_keys(root):
        if info.key in keep:
            continue
        folder = Path(root) / info.key
        with _exclusive(folder) as free:
            if not free:
                result.in_use.append(info)
                continue
            if not dry_run:
                shutil.rmtree(folder)
            result.removed.append(info)
    return result
