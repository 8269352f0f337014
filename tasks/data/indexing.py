"""The ``index`` stage: a pile of image files -> a trustworthy table, a classes file and a report.

``flow_from_directory`` / ``flow_from_dataframe`` without their silent failures: every file is really decoded with
the decoder training uses (:func:`tasks.data.images.decode_rgb`), in parallel threads; bad files become rejects with a
reason; exact duplicates collapse, cross-label duplicates are excluded as conflicts; an image's split depends only
on its content hash and the split seed, so adding images never moves an existing one.

The library of the index stage: :func:`build_index` returns the table, the classes and the report in memory and
writes nothing; the stage shell (:mod:`tasks.stages.run_index`) writes them. The table's columns, its format and its
readers are :mod:`tasks.data.index_table`'s (``index.csv`` columns :data:`~tasks.data.index_table.COLUMNS`, paths POSIX and
relative to ``data.root``, sorted by path).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from tasks.config import DataConfig, SplitFractions
from tasks.data.images import ImageInfo, ImageRejected, check_image_file
from tasks.data.index_table import COLUMNS, SPLITS, ClassInfo
from tasks.errors import DatasetError  # noqa: F401  (raised here; defined with the other domain errors)
from tasks.progress import Reporter, Step
from tasks.progress import report as send_step

# OS junk: skipped and reported, never validated (hidden names starting with "." are skipped too).
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r", "__macosx", "$recycle.bin"})
# Validation progress: a Step when the count advanced by this share of the total or this long passed,
# whichever comes first (and a final one at the end).
PROGRESS_FRACTION = 0.01
PROGRESS_SECONDS = 0.2
EXAMPLES_SHOWN = 3  # example paths per reason in a dataset-level error


@dataclass(frozen=True)
class Candidate:
    """One file to validate: ``rel`` is its POSIX path relative to the data root, ``label`` its class name."""

    rel: str
    full: Path
    label: str


@dataclass
class IndexResult:
    """The in-memory result of :func:`build_index`: the table, the classes and the report (JSON-able)."""

    table: pd.DataFrame
    classes: ClassInfo
    report: dict[str, Any]


@dataclass
class _Findings:
    """What scanning and validating found besides good images."""

    rejects: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicate_rows: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, path: str, kind: str, reason: str) -> None:
        self.rejects.append({"path": path, "kind": kind, "reason": reason})

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})


# ------------------------------------------------------------------------------------------------- splits
def assign_split(sha256: str, fractions: SplitFractions, split_seed: int) -> str:
    """``train``/``val``/``test`` as a function of the content hash and the split seed only (stable)."""
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise ValueError(f"assign_split: expected a 64-hex-digit sha256, got {sha256!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ValueError(f"assign_split: expected a non-negative integer split_seed, got {split_seed!r}")
    digest = hashlib.sha256(f"{split_seed}:{sha256.lower()}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val:
        return "val"
    return "test"


# ------------------------------------------------------------------------------------------------ sources
def _is_junk(name: str) -> str | None:
    """Why a directory entry is skipped (hidden or OS junk), or None."""
    if name.startswith("."):
        return "hidden file or folder"
    if name.lower() in JUNK_NAMES:
        return "OS junk file"
    return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _rel_posix(path: Path, root: Path) -> str:
    return PurePosixPath(*path.relative_to(root).parts).as_posix()


def _resolve(path: Path) -> tuple[Path | None, str]:
    """``path`` with every symlink resolved (a dangling one too), or None and why (a loop, a name too long...)."""
    try:
        return path.resolve(), ""
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        return None, "symlink loop"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "symlink loop"
        return None, f"cannot resolve the path: {err.strerror or err}"


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan_directory(root: Path, cfg: DataConfig, findings: _Findings) -> tuple[list[Candidate], list[str]]:
    """Files under ``root/<class>/...`` (nested folders count for their class folder) and the class folders.

    Hidden files and OS junk are skipped; symlinks are followed only when ``cfg.follow_symlinks`` and only while
    they stay inside ``root``; a folder reached twice (symlink loop) is visited once.
    """
    _check_root(root, "a folder with one subfolder per class")
    real_root = root.resolve()
    candidates: list[Candidate] = []
    class_folders: list[str] = []
    visited: set[tuple[int, int]] = set()

    def follow(entry_path: Path, rel: str) -> Path | None:
        """The real target of a symlink if it may be followed, else None (and the reason is recorded)."""
        if not cfg.follow_symlinks:
            findings.reject(rel, "symlink", "symlink not followed (data.follow_symlinks is false)")
            return None
        target, why = _resolve(entry_path)
        if target is None:
            findings.reject(rel, "symlink", why)
            return None
        if not target.exists():
            findings.reject(rel, "symlink", "broken symlink (its target does not exist)")
            return None
        if not _inside(target, real_root):
            findings.reject(rel, "outside_root", "symlink leading outside the data root")
            return None
        return target

    def walk(folder: Path, label: str) -> bool:
        """Collect the files under ``folder`` for ``label``; False when the folder was not walked."""
        try:
            st = folder.stat()
        except OSError as err:
            findings.reject(_rel_posix(folder, root), "unreadable", f"cannot read folder: {err.strerror}")
            return False
        key = (st.st_dev, st.st_ino)
        if key in visited:
            findings.skip(
                _rel_posix(folder, root), "folder already visited (symlink loop or a second link to it)"
            )
            return False
        visited.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            findings.reject(_rel_posix(folder, root), "unreadable", f"cannot list folder: {err.strerror}")
            return False
        for entry in entries:
            path = Path(entry.path)
            rel = _rel_posix(path, root)
            if not _utf8_ok(entry.name):
                findings.reject(
                    rel.encode("utf-8", "replace").decode(), "bad_name", "file name is not valid UTF-8"
                )
                continue
            junk = _is_junk(entry.name)
            if junk:
                findings.skip(rel, junk)
                continue
            real = path
            if entry.is_symlink():
                target = follow(path, rel)
                if target is None:
                    continue
                real = target
            try:
                mode = real.stat().st_mode
            except OSError as err:
                findings.reject(rel, "unreadable", f"cannot stat: {err.strerror}")
                continue
            if stat.S_ISDIR(mode):  # walked under the name it was found by (stat() sees through symlinks)
                if walk(path, label or entry.name) and not label:
                    class_folders.append(entry.name)
            elif stat.S_ISREG(mode):
                if label:
                    candidates.append(Candidate(rel, path, label))
                else:
                    findings.skip(rel, "file at the top level, not inside a class folder")
            else:
                findings.skip(rel, "not a regular file")
        return True

    walk(root, "")
    if not class_folders:
        raise DatasetError(
            f"data.root: expected a folder with one subfolder per class, got {str(root)!r} "
            f"({_without_class_folders(findings)})"
        )
    return candidates, class_folders


def _check_root(root: Path, expected: str) -> None:
    """``data.root`` must be an existing folder: say which of the two it is not."""
    if not root.exists():
        where = f" ({os.path.abspath(root)})" if not root.is_absolute() else ""
        raise DatasetError(f"data.root: folder does not exist, got {str(root)!r}{where}")
    if not root.is_dir():
        raise DatasetError(f"data.root: expected {expected}, got {str(root)!r} (it is a file, not a folder)")


def _without_class_folders(findings: _Findings) -> str:
    """What a data root without class folders holds instead (its top-level entries), for the error message."""
    top = [e for e in (*findings.skipped, *findings.rejects) if "/" not in e["path"]]
    if not top:
        return "it is empty"
    hint = "; put each class's images in a subfolder named after the class"
    return "it has no class subfolders; at its top level: " + _grouped(top, "reason") + hint


def _cell(value: Any) -> str:
    if value is None:
        return ""
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value).strip()


def _table_path(
    lexical: Path, rel: str, root_abs: Path, real_root: Path, cfg: DataConfig, findings: _Findings
) -> Path | None:
    """The real file behind one CSV row's path, or None when the row is rejected (the reason is recorded)."""
    if not lexical.exists() and not lexical.is_symlink():
        findings.reject(rel, "not_found", "file not found")
        return None
    real, why = _resolve(lexical)
    if real is None:
        findings.reject(rel, "symlink", why)
        return None
    if not _inside(real, real_root):
        findings.reject(rel, "outside_root", "symlink leading outside the data root")
        return None
    if real.relative_to(real_root) != lexical.relative_to(root_abs) and not cfg.follow_symlinks:
        findings.reject(rel, "symlink", "path goes through a symlink (data.follow_symlinks is false)")
        return None
    if not real.exists():
        findings.reject(rel, "not_found", "broken symlink (its target does not exist)")
        return None
    if not real.is_file():
        findings.reject(rel, "not_file", "not a regular file")
        return None
    return real


