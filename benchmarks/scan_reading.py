"""Reading scans for ``medvl generate-report``: one process against ``--workers N`` (the same tensors).

    python benchmarks/scan_reading.py [--jpgs 96] [--dicoms 32] [--size 256] [--batch 64] [--workers 1 2]

Generates full-size (3000 x 2500) JPGs and 12-bit DICOMs (``benchmarks/prepare_throughput.py``'s), then reads them
batch by batch with :class:`medvl.inference.scan_reader.ScanReader` as ``generate-report`` does, for each worker
count in turn (the pool started once, as in one command), and checks every count gives the same tensors and
headers. Prints a table and writes ``benchmarks/results/scan_reading_<cpus>cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import prepare_throughput  # noqa: E402

from medvl.inference.scan_reader import ScanReader  # noqa: E402


def read_all(paths: list[Path], size: int, batch: int, workers: int) -> tuple[float, list]:
    with ScanReader(size, workers) as reader:
        reader.read(paths[:1])  # the workers started (as a command's first batch starts them)
        start = time.perf_counter()
        out = []
        for i in range(0, len(paths), batch):
            out += reader.read(paths[i : i + batch])
        return time.perf_counter() - start, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jpgs", type=int, default=96)
    p.add_argument("--dicoms", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medvl_scan_reading_"))
    try:
        jpgs, dcms, _ = prepare_throughput.make_data(
            tmp, args.jpgs, args.dicoms, distinct=4, dicoms_in_tree=True
        )
        paths = sorted([*jpgs, *dcms])
        rows, first = [], None
        for workers in args.workers:
            seconds, out = read_all(paths, args.size, args.batch, workers)
            if first is None:
                first = out
            same = all(
                a[2] == b[2] and torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None)
                for a, b in zip(first, out, strict=True)
            )
            rows.append(
                {"workers": workers, "seconds": seconds, "scans_per_s": len(paths) / seconds, "same": same}
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["scans_per_s"]
    print(
        f"\nreading {len(paths)} full-size scans ({args.jpgs} JPG, {args.dicoms} DICOM) to {args.size} px, batches of {args.batch}"
    )
    print(f"{'workers':>8}{'scans/s':>10}{'ratio':>8}  same tensors")
    for r in rows:
        print(f"{r['workers']:>8}{r['scans_per_s']:>10.1f}{r['scans_per_s'] / base:>7.2f}x  {r['same']}")
    record = {
        "command": "python benchmarks/scan_reading.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "scans": len(paths),
        "size": args.size,
        "batch": args.batch,
        "rows": rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = args.out or BENCH / "results" / f"scan_reading_{os.cpu_count()}cpu.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
