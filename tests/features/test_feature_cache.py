"""The feature store on its own (no TensorFlow): keys, shards, atomic commits, orphans, listing and pruning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tasks.features.cache import (
    MANIFEST_FILE,
    FeatureCache,
    KeySpec,
    ShardWriter,
    atomic_save_npy,
    cache_key,
    list_keys,
    prune_keys,
)

SPEC = KeySpec(
    base="mobilenet",
    alpha=0.25,
    weights_sha256="ab" * 32,
    image_size=(32, 32),
    preprocessing="tf/bilinear",
    pooling="avg",
    dtype="float16",
    feature_dim=4,
)


def _sha(i: int) -> str:
    return f"{i:064x}"


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_cache_key_is_stable_and_covers_every_component():
    assert cache_key(SPEC) == cache_key(replace(SPEC)) == SPEC.key
    assert SPEC.key.startswith("mobilenet-") and len(SPEC.key) == len("mobilenet-") + 16
    variants = [
        replace(SPEC, base="mobilenet_v2"),
        replace(SPEC, alpha=0.5),
        replace(SPEC, weights_sha256="cd" * 32),
        replace(SPEC, image_size=(64, 64)),
        replace(SPEC, preprocessing="tf/nearest"),
        replace(SPEC, pooling="max"),
        replace(SPEC, dtype="float32"),
    ]
    keys = {v.key for v in variants}
    assert len(keys) == len(variants) and SPEC.key not in keys


def test_write_lookup_read_roundtrip(tmp_path: Path):
    cache = FeatureCache.open(tmp_path, SPEC)
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    cache.write_shard([_sha(1), _sha(2), _sha(1)], ["clean", "clean", "p:0"], ["a", "b", "a"], x)

    fresh = FeatureCache.open(tmp_path, SPEC)
    assert set(fresh.locations()) == {(_sha(1), "clean"), (_sha(2), "clean"), (_sha(1), "p:0")}
    assert fresh.missing([(_sha(1), "clean"), (_sha(3), "clean")]) == [(_sha(3), "clean")]
    got = fresh.read([(_sha(1), "p:0"), (_sha(2), "clean")])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x[[2, 1]].astype(np.float16).astype(np.float32))
    with pytest.raises(KeyError, match="1 of 2"):
        fresh.read([(_sha(1), "clean"), (_sha(9), "clean")])
    # arrays are plain .npy files that load without pickle, stored in the key's dtype
    shard = next((cache.shards_dir).glob("*.x.npy"))
    assert np.load(shard, allow_pickle=False).dtype == np.float16
    ids = np.load(next(cache.shards_dir.glob("*.ids.npy")), allow_pickle=False)
    assert ids["sha256"][0].decode() == _sha(1) and ids["view"][2] == "p:0" and ids["label"][1] == "b"


def test_key_file_must_match(tmp_path: Path):
    FeatureCache.open(tmp_path, SPEC)
    (tmp_path / SPEC.key / "key.json").write_text(json.dumps({"base": "other"}))
    with pytest.raises(ValueError, match="does not describe key"):
        FeatureCache.open(tmp_path, SPEC)
    with pytest.raises(FileNotFoundError, match="no features cached"):
        FeatureCache.open(tmp_path / "empty", SPEC, create=False)


def test_writer_streams_whole_shards_and_keeps_memory_bounded(tmp_path: Path):
    cache = FeatureCache.open(tmp_path, SPEC)
    writer = ShardWriter(cache, shard_size=4)
    for start in range(0, 10, 3):  # batches of 3 rows: 3, 3, 3, 1
        n = min(3, 10 - start)
        writer.add([(_sha(i), "clean", "a") for i in range(start, start + n)], np.ones((n, 4)) * start)
        assert writer._buffered < 4  # never more than one shard's rows in memory
    assert [s.rows for s in cache.read_manifest()] == [4, 4]
    writer.close()
    assert [s.rows for s in cache.read_manifest()] == [4, 4, 2] and writer.shards == 3
    assert len(FeatureCache.open(tmp_path, SPEC).locations()) == 10
    with pytest.raises(ValueError, match="shard_size"):
        ShardWriter(cache, 0)


def test_uncommitted_and_temp_files_are_never_read_and_are_cleaned(tmp_path: Path):
    cache = FeatureCache.open(tmp_path, SPEC)
    cache.write_shard([_sha(1)], ["clean"], ["a"], np.ones((1, 4)))
    dead = _dead_pid()
    # what a writer killed mid-shard leaves: a half-written temp file and a shard whose commit never happened
    half = cache.shards_dir / f".tmp-{dead}-deadbeef-ffff-{dead}-00000000.x.npy"
    half.write_bytes(b"\x93NUMPY garbage")
    orphan = f"ffff-{dead}-00000000"
    atomic_save_npy(cache.shards_dir / f"{orphan}.x.npy", np.zeros((1, 4), np.float16))
    (cache.shards_dir / f"{orphan}.ids.npy").write_bytes(b"truncated")
    live = cache.shards_dir / f".tmp-{os.getppid()}-cafe-other.x.npy"  # a live writer's temp file is kept
    live.write_bytes(b"in progress")

    reopened = FeatureCache.open(tmp_path, SPEC)  # must not trip over the broken files
    assert set(reopened.locations()) == {(_sha(1), "clean")}
    assert not half.exists() and not (cache.shards_dir / f"{orphan}.x.npy").exists()
    assert live.exists()


def test_manifest_commits_from_two_writers_are_both_kept(tmp_path: Path):
    a = FeatureCache.open(tmp_path, SPEC)
    b = FeatureCache.open(tmp_path, SPEC)
    a.locations()
    b.locations()
    a.write_shard([_sha(1)], ["clean"], ["a"], np.ones((1, 4)))
    b.write_shard([_sha(2)], ["clean"], ["a"], np.ones((1, 4)))
    manifest = json.loads((tmp_path / SPEC.key / MANIFEST_FILE).read_text())
    assert len(manifest["shards"]) == 2
    assert set(FeatureCache.open(tmp_path, SPEC).locations()) == {(_sha(1), "clean"), (_sha(2), "clean")}


def test_list_and_prune(tmp_path: Path):
    keep, other = SPEC, replace(SPEC, pooling="max")
    FeatureCache.open(tmp_path, keep).write_shard([_sha(1)], ["clean"], ["a"], np.ones((1, 4)))
    FeatureCache.open(tmp_path, other).write_shard(
        [_sha(1), _sha(2)], ["clean"] * 2, ["a"] * 2, np.ones((2, 4))
    )
    infos = {i.key: i for i in list_keys(tmp_path)}
    assert set(infos) == {keep.key, other.key}
    assert infos[other.key].rows == 2 and infos[other.key].shards == 1 and infos[other.key].bytes > 0
    assert infos[keep.key].spec["pooling"] == "avg"

    planned = prune_keys(tmp_path, {keep.key}, dry_run=True)
    assert [i.key for i in planned.removed] == [other.key] and (tmp_path / other.key).is_dir()
    assert planned.in_use == []
    done = prune_keys(tmp_path, {keep.key}, dry_run=False)
    assert [i.key for i in done.removed] == [other.key]
    assert [i.key for i in list_keys(tmp_path)] == [keep.key]
    assert list_keys(tmp_path / "nowhere") == []


def test_prune_skips_a_key_a_running_writer_holds_and_reports_it(tmp_path: Path):
    busy, idle, keep = replace(SPEC, pooling="max"), replace(SPEC, dtype="float32"), SPEC
    for spec in (busy, idle, keep):
        FeatureCache.open(tmp_path, spec).write_shard([_sha(1)], ["clean"], ["a"], np.ones((1, 4)))
    writer = FeatureCache.open(tmp_path, busy)
    with writer.in_use():  # what `retrainflow features` holds for its whole run
        planned = prune_keys(tmp_path, {keep.key}, dry_run=True)
        assert [i.key for i in planned.removed] == [idle.key] and [i.key for i in planned.in_use] == [
            busy.key
        ]
        result = prune_keys(tmp_path, {keep.key}, dry_run=False)
        assert [i.key for i in result.removed] == [idle.key] and [i.key for i in result.in_use] == [busy.key]
        assert not (tmp_path / idle.key).exists() and (tmp_path / busy.key).is_dir()
        writer.write_shard([_sha(2)], ["clean"], ["a"], np.ones((1, 4)))  # the writer goes on undisturbed
    assert len(FeatureCache.open(tmp_path, busy).locations()) == 2
    # a commit under way (the manifest lock) also keeps the key
    from tasks.features.cache import _locked

    with _locked(tmp_path / busy.key):
        assert [i.key for i in prune_keys(tmp_path, {keep.key}, dry_run=False).in_use] == [busy.key]
    # once the writer is done, the key goes
    assert [i.key for i in prune_keys(tmp_path, {keep.key}, dry_run=False).removed] == [busy.key]
    assert [i.key for i in list_keys(tmp_path)] == [keep.key]


def test_a_writer_whose_key_was_pruned_before_it_started_writes_it_afresh(tmp_path: Path):
    stale = replace(SPEC, pooling="max")
    writer = FeatureCache.open(tmp_path, stale)  # opened, not yet in use: prunable
    assert [i.key for i in prune_keys(tmp_path, {SPEC.key}, dry_run=False).removed] == [stale.key]
    with writer.in_use() as cache:  # recreates the folder and key.json under the lock
        cache.write_shard([_sha(1)], ["clean"], ["a"], np.ones((1, 4)))
    reopened = FeatureCache.open(tmp_path, stale, create=False)
    assert set(reopened.locations()) == {(_sha(1), "clean")}
    assert [i.key for i in list_keys(tmp_path)] == [stale.key]  # lock files are not keys


def test_a_damaged_committed_shard_is_skipped_so_its_rows_count_as_missing(tmp_path: Path):
    cache = FeatureCache.open(tmp_path, SPEC)
    good = cache.write_shard([_sha(1)], ["clean"], ["a"], np.ones((1, 4)))
    bad = cache.write_shard([_sha(2)], ["clean"], ["a"], np.ones((1, 4)))
    (cache.shards_dir / f"{bad.name}.x.npy").write_bytes(b"\x93NUMPY cut short")
    reopened = FeatureCache.open(tmp_path, SPEC)
    assert reopened.missing([(_sha(1), "clean"), (_sha(2), "clean")]) == [(_sha(2), "clean")]
    assert reopened.broken == [bad.name] and good.name not in reopened.broken
    reopened.write_shard([_sha(2)], ["clean"], ["a"], np.full((1, 4), 2.0))
    np.testing.assert_array_equal(FeatureCache.open(tmp_path, SPEC).read([(_sha(2), "clean")]), [[2.0] * 4])