def scan_table(frame: pd.DataFrame, root: Path, cfg: DataConfig, findings: _Findings) -> list[Candidate]:
    """Rows of a CSV/DataFrame -> candidates. Paths resolve against ``root`` and may not leave it."""
    missing = [c for c in (cfg.path_column, cfg.label_column) if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"CSV/DataFrame is missing column(s) {missing} (data.path_column={cfg.path_column!r}, "
            f"data.label_column={cfg.label_column!r}); columns present: {[str(c) for c in frame.columns]}"
        )
    _check_root(root, "the folder the CSV paths are relative to")
    root_abs = Path(os.path.abspath(root))
    real_root = root.resolve()
    labels_by_path: dict[str, list[tuple[int, str]]] = defaultdict(list)
    fulls: dict[str, Path] = {}
    for row_number, (raw_path, raw_label) in enumerate(
        zip(frame[cfg.path_column], frame[cfg.label_column], strict=True), start=2
    ):
        path_text, label = _cell(raw_path), _cell(raw_label)
        where = path_text or f"<row {row_number}>"
        if not path_text:
            findings.reject(where, "blank_path", f"row {row_number}: blank path")
            continue
        if not label:
            findings.reject(where, "blank_label", f"row {row_number}: blank label")
            continue
        given = Path(path_text)
        lexical = Path(os.path.normpath(given if given.is_absolute() else root_abs / given))
        if not _inside(lexical, root_abs):
            findings.reject(path_text, "outside_root", f"path leaves the data root ({str(root)!r})")
            continue
        rel = _rel_posix(lexical, root_abs)
        try:
            real = _table_path(lexical, rel, root_abs, real_root, cfg, findings)
        except (OSError, ValueError) as err:  # e.g. a name too long for the filesystem: this row only
            findings.reject(rel, "bad_path", f"unusable path: {getattr(err, 'strerror', None) or err}")
            continue
        if real is None:
            continue
        labels_by_path[rel].append((row_number, label))
        fulls[rel] = real
    candidates = []
    for rel, rows in labels_by_path.items():
        labels = sorted({label for _, label in rows})
        if len(labels) > 1:
            findings.conflicts.append(
                {"kind": "path", "path": rel, "labels": labels, "rows": [n for n, _ in rows]}
            )
            continue
        if len(rows) > 1:
            findings.duplicate_rows.append({"path": rel, "label": labels[0], "rows": [n for n, _ in rows]})
        candidates.append(Candidate(rel, fulls[rel], labels[0]))
    return candidates


