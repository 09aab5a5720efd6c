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

* with ``--learnability EPOCHS``: whether a small CNN learns the drawn findings. A 4-layer CNN (16-64 channels,
  0.06 M parameters) is trained on the train split for EPOCHS epochs (AdamW 2e-3, batch 64, class-weighted BCE over
  10 observations; label 1 = positive, everything else 0) and scored by AUROC on the test split.

Run: ``python benchmarks/phantom_build.py [--studies N] [--size 256] [--workers 2] [--learnability 8]``; prints
tables and writes ``benchmarks/results/phantom_build.json`` (one entry per ``--size``). Wall times depend on other
load on the machine (the load average before and after is recorded); CPU times much less so.
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

    from medvl.data.phantom import labelled_text, load_iu_reports, plan_findings
    from medvl.data.phantom.anatomy import lesion_diameters, load_lung_atlas
    from medvl.data.phantom.draw import render_frontal
    from medvl.text.labeler import extract_mentions

    atlas, lesions = load_lung_atlas(), lesion_diameters()
    reports = load_iu_reports()[:n]
    specs = [
        plan_findings(extract_mentions(labelled_text(r)), np.random.default_rng(i))
        for i, r in enumerate(reports)
    ]
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
        table[name] = {
            "labelled_positive": len(pos),
            "with_drawn_region": len(pos & got),
            "drawn_without_label": len(got - pos),
        }
    normal = index[index["No Finding"] == 1]
    lesions = regions[regions["finding"] != "device"]  # No Finding allows support devices
    table["No Finding"] = {
        "labelled_positive": len(normal),
        "with_drawn_region": int(np.isin(normal["dicom_id"], lesions["dicom_id"]).sum()),
        "drawn_without_label": 0,
    }
    return table


LEARN_LABELS = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Lung Lesion",
    "Lung Opacity",
    "Atelectasis",
    "Edema",
    "Support Devices",
    "Fracture",
    "Pneumothorax",
    "Enlarged Cardiomediastinum",
)


