"""Writing a prepared dataset: the machinery every ingestion (MIMIC-CXR, IU X-ray, IU-Phantom) shares.

The resumable image cache (decoded in chunks by worker processes into a memory-mapped ``images.npy``), the
index, ``skipped.csv`` and ``meta.json`` written last. The layout and the read side are in
:mod:`medvl.data.prepared`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medvl.data.images import ResizeFit, ResizeGeometry, resize_geometry
from medvl.data.prepared import (
    CACHE_FILE,
    FORMAT,
    INDEX_COLUMNS,
    INDEX_FILE,
    META_FILE,
    REGION_BOX_COLUMNS,
    REGIONS_FILE,
    SKIPPED_FILE,
    SPLITS,
    STATE_DIR,
)
from medvl.data.scans import read_scan_file
from medvl.data.workers import process_context, run_jobs
from medvl.data.xray import problem_of
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS


@dataclass
class PrepareResult:
    """What a ``prepare_*`` run did. ``decoded``: images decoded in this run; ``reused``: images a previous,
    interrupted run had already cached (not decoded again)."""

    out: Path
    kept: int
    skipped: int
    skipped_by_reason: dict[str, int]
    decoded: int
    reused: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"prepared {self.kept} images into {self.out} in {self.seconds:.1f}s "
            f"({self.decoded} decoded now, {self.reused} reused from an earlier run); {self.skipped} skipped"
        ]
        for reason, n in sorted(self.skipped_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n:>7}  {reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class ImageOutcome:
    """One cache row after decoding: ``shape`` is the source image's full-resolution (H, W)."""

    ok: bool
    reason: str = ""
    shape: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _CacheSettings:
    size: int
    fit: str
    jpg_compatible: bool
    selection: dict
    n: int
    paths_sha1: str
    chunk_size: int

    def differences(self, other: dict) -> list[str]:
        mine = self.__dict__
        diffs = [
            f"{k} {other.get(k)!r} -> {mine[k]!r}"
            for k in ("size", "fit", "jpg_compatible")
            if other.get(k) != mine[k]
        ]
        theirs = other.get("selection") or {}
        diffs += [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in self.selection.items() if theirs.get(k) != v]
        if not diffs and (other.get("n") != self.n or other.get("paths_sha1") != self.paths_sha1):
            diffs.append(
                f"the images to prepare changed ({other.get('n')} -> {self.n} files): the raw tree or "
                "its tables changed since the earlier run"
            )
        return diffs


@dataclass(frozen=True)
class _ChunkJob:
    index: int
    cache: str
    items: tuple[tuple[int, str], ...]
    size: int
    fit: str
    jpg_compatible: bool


ENDED_WORKER = "decoding it ended its worker process"


def reason_kind(reason: str) -> str:
    """A reason without its specifics (numbers, names after ';' or '('), for counting."""
    return reason.split(";")[0].split(" (")[0].strip()