def read_csv_source(csv_path: Path) -> pd.DataFrame:
    """The CSV as strings (blank cells stay blank), or :class:`DatasetError`."""
    if not csv_path.is_file():
        raise DatasetError(f"data.csv: file not found, got {str(csv_path)!r}")
    try:
        return pd.read_csv(
            csv_path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig"
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"data.csv: cannot parse {str(csv_path)!r}: {err}") from None


# --------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class _Checked:
    candidate: Candidate
    sha256: str = ""
    size: int = 0
    info: ImageInfo | None = None
    kind: str = ""
    reason: str = ""


def check_file(candidate: Candidate, max_pixels: int) -> _Checked:
    """:func:`tasks.data.images.check_image_file` on one candidate; never raises for a bad file (the reason is
    returned). A file larger than any image within ``max_pixels`` could be is rejected from its size, unread."""
    try:
        checked = check_image_file(candidate.full, max_pixels=max_pixels)
    except OSError as err:
        return _Checked(candidate, kind="unreadable", reason=f"cannot read: {err.strerror or err}")
    except ImageRejected as err:
        return _Checked(candidate, kind=err.kind, reason=err.reason)
    except Exception as err:  # an unforeseen failure on one file must not stop the whole run
        return _Checked(candidate, kind="error", reason=f"{type(err).__name__}: {err}")
    return _Checked(candidate, checked.sha256, checked.size, checked.info)