def _auroc(y, p) -> float:
    import numpy as np

    y = np.asarray(y).astype(bool)
    ranks = np.argsort(np.argsort(p)) + 1
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def learnability(out: Path, epochs: int) -> dict:
    """Test AUROC per observation of a small CNN trained on the train split (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from medvl.data.prepared import PreparedDataset

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    def load(split):
        ds = PreparedDataset(out, split)
        x = np.stack([np.asarray(ds.images[int(r)]) for r in ds.index["row"]]).astype(np.float32) / 255.0
        y = np.nan_to_num(ds.index[list(LEARN_LABELS)].to_numpy(np.float32)) == 1
        return torch.from_numpy(x[:, None]), torch.from_numpy(y.astype(np.float32))

    xtr, ytr = load("train")
    xte, yte = load("test")

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    net = nn.Sequential(
        *block(1, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(LEARN_LABELS)),
    )
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    pos = ytr.mean(0).clamp(min=0.01)
    weight = ((1 - pos) / pos).clamp(max=30)
    t = time.perf_counter()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            b = perm[i : i + 64]
            loss = F.binary_cross_entropy_with_logits(net(xtr[b]), ytr[b], pos_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        p = torch.cat([net(xte[i : i + 256]) for i in range(0, len(xte), 256)]).sigmoid().numpy()
    y = yte.numpy()
    return {
        "epochs": epochs,
        "train_images": len(xtr),
        "test_images": len(xte),
        "seconds": round(time.perf_counter() - t, 1),
        "parameters": sum(p_.numel() for p_ in net.parameters()),
        "test_auroc": {
            n: round(_auroc(y[:, j], p[:, j]), 3)
            for j, n in enumerate(LEARN_LABELS)
            if 0 < y[:, j].sum() < len(y)
        },
        "train_positives": {n: int(ytr[:, j].sum()) for j, n in enumerate(LEARN_LABELS)},
        "test_positives": {n: int(y[:, j].sum()) for j, n in enumerate(LEARN_LABELS)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=None, help="default: all 3,927")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--draw-images", type=int, default=60, help="images per size for the CPU-time table")
    ap.add_argument(
        "--keep", type=Path, default=None, help="build here and keep it (default: a temporary folder)"
    )
    ap.add_argument(
        "--learnability",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also train a small CNN on the build for EPOCHS epochs and report test AUROC",
    )
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
    stages = {
        **{k: round(v, 2) for k, v in result.build.seconds.items()},
        "ingestion (prepare_mimic)": round(result.prepared.seconds, 2),
    }
    stages["rest"] = round(total - sum(stages.values()), 2)
    b = result.build
    cov = coverage(out)
    draw = draw_cpu_ms((128, 256, 512), args.draw_images)
    learn = learnability(out, args.learnability) if args.learnability else None
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nIU-Phantom build: {b.studies} studies, {b.images} images ({b.laterals} lateral, {b.dicoms} DICOM), "
        f"{b.regions} drawn findings, {args.size} px, {args.workers} workers, {os.cpu_count()} CPUs"
    )
    print(f"{'stage':<28}{'wall s':>9}")
    for k, v in stages.items():
        print(f"{k:<28}{v:>9.2f}")
    print(
        f"{'total':<28}{total:>9.2f}   ({b.images / total:.0f} images/s end to end; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)"
    )
    print(
        f"{'CPU seconds, all processes':<28}{cpu:>9.2f}   (on {args.workers} idle cores the wall time would be "
        f"about {cpu / args.workers:.0f} s or more)"
    )
    print(f"\n{'drawing one frontal image':<28}{'CPU ms':>9}")
    for size, ms in draw.items():
        print(f"{f'{size} px':<28}{ms:>9.1f}")
    print(f"\n{'observation':<28}{'label=1':>9}{'drawn':>9}{'unlabelled':>11}")
    for name, row in cov.items():
        print(
            f"{name:<28}{row['labelled_positive']:>9}{row['with_drawn_region']:>9}{row['drawn_without_label']:>11}"
        )
    print(
        "(No Finding row: normal studies, and how many of them have a drawn region other than a device: must be 0)"
    )
    print(f"\ndrawn regions by finding: {b.drawn}")
    if learn:
        print(f"\nsmall CNN at {args.size} px, {learn['epochs']} epochs ({learn['seconds']} s), test AUROC:")
        for name, auc in learn["test_auroc"].items():
            print(
                f"{name:<28}{auc:>9.3f}   ({learn['train_positives'][name]} train / "
                f"{learn['test_positives'][name]} test positives)"
            )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = previous.get("runs", {}) if isinstance(previous.get("runs"), dict) else {}
    runs[f"{args.size}px"] = {
        "command": "python benchmarks/phantom_build.py"
        + (f" --studies {args.studies}" if args.studies else "")
        + f" --size {args.size} --workers {args.workers}"
        + (f" --learnability {args.learnability}" if args.learnability else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "build": {
            "studies": b.studies,
            "subjects": b.subjects,
            "images": b.images,
            "laterals": b.laterals,
            "dicoms": b.dicoms,
            "regions": b.regions,
            "abnormal_studies": b.abnormal_studies,
            "drawn": b.drawn,
            "kept_by_ingestion": result.prepared.kept,
            "skipped_by_ingestion": result.prepared.skipped_by_reason,
        },
        "wall_seconds": {
            "stages": stages,
            "total": round(total, 2),
            "images_per_second": round(b.images / total, 1),
        },
        "cpu_seconds_all_processes": round(cpu, 2),
        "draw_cpu_ms_per_image": {str(k): round(v, 2) for k, v in draw.items()},
        "label_vs_drawn": cov,
        "learnability": learn,
    }
    RESULTS.write_text(json.dumps({"runs": runs}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
