"""Throughput of ``medvl prepare`` on full-size chest X-rays, against the naive way, and of reading the cache.

Generates chest-like 2500 x 3000 JPGs (quality 95, as MIMIC-CXR-JPG) and 12-bit uncompressed DICOMs with a window,
then measures, on one process unless stated:

* images/s to a 256 px cache row, **ours** (what ``prepare`` runs: JPEG DCT-domain reduced decode via PIL ``draft``,
  DICOM intensity pipeline through a per-value lookup table, PIL's anti-aliased resize) against **naive** (full
  decode, the pipeline on every pixel in float64 with pydicom's ``apply_modality_lut`` / ``apply_voi_lut``, then
  ``skimage.transform.resize(anti_aliasing=True)``), and how far apart their outputs are;
* the whole ``prepare_mimic`` run on a MIMIC-JPG-layout tree of those JPGs with ``--workers 1`` and ``2``;
* reading the prepared dataset (``PreparedDataset[i]``, one worker) against decoding the JPGs again.

Run: ``python benchmarks/prepare_throughput.py [--images 40] [--dicoms 16] [--size 256]``; prints a table and writes
``benchmarks/results/prepare_throughput.json``. Ours and naive are timed image by image, interleaved, so both see
the same background load; absolute numbers still depend on the machine and on other load (the load average is
recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from skimage.transform import resize as sk_resize

from medvl.data.dicom import write_dicom
from medvl.data.images import resize_geometry
from medvl.data.ingest import _read_and_resize
from medvl.data.mimic import prepare_mimic
from medvl.data.prepared import PreparedDataset, to_uint8
from medvl.data.testing import chest_dataset, synthetic_chest
from medvl.data.xray import LOW
from medvl.text.chexpert import CHEXPERT_LABELS

RESULTS = Path(__file__).resolve().parent / "results" / "prepare_throughput.json"
H, W = 3000, 2500


def naive_pad_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Full-resolution float image -> (size, size): skimage anti-aliased resize, padded like ours."""
    geom = resize_geometry(img.shape, size)
    scaled = sk_resize(img, geom.resized, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    out = np.full((size, size), LOW, np.float32)
    top, left = geom.offset
    out[top : top + geom.resized[0], left : left + geom.resized[1]] = scaled
    return out


def naive_jpg(path: Path, size: int) -> np.ndarray:
    arr = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return to_uint8(naive_pad_resize(arr / 255.0 * 2048.0 - 1024.0, size))


def naive_dicom(path: Path, size: int) -> np.ndarray:
    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    bits = int(ds.BitsStored)
    unit = arr / (2**bits - 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return to_uint8(naive_pad_resize(unit * 2048.0 - 1024.0, size))


def timed(fn, items) -> tuple[float, list]:
    start = time.perf_counter()
    outs = [fn(x) for x in items]
    return time.perf_counter() - start, outs


def make_data(
    tmp: Path,
    n_jpg: int,
    n_dcm: int,
    *,
    shape: tuple[int, int] = (H, W),
    distinct: int = 0,
    dicoms_in_tree: bool = False,
) -> tuple[list[Path], list[Path], Path]:
    """Chest-like files of ``shape`` (full size by default); JPGs placed in a MIMIC-CXR-JPG tree with its tables.
    ``distinct`` > 0: JPGs (and DICOMs) after the first ``distinct`` are byte copies of those (same decoding cost,
    made fast). ``dicoms_in_tree``: the DICOMs go into the same tree as ``.dcm`` studies of their own (a tree that
    mixes both, as ``prepare mimic-cxr`` accepts), else beside it."""
    h, w = shape
    rng = np.random.default_rng(0)
    bases = [synthetic_chest(h, w, seed=s, marker=True) for s in range(2)]
    root = tmp / "mimic-jpg"
    jpgs, dcms, meta = [], [], []

    def tree_file(i: int, suffix: str) -> Path:
        subject, study, dicom_id = f"1{i:07d}", f"5{i:07d}", f"{i:08x}-bench"
        folder = root / f"files/p{subject[:2]}/p{subject}/s{study}"
        folder.mkdir(parents=True)
        (folder.parent / f"s{study}.txt").write_text(" FINAL REPORT\n FINDINGS: The lungs are clear.\n")
        meta.append((dicom_id, subject, study))
        return folder / f"{dicom_id}{suffix}"

    kinds = [("jpg", i) for i in range(n_jpg)] + [("dcm", i) for i in range(n_dcm)]
    if dicoms_in_tree:  # spread the DICOMs evenly through the tree, so each part of a run sees the same mix
        kinds.sort(key=lambda item: (item[1] + 0.5) / (n_jpg if item[0] == "jpg" else n_dcm))
    for position, (kind, i) in enumerate(kinds):
        if kind == "jpg":
            path = tree_file(position, ".jpg")
            if 0 < distinct <= i:
                shutil.copyfile(jpgs[i % distinct], path)
            else:
                unit = bases[i % 2] + rng.normal(0, 0.008, (h, w))  # fine texture: JPEG sizes near real films
                Image.fromarray(np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)).save(path, quality=95)
            jpgs.append(path)
            continue
        path = tree_file(position, ".dcm") if dicoms_in_tree else tmp / f"dicom_{i:03d}.dcm"
        if 0 < distinct <= i:
            shutil.copyfile(dcms[i % distinct], path)
        else:
            unit = bases[i % 2] + rng.normal(0, 0.008, (h, w))
            ds = chest_dataset(
                unit,
                bits=12,
                photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                window=(2048.0 if i % 2 == 0 else 2047.0, 3500.0),
            )
            write_dicom(ds, path)
        dcms.append(path)
    root.mkdir(parents=True, exist_ok=True)
    ids = pd.DataFrame(meta, columns=["dicom_id", "subject_id", "study_id"])
    ids.assign(ViewPosition="PA").to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    ids.assign(split="train").to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    ids[["subject_id", "study_id"]].assign(**{c: "" for c in CHEXPERT_LABELS}).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False
    )
    return jpgs, dcms, root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=40, help="full-size JPGs")
    p.add_argument("--dicoms", type=int, default=16, help="full-size DICOMs")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    size = args.size
    tmp = Path(tempfile.mkdtemp(prefix="medvl_bench_"))
    try:
        t0 = time.perf_counter()
        jpgs, dcms, root = make_data(tmp, args.images, args.dicoms)
        gen_s = time.perf_counter() - t0
        jpg_mb = float(np.mean([p.stat().st_size for p in jpgs]) / 1e6)
        rows = []

        def ours(path: Path) -> np.ndarray:
            return _read_and_resize(str(path), size, "pad", False)[0]

        for kind, files, naive in (
            ("JPG 2500x3000", jpgs, naive_jpg),
            ("DICOM 12-bit 2500x3000", dcms, naive_dicom),
        ):
            if not files:
                continue
            ours(files[0])  # warm-up: imports, allocator
            # Interleaved per image, so both ways see the same background load on a shared machine.
            t_ours = t_naive = 0.0
            a, b = [], []
            for f in files:
                dt, out = timed(ours, [f])
                t_ours += dt
                a += out
                dt, out = timed(lambda x, nv=naive: nv(x, size), [f])
                t_naive += dt
                b += out
            diff = float(
                np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b, strict=True)])
            )
            rows.append(
                {
                    "what": f"{kind} -> {size}px cache row",
                    "n": len(files),
                    "ours_img_s": len(files) / t_ours,
                    "naive_img_s": len(files) / t_naive,
                    "speedup": t_naive / t_ours,
                    "mean_abs_diff_uint8": diff,
                }
            )

        prepare = {}
        for workers in (1, 2):
            out = tmp / f"prepared_w{workers}"
            start = time.perf_counter()
            result = prepare_mimic(root, out, size=size, workers=workers)
            prepare[workers] = {
                "seconds": time.perf_counter() - start,
                "images": result.kept,
                "img_s": result.kept / (time.perf_counter() - start),
            }

        ds = PreparedDataset(tmp / "prepared_w1")
        ds[0]
        reps = 0
        start = time.perf_counter()
        while time.perf_counter() - start < 1.0:
            for i in range(len(ds)):
                ds[i]
            reps += 1
        read_s = (time.perf_counter() - start) / (reps * len(ds))
        t_decode, _ = timed(ours, jpgs)
        read = {
            "prepared_img_s": 1.0 / read_s,
            "decode_again_img_s": len(jpgs) / t_decode,
            "ratio": (t_decode / len(jpgs)) / read_s,
        }

        print(
            f"\nmedvl prepare throughput  ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
            f"{args.images} JPGs of {jpg_mb:.2f} MB, {args.dicoms} DICOMs; data generated in {gen_s:.0f}s)\n"
        )
        print(
            f"{'what':<42}{'n':>4}{'ours img/s':>12}{'naive img/s':>13}{'speedup':>9}{'|diff| (0-255)':>16}"
        )
        for r in rows:
            print(
                f"{r['what']:<42}{r['n']:>4}{r['ours_img_s']:>12.1f}{r['naive_img_s']:>13.2f}{r['speedup']:>8.1f}x"
                f"{r['mean_abs_diff_uint8']:>16.2f}"
            )
        for w, v in prepare.items():
            print(f"{'prepare_mimic, JPG tree, --workers ' + str(w):<42}{v['images']:>4}{v['img_s']:>12.1f}")
        print(f"{'read PreparedDataset[i] (1 worker)':<42}{len(ds):>4}{read['prepared_img_s']:>12.0f}")
        print(
            f"{'decode the JPGs again (ours)':<42}{len(jpgs):>4}{read['decode_again_img_s']:>12.1f}"
            f"{'':>13}{read['ratio']:>8.0f}x  (cache vs decode)"
        )
        record = {
            "settings": {
                "images": args.images,
                "dicoms": args.dicoms,
                "size": size,
                "shape": [H, W],
                "jpeg_quality": 95,
                "mean_jpg_mb": jpg_mb,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "processor": platform.processor(),
                "load_average_1m": os.getloadavg()[0],
            },
            "decode_and_resize": rows,
            "prepare_mimic": {f"workers_{w}": v for w, v in prepare.items()},
            "read": read,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