def validate_all(
    candidates: list[Candidate],
    max_pixels: int,
    workers: int,
    on_done: Callable[[int], None] | None = None,
) -> list[_Checked]:
    """:func:`check_file` on every candidate in ``workers`` threads (TF and hashlib release the GIL)."""
    if workers < 1:
        raise ValueError(f"validate_all: expected workers >= 1, got {workers!r}")
    results: list[_Checked] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="index") as pool:
        futures = [pool.submit(check_file, c, max_pixels) for c in candidates]
        for future in as_completed(futures):
            results.append(future.result())
            if on_done is not None:
                on_done(1)
    return sorted(results, key=lambda r: r.candidate.rel)


def _workers(cfg: DataConfig) -> int:
    return cfg.workers if cfg.workers > 0 else max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------- the index
def _dedupe(good: list[_Checked], findings: _Findings) -> tuple[list[_Checked], list[dict[str, Any]]]:
    """Collapse same-bytes-same-label copies (keep the first path), exclude same-bytes-other-label copies."""
    by_hash: dict[str, list[_Checked]] = defaultdict(list)
    for item in good:
        by_hash[item.sha256].append(item)
    kept: list[_Checked] = []
    duplicates: list[dict[str, Any]] = []
    for digest, items in by_hash.items():
        items = sorted(items, key=lambda r: r.candidate.rel)
        labels = sorted({r.candidate.label for r in items})
        if len(labels) > 1:
            findings.conflicts.append(
                {
                    "kind": "content",
                    "sha256": digest,
                    "paths": {r.candidate.rel: r.candidate.label for r in items},
                    "labels": labels,
                }
            )
            continue
        kept.append(items[0])
        if len(items) > 1:
            duplicates.append(
                {
                    "sha256": digest,
                    "label": labels[0],
                    "kept": items[0].candidate.rel,
                    "dropped": [r.candidate.rel for r in items[1:]],
                }
            )
    return sorted(kept, key=lambda r: r.candidate.rel), duplicates


def _class_names(found_labels: Iterable[str], cfg: DataConfig) -> tuple[str, ...]:
    return tuple(cfg.classes) if cfg.classes is not None else tuple(sorted(set(found_labels)))


def _class_mode(cfg: DataConfig, num_classes: int) -> str:
    if cfg.class_mode == "auto":
        return "binary" if num_classes == 2 else "categorical"
    if cfg.class_mode == "binary" and num_classes != 2:
        raise DatasetError(f"data.class_mode: 'binary' needs exactly 2 classes, got {num_classes}")
    return cfg.class_mode


def _split_warnings(counts: dict[str, dict[str, int]], cfg: DataConfig) -> list[str]:
    warnings = []
    fractions = {"train": cfg.split.train, "val": cfg.split.val, "test": cfg.split.test}
    for name, per_split in counts.items():
        for split in SPLITS:
            if fractions[split] > 0 and per_split[split] < cfg.min_per_split:
                warnings.append(
                    f"class {name!r} has {per_split[split]} image(s) in {split} "
                    f"(fewer than data.min_per_split={cfg.min_per_split})"
                )
    return warnings