def _read_and_resize(
    path: str, size: int, fit: str, jpg_compatible: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """One cache row: (S, S) uint8 and the source's shape, as inference reads the same file (load_scan)."""
    return read_scan_file(path, size, fit=fit, jpg_compatible=jpg_compatible)


def _run_chunk(job: _ChunkJob) -> tuple[int, list[tuple[int, bool, str, int, int]]]:
    """Decode one chunk of images into the shared memory-mapped cache (runs in a worker process)."""
    cache = np.load(job.cache, mmap_mode="r+")
    results = []
    for row, path in job.items:
        try:
            img, shape = _read_and_resize(path, job.size, job.fit, job.jpg_compatible)
        except Exception as exc:  # a batch job records what it skipped and why, and carries on
            results.append((row, False, problem_of(exc, path), 0, 0))
            continue
        cache[row] = img
        results.append((row, True, "", int(shape[0]), int(shape[1])))
    cache.flush()
    del cache
    return job.index, results


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _reserve_disk(path: Path) -> None:
    """Allocate the whole (sparse) cache file now, so that a full disk is an ``OSError`` naming it here rather
    than a crash of a worker writing into the memory map later."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # a file system without fallocate: nothing to reserve
            raise OSError(exc.errno, f"{exc.strerror} (reserving the image cache)", str(path)) from None


def build_image_cache(
    out: str | Path,
    paths: Sequence[str],
    *,
    size: int,
    fit: ResizeFit | str = ResizeFit.PAD,
    jpg_compatible: bool = False,
    workers: int = 1,
    desc: str = "prepare",
    selection: dict | None = None,
    chunk_size: int | None = None,
) -> tuple[list[ImageOutcome], int, int]:
    """Decode and resize ``paths`` into ``out/images.npy`` (uint8 (N, S, S); row i is paths[i]).

    Resumable: each finished chunk leaves a done-marker in ``out/.prepare/``; a rerun with the same settings decodes
    only chunks without one. With several ``workers``, an image whose decoding ends its worker process (a codec's
    crash, an out-of-memory kill) is found and skipped with the reason (:mod:`medvl.data.workers`); its chunk
    leaves no marker, so a rerun tries that chunk again. A rerun with different image settings or a different
    ``selection`` (what chose the images: views, sections...) raises :class:`DataError` naming what changed.
    Returns (one outcome per path, number decoded now, number reused).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / STATE_DIR
    n = len(paths)
    fit = ResizeFit(fit).value
    sha = hashlib.sha1("\n".join(paths).encode()).hexdigest()
    state_file = state_dir / "state.json"
    cache_path = out / CACHE_FILE
    previous = json.loads(state_file.read_text()) if state_file.exists() else None
    if chunk_size is None:
        chunk_size = (
            int(previous["chunk_size"]) if previous else max(1, min(128, -(-n // (max(1, workers) * 4))))
        )
    settings = _CacheSettings(
        size=size,
        fit=fit,
        jpg_compatible=bool(jpg_compatible),
        selection=json.loads(json.dumps(selection or {})),
        n=n,
        paths_sha1=sha,
        chunk_size=chunk_size,
    )
    if previous is not None:
        diffs = settings.differences(previous)
        if diffs:
            raise DataError(
                f"{out} holds a preparation made with other settings ({'; '.join(diffs)}); "
                "use another --out, or delete it to start again"
            )
        if int(previous["chunk_size"]) != chunk_size:
            raise DataError(
                f"{out}: chunk size {chunk_size} differs from the interrupted run's {previous['chunk_size']}"
            )
    elif (out / INDEX_FILE).exists() or cache_path.exists():
        raise DataError(f"{out} already holds a prepared dataset without resume state; use another --out")

    mark_unfinished(out)  # from here on the directory is being (re)written
    fresh = previous is None or not cache_path.exists()
    if not fresh:
        existing = np.load(cache_path, mmap_mode="r")
        fresh = existing.shape != (n, size, size) or existing.dtype != np.uint8
        del existing
    if fresh:
        state_dir.mkdir(exist_ok=True)
        for marker in state_dir.glob("chunk_*.json"):
            marker.unlink()
        if n:
            np.lib.format.open_memmap(cache_path, mode="w+", dtype=np.uint8, shape=(n, size, size)).flush()
            _reserve_disk(cache_path)
        else:
            np.save(cache_path, np.zeros((0, size, size), dtype=np.uint8))
        _atomic_write(state_file, json.dumps(settings.__dict__, indent=1))

    chunks = [list(range(i, min(n, i + chunk_size))) for i in range(0, n, chunk_size)]
    outcomes: list[ImageOutcome | None] = [None] * n

    def marker_path(k: int) -> Path:
        return state_dir / f"chunk_{k:07d}.json"

    def record(k: int, results: list) -> None:
        for row, ok, reason, h, w in results:
            outcomes[row] = ImageOutcome(ok=bool(ok), reason=str(reason), shape=(int(h), int(w)))

    todo: list[_ChunkJob] = []
    reused = 0
    for k, rows in enumerate(chunks):
        mp_path = marker_path(k)
        if mp_path.exists():
            record(k, json.loads(mp_path.read_text())["results"])
            reused += len(rows)
        else:
            todo.append(
                _ChunkJob(
                    index=k,
                    cache=str(cache_path),
                    items=tuple((r, paths[r]) for r in rows),
                    size=size,
                    fit=fit,
                    jpg_compatible=bool(jpg_compatible),
                )
            )

    def finish(k: int, results: list) -> None:
        _atomic_write(marker_path(k), json.dumps({"results": results}))
        record(k, results)

    decoded = sum(len(j.items) for j in todo)
    with tqdm(total=n, initial=reused, desc=desc, unit="img", mininterval=1.0, smoothing=0.1) as bar:

        def done(k: int, results: list, ended: dict[int, str]) -> None:
            if ended:  # rows whose decoding ended a worker process: tried again by a rerun (no marker)
                results = sorted(
                    [
                        *results,
                        *((row, False, f"{ENDED_WORKER} ({how})", 0, 0) for row, how in ended.items()),
                    ]
                )
                record(k, results)
            else:
                finish(k, results)
            bar.update(len(results))

        if workers > 1 and len(todo) > 1:
            run_jobs(todo, _run_chunk, workers, process_context(), done)
        else:
            for job in todo:
                done(*_run_chunk(job), {})
    assert all(o is not None for o in outcomes)
    return outcomes, decoded, reused  # type: ignore[return-value]


def _label_text(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(int(value))


def write_prepared(
    out: str | Path,
    index: pd.DataFrame,
    skipped: Sequence[tuple[str, str]],
    meta: dict,
    *,
    regions: pd.DataFrame | None = None,
) -> None:
    """Write index.csv, skipped.csv, regions.csv (if given) and, last, meta.json (the completion mark)."""
    out = Path(out)
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"index lacks columns {missing}")
    table = index[list(INDEX_COLUMNS)].copy()
    for c in CHEXPERT_LABELS:
        table[c] = [_label_text(v) for v in table[c].astype(float)]
    tmp = out / (INDEX_FILE + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, out / INDEX_FILE)
    tmp = out / (SKIPPED_FILE + ".tmp")
    pd.DataFrame(list(skipped), columns=["path", "reason"]).to_csv(tmp, index=False)
    os.replace(tmp, out / SKIPPED_FILE)
    if regions is not None:
        tmp = out / (REGIONS_FILE + ".tmp")
        regions.to_csv(tmp, index=False)
        os.replace(tmp, out / REGIONS_FILE)
    meta = {"format": FORMAT, **meta}
    _atomic_write(out / META_FILE, json.dumps(meta, indent=1, sort_keys=False, default=str))


def check_source(root: Path, size: int) -> None:
    """What every ``medvl prepare`` source checks first: its root is a folder, and the size is usable."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if size < 8:
        raise DataError(f"size {size} is too small (at least 8 pixels)")


def mark_unfinished(out: str | Path) -> None:
    """Remove meta.json so a directory being (re)prepared never reads as complete."""
    path = Path(out) / META_FILE
    if path.exists():
        path.unlink()


def map_regions(regions: pd.DataFrame, geometry: dict[str, ResizeGeometry]) -> pd.DataFrame:
    """Keep the region rows of kept images and move their boxes (normalised source coordinates) into the
    prepared square image's normalised coordinates (the padding shifts them when the source is not square)."""
    if regions.columns[0] != "dicom_id":
        raise DataError(f"regions.csv must start with a dicom_id column, got {list(regions.columns)[:3]}")
    kept = regions[regions["dicom_id"].isin(geometry.keys())].copy()
    if all(c in kept.columns for c in REGION_BOX_COLUMNS) and len(kept):
        boxes = kept[list(REGION_BOX_COLUMNS)].astype(float).to_numpy()
        mapped = [geometry[d].map_box(*b) for d, b in zip(kept["dicom_id"], boxes, strict=True)]
        kept[list(REGION_BOX_COLUMNS)] = np.round(np.asarray(mapped, dtype=float), 6)
    return kept.reset_index(drop=True)


def finish_prepare(
    out: Path,
    *,
    candidates: pd.DataFrame,
    outcomes: Sequence[ImageOutcome],
    skipped: list[tuple[str, str]],
    meta: dict,
    size: int,
    fit: str,
    decoded: int,
    reused: int,
    started: float,
    regions_csv: Path | None = None,
    notes: Sequence[str] = (),
) -> PrepareResult:
    """Turn the candidates and their decode outcomes into index/skipped/regions/meta; print and return counts.

    ``candidates``: one row per cache row (``row`` = position) with INDEX_COLUMNS except ``row``, plus ``path``
    (absolute image path) and ``source`` (relative path).
    """
    ok = np.array([o.ok for o in outcomes], dtype=bool)
    skipped = list(skipped)
    for i in np.flatnonzero(~ok):
        skipped.append((candidates.iloc[i]["source"], outcomes[i].reason))
    index = candidates.copy()
    index.insert(0, "row", np.arange(len(index), dtype=np.int64))
    index = index[ok].reset_index(drop=True)
    regions = None
    if regions_csv is not None and regions_csv.exists():
        raw = pd.read_csv(regions_csv, dtype={"dicom_id": str}, keep_default_na=False)
        geometry = {
            d: resize_geometry(outcomes[r].shape, size, fit)
            for d, r in zip(index["dicom_id"], index["row"], strict=True)
        }
        regions = map_regions(raw, geometry)
    by_reason = Counter(reason_kind(r) for _, r in skipped)
    if by_reason[ENDED_WORKER]:
        notes = [
            *notes,
            f"{by_reason[ENDED_WORKER]} image(s) ended their worker process; rerunning the same command tries them "
            "again (the rest is reused)",
        ]
    meta = {
        **meta,
        "size": size,
        "fit": fit,
        "counts": {
            "images": int(ok.sum()),
            "skipped": len(skipped),
            "by_split": {s: int((index["split"] == s).sum()) for s in SPLITS},
            "skipped_by_reason": dict(by_reason),
        },
        "notes": list(notes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_prepared(out, index, skipped, meta, regions=regions)
    result = PrepareResult(
        out=out,
        kept=int(ok.sum()),
        skipped=len(skipped),
        skipped_by_reason=dict(by_reason),
        decoded=decoded,
        reused=reused,
        seconds=time.perf_counter() - started,
        notes=list(notes),
    )
    print(result.summary())
    return result
