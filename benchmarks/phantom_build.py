"""Time of ``medvl prepare phantom`` and what the phantom draws.

Measures, on this machine:

* the whole build (IU reports, labeller, lung atlas, planning, drawing + writing the raw tree, tables, the MIMIC
  ingestion, the contact sheet) for all studies at 256 px with ``--workers`` processes, wall time per stage. The
  lung atlas is built cold (a fresh ``MEDVL_CACHE_DIR``), so the number is what a first run costs; later runs read
  the cached atlas and save that stage;
* drawing alone, CPU milliseconds per frontal image (one process) at 128, 256 and 512 px;
* how the drawn ground truth matches the labels: for each CheXpert observation, studies labelled positive and how
  many of them have a drawn region of that observation (and drawn regions in studies not labelled positive: must
  be 0).

Run: ``python benchmarks/phantom_build.py [--studies N] [--size 256] [--workers 2]``; prints tables and writes
``benchmarks/results/phantom_build.json``. Wall times depend on other load on the machine (the load average before
and after is recorded); CPU times much less so.
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

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_build.json"


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the worker pools)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def draw_cpu_ms(sizes: tuple[int, ...], n: int) -> dict[int, float]:
    import numpy as np

    from medvl.data.phantom import load_iu_reports, plan_findings, report_text
    from medvl.data.phantom_anatomy import lesion_diameters, load_lung_atlas
    from medvl.data.phantom_draw import render_frontal
    from medvl.text.labeler import extract_mentions

    atlas, lesions = load_lung_atlas(), lesion_diameters()
    reports = load_iu_reports()[:n]
    specs = [plan_findings(extract_mentions(report_text(r)), np.random.default_rng(i)) for i, r in enumerate(reports)]
    out = {}
    for size in sizes:
        render_frontal(specs[0], atlas, 0, size, np.random.default_rng(0), lesions)  # warm-up (noise bank)
        t = time.process_time()
        for i, s in enumerate(specs):
            render_frontal(s, atlas, i % len(atlas), size, np.random.default_rng(i), lesions)
        out[size] = (time.process_time() - t) / len(specs) * 1000
    return out


def coverage(out: Path) -> dict[str, dict[str, int]]:
    """Per observation: studies labelled 1, of them with a drawn region, and regions drawn without a label."""
    import numpy as np
    import pandas as pd

    from medvl.data.prepared import read_index
    from medvl.text.chexpert import CHEXPERT_LABELS

    index = read_index(out)
    regions = pd.read_csv(out / "regions.csv", dtype={"dicom_id": str}, keep_default_na=False)
    drawn = regions.groupby("observation")["dicom_id"].apply(set).to_dict()
    table = {}
    for name in CHEXPERT_LABELS:
        if name == "No Finding":
            continue
        pos = set(index.loc[index[name] == 1, "dicom_id"])
        got = drawn.get(name, set())
        table[name] = {"labelled_positive": len(pos), "with_drawn_region": len(pos & got),
                       "drawn_without_label": len(got - pos)}
    normal = index[index["No Finding"] == 1]
    lesions = regions[regions["finding"] != "device"]  # No Finding allows support devices
    table["No Finding"] = {"labelled_positive": len(normal),
                           "with_drawn_region": int(np.isin(normal["dicom_id"], lesions["dicom_id"]).sum()),
                           "drawn_without_label": 0}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=None, help="default: all 3,927")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--draw-images", type=int, default=60, help="images per size for the CPU-time table")
    ap.add_argument("--keep", type=Path, default=None, help="build here and keep it (default: a temporary folder)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="phantom_bench_"))
    os.environ["MEDVL_CACHE_DIR"] = str(tmp / "cache")  # cold lung atlas: what a first run pays
    out = args.keep or tmp / "phantom"
    load_before = os.getloadavg()
    from medvl.data.phantom import prepare_phantom

    cpu0 = _cpu_seconds()
    t = time.perf_counter()
    result = prepare_phantom(out, studies=args.studies, size=args.size, workers=args.workers)
    total = time.perf_counter() - t
    cpu = _cpu_seconds() - cpu0
    load_after = os.getloadavg()
    stages = {**{k: round(v, 2) for k, v in result.build.seconds.items()},
              "ingestion (prepare_mimic)": round(result.prepared.seconds, 2)}
    stages["rest"] = round(total - sum(stages.values()), 2)
    b = result.build
    cov = coverage(out)
    draw = draw_cpu_ms((128, 256, 512), args.draw_images)
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nIU-Phantom build: {b.studies} studies, {b.images} images ({b.laterals} lateral, {b.dicoms} DICOM), "
          f"{b.regions} drawn findings, {args.size} px, {args.workers} workers, {os.cpu_count()} CPUs")
    print(f"{'stage':<28}{'wall s':>9}")
    for k, v in stages.items():
        print(f"{k:<28}{v:>9.2f}")
    print(f"{'total':<28}{total:>9.2f}   ({b.images / total:.0f} images/s end to end; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    print(f"{'CPU seconds, all processes':<28}{cpu:>9.2f}   (on {args.workers} idle cores the wall time would be "
          f"about {cpu / args.workers:.0f} s or more)")
    print(f"\n{'drawing one frontal image':<28}{'CPU ms':>9}")
    for size, ms in draw.items():
        print(f"{f'{size} px':<28}{ms:>9.1f}")
    print(f"\n{'observation':<28}{'label=1':>9}{'drawn':>9}{'unlabelled':>11}")
    for name, row in cov.items():
        print(f"{name:<28}{row['labelled_positive']:>9}{row['with_drawn_region']:>9}{row['drawn_without_label']:>11}")
    print("(No Finding row: normal studies, and how many of them have a drawn region other than a device: must be 0)")
    print(f"\ndrawn regions by finding: {b.drawn}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python benchmarks/phantom_build.py"
                   + (f" --studies {args.studies}" if args.studies else "")
                   + f" --size {args.size} --workers {args.workers}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "build": {"studies": b.studies, "subjects": b.subjects, "images": b.images, "laterals": b.laterals,
                  "dicoms": b.dicoms, "regions": b.regions, "abnormal_studies": b.abnormal_studies,
                  "drawn": b.drawn, "kept_by_ingestion": result.prepared.kept,
                  "skipped_by_ingestion": result.prepared.skipped_by_reason},
        "wall_seconds": {"stages": stages, "total": round(total, 2),
                         "images_per_second": round(b.images / total, 1)},
        "cpu_seconds_all_processes": round(cpu, 2),
        "draw_cpu_ms_per_image": {str(k): round(v, 2) for k, v in draw.items()},
        "label_vs_drawn": cov,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