def _grouped(entries: list[dict[str, str]], key: str) -> str:
    """``not_image: 2, e.g. 'a/x.txt', 'a/y.txt'; empty: 1, e.g. 'b/z.jpg'`` (most frequent first)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        groups[entry[key]].append(entry["path"])
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return "; ".join(
        f"{name}: {len(paths)}, e.g. " + ", ".join(repr(p) for p in sorted(paths)[:EXAMPLES_SHOWN])
        for name, paths in ordered
    )


def _why_none(findings: _Findings) -> str:
    """Why no image was kept: the rejects by kind and the skipped files by reason, with example paths."""
    parts = []
    if findings.rejects:
        parts.append(f"{len(findings.rejects)} rejected - {_grouped(findings.rejects, 'kind')}")
    if findings.skipped:
        parts.append(f"{len(findings.skipped)} skipped - {_grouped(findings.skipped, 'reason')}")
    if findings.conflicts:
        parts.append(f"{len(findings.conflicts)} label conflict(s), every copy excluded")
    return " | ".join(parts) or "the class folders hold no files"


def _progress_counter(progress: Reporter | None, total: int) -> Callable[[int], None]:
    """A ``(newly done) -> None`` callback reporting ``Step("index", done, total)`` when the count advanced by
    :data:`PROGRESS_FRACTION` of the total or :data:`PROGRESS_SECONDS` passed, and at the total (final)."""
    every = max(1, int(total * PROGRESS_FRACTION))
    state = {"done": 0, "shown": 0, "at": time.monotonic()}

    def advance(n: int) -> None:
        state["done"] += n
        done, now = state["done"], time.monotonic()
        if done >= total or done - state["shown"] >= every or now - state["at"] >= PROGRESS_SECONDS:
            state["shown"], state["at"] = done, now
            send_step(progress, Step("index", done, total, "img", final=done >= total))

    return advance


def build_index(
    source: Path | pd.DataFrame, cfg: DataConfig, *, progress: Reporter | None = None
) -> IndexResult:
    """Scan ``source`` (a class-folder directory, a CSV file, or a DataFrame whose paths are relative to
    ``cfg.root``), validate every file, and return the table, classes and report. Raises :class:`DatasetError`
    when the dataset as a whole is unusable. ``progress`` receives ``Step("index", done, total, "img")``
    events while files are validated (the last one final).
    """
    findings = _Findings()
    folders: list[str] = []
    if isinstance(source, pd.DataFrame):
        kind, root = "dataframe", Path(cfg.root)
        candidates = scan_table(source, root, cfg, findings)
    elif isinstance(source, Path | str) and Path(source).is_file():
        kind, root = "csv", Path(cfg.root)
        candidates = scan_table(read_csv_source(Path(source)), root, cfg, findings)
    elif isinstance(source, Path | str):
        kind, root = "directory", Path(source)
        candidates, folders = scan_directory(root, cfg, findings)
    else:
        raise TypeError(f"build_index: expected a Path or a pandas DataFrame, got {type(source).__name__}")

    if cfg.classes is not None:  # a label outside the explicit list is a reject, never silently dropped
        allowed = set(cfg.classes)
        for c in candidates:
            if c.label not in allowed:
                findings.reject(c.rel, "unknown_label", f"label {c.label!r} is not in data.classes")
        candidates = [c for c in candidates if c.label in allowed]

    if candidates:
        import tensorflow  # noqa: F401  (load the decoder's library before the progress bar starts counting)
    send_step(progress, Step("index", 0, len(candidates), "img", final=not candidates))
    checked = validate_all(
        candidates, cfg.max_pixels, _workers(cfg), _progress_counter(progress, len(candidates))
    )
    for item in checked:
        if item.info is None:
            findings.reject(item.candidate.rel, item.kind, item.reason)
    kept, duplicates = _dedupe([r for r in checked if r.info is not None], findings)

    names = _class_names([c.label for c in candidates] + folders, cfg)
    if not kept:
        where = str(source) if kind != "dataframe" else "the DataFrame"
        raise DatasetError(f"no valid images found in {where} ({_why_none(findings)})")
    per_class = Counter(r.candidate.label for r in kept)
    if len(names) < 2:
        raise DatasetError(f"only one class found ({list(names)}); a classifier needs at least 2")
    empty = [n for n in names if per_class[n] == 0]
    if empty:
        raise DatasetError(f"class(es) with no valid image: {empty} (each class needs at least one)")
    class_ids = {name: i for i, name in enumerate(names)}
    mode = _class_mode(cfg, len(names))

    rows = []
    for r in kept:
        assert r.info is not None
        rows.append(
            {
                "path": r.candidate.rel,
                "label": r.candidate.label,
                "class_id": class_ids[r.candidate.label],
                "split": assign_split(r.sha256, cfg.split, cfg.split_seed),
                "sha256": r.sha256,
                "width": r.info.width,
                "height": r.info.height,
                "bytes": r.size,
                "orientation": r.info.orientation,
                "format": r.info.format,
            }
        )
    table = (
        pd.DataFrame(rows, columns=list(COLUMNS)).sort_values("path", kind="stable").reset_index(drop=True)
    )

    counts = {n: {s: 0 for s in SPLITS} for n in names}
    for label, split in zip(table["label"], table["split"], strict=True):
        counts[label][split] += 1
    for n in names:
        counts[n]["total"] = sum(counts[n][s] for s in SPLITS)
    warnings = _split_warnings(counts, cfg)
    classes = ClassInfo(names, mode)
    report = {
        "source": kind,
        "data_root": str(cfg.root) if kind != "directory" else str(source),
        "images": len(table),
        "files_checked": len(checked),
        "classes": list(names),
        "class_mode": mode,
        "counts": counts,
        "splits": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "rejects": sorted(findings.rejects, key=lambda r: r["path"]),
        "rejects_by_kind": dict(sorted(Counter(r["kind"] for r in findings.rejects).items())),
        "skipped": sorted(findings.skipped, key=lambda r: r["path"]),
        "duplicates": sorted(duplicates, key=lambda d: d["kept"]),
        "duplicate_rows": findings.duplicate_rows,
        "conflicts": findings.conflicts,
        "warnings": warnings,
        "split_rule": {"fractions": cfg.split.model_dump(), "split_seed": cfg.split_seed},
    }
    return IndexResult(table, classes, report)


# ------------------------------------------------------------------------------------- the stage's source
def source_for(cfg: DataConfig, dataframe: pd.DataFrame | None) -> Path | pd.DataFrame:
    """What :func:`build_index` scans for ``cfg``: ``dataframe`` when given, the ``data.csv`` file, or the
    class-folder root."""
    if dataframe is not None:
        return dataframe
    if cfg.source == "csv":
        assert cfg.csv is not None  # enforced by DataConfig
        return find_csv(cfg.csv, cfg.root)
    _check_root(Path(cfg.root), "a folder with one subfolder per class")  # a file here is no CSV source
    return Path(cfg.root)


def find_csv(csv: Path, root: Path) -> Path:
    """The CSV file ``data.csv`` names: an absolute path as is; a relative one in the current folder first,
    then inside ``data.root`` (``--set data.csv=labels.csv`` for ``my_images/labels.csv``). The error names
    every place looked at."""
    csv = Path(csv).expanduser()
    places = [csv] if csv.is_absolute() else [Path(os.path.abspath(csv)), Path(os.path.abspath(root)) / csv]
    for place in places:
        if place.is_file():
            return place
    looked = ", ".join(str(p) for p in places)
    raise DatasetError(f"data.csv: file not found, got {str(csv)!r} (looked for {looked})")
