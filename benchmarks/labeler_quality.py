"""Quality and speed of medvl's report labeler on the 3,955 IU X-ray reports, against NLM's MeSH indexing.

Reference: each Open-i report carries MeSH terms that human indexers at the National Library of Medicine assigned
(``<MeSH><major>``, e.g. ``Cardiomegaly/mild``, ``Pleural Effusion/left``, ``Opacity/lung/base/left``,
``Calcified Granuloma/lung/upper lobe/right``), independently of any CheXpert labeler. Only the ``major`` terms
are used: the ``automatic`` terms come from an automatic indexer run on the same text, so they are not an
independent human reference. Reports indexed "No Indexing" and reports with no FINDINGS / IMPRESSION text are
left out. MeSH headings are mapped to CheXpert observations by :data:`MESH_TO_CHEXPERT` (headings with no
reasonable CheXpert counterpart, such as degenerative spine changes, emphysema or calcinosis, are not mapped).

Convention: a label is "positive" when the labeler says 1 or -1 (present or possibly present; CheXpert's
uncertain mentions are mostly hedged findings the indexers still index), "not positive" when it says 0 or blank.
The strict convention (1 only) is in the JSON too. No Finding's reference is CheXpert's rule applied to the
mapped MeSH terms: no MeSH term mapped to one of the 12 findings (Support Devices does not count).

Laterality: for each positive or uncertain mention with a side whose report has a MeSH term of the same
observation with a side qualifier (left / right / bilateral), the share whose side is among those sides.
Zone agreement is measured the same way (MeSH "base", "lower lobe", "upper lobe", "apex", "middle lobe",
"lingula", "hilum", "retrocardiac"; "base" and "lower" count as agreeing with each other).

Run: ``python benchmarks/labeler_quality.py`` (prints the table, writes benchmarks/results/labeler_quality.json);
``--errors Cardiomegaly`` prints disagreeing reports for one label.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import extract_mentions, label_reports

RESULTS = Path(__file__).resolve().parent / "results" / "labeler_quality.json"

#: MeSH heading -> [(CheXpert observation, qualifiers of which one must be present (none: any),
#: qualifiers that must be absent)]. Entries with two elements have no excluded qualifiers.
MESH_TO_CHEXPERT: dict[str, list[tuple]] = {
    "Cardiomegaly": [("Cardiomegaly", ())],
    "Cardiac Shadow": [("Cardiomegaly", ("enlarged", "prominent", "borderline"))],
    "Mediastinum": [("Enlarged Cardiomediastinum", ("prominent", "enlarged", "widened"))],
    # A "round" opacity or density is a nodule in the indexers' words (labelled Lung Lesion, as CheXpert does
    # for "nodular opacity"); other opacities and densities are Lung Opacity.
    "Opacity": [("Lung Opacity", (), ("round",)), ("Lung Lesion", ("round",))],
    "Infiltrate": [("Lung Opacity", ())],
    "Airspace Disease": [("Lung Opacity", ())],
    "Markings": [("Lung Opacity", ("prominent", "increased", "coarse", "chronic", "interstitial"))],
    "Lung Diseases, Interstitial": [("Lung Opacity", ())],
    "Pulmonary Fibrosis": [("Lung Opacity", ())],
    "Cicatrix": [("Lung Opacity", ("lung",)), ("Pleural Other", ("pleura",))],
    "Density": [("Lung Opacity", ("lung", "retrocardiac"), ("round",)), ("Lung Lesion", ("round",))],
    # CheXpert's Lung Lesion: a nodule or a mass (a calcified nodule is an old granuloma, not a lesion).
    "Nodule": [("Lung Lesion", (), ("calcified",))],
    "Mass": [("Lung Lesion", ("lung", "hilum", "thorax"))],
    "Pulmonary Edema": [("Edema", ())],
    "Pulmonary Congestion": [("Edema", ())],
    "Heart Failure": [("Edema", ())],
    "Consolidation": [("Consolidation", ())],
    "Pneumonia": [("Pneumonia", ())],
    "Pulmonary Atelectasis": [("Atelectasis", ())],
    "Pneumothorax": [("Pneumothorax", ())],
    "Hydropneumothorax": [("Pneumothorax", ()), ("Pleural Effusion", ())],
    "Hemopneumothorax": [("Pneumothorax", ()), ("Pleural Effusion", ())],
    "Pleural Effusion": [("Pleural Effusion", ())],
    "Hemothorax": [("Pleural Effusion", ())],
    "Costophrenic Angle": [("Pleural Effusion", ("blunted",))],
    "Sulcus": [("Pleural Effusion", ("blunted",))],
    "Thickening": [("Pleural Other", ("pleura",))],
    "Fractures, Bone": [("Fracture", ())],
    "Catheters, Indwelling": [("Support Devices", ())],
    "Implanted Medical Device": [("Support Devices", ())],
    "Surgical Instruments": [("Support Devices", ())],
    "Tube, Inserted": [("Support Devices", ())],
    "Medical Device": [("Support Devices", ())],
    "Stents": [("Support Devices", ())],
    "Sutures": [("Support Devices", ())],
    "Breast Implants": [("Support Devices", ())],
}
_SIDES = ("left", "right", "bilateral")
_ZONES = {
    "base": "base",
    "lower lobe": "lower",
    "upper lobe": "upper",
    "apex": "apex",
    "middle lobe": "mid",
    "lingula": "mid",
    "hilum": "perihilar",
    "retrocardiac": "retrocardiac",
}


@dataclass
class Reference:
    positive: set[str]
    sides: dict[str, set[str]]
    zones: dict[str, set[str]]


#: What the labeler's ``iu`` convention adds to Lung Lesion, in MeSH headings.
MESH_IU_EXTENSION: dict[str, list[tuple]] = {
    "Nodule": [("Lung Lesion", ())],
    "Calcified Granuloma": [("Lung Lesion", ())],
    "Granuloma": [("Lung Lesion", ())],
    "Granulomatous Disease": [("Lung Lesion", ())],
}


def mesh_reference(terms: tuple[str, ...], convention: str = "chexpert") -> Reference:
    """CheXpert observations (and their side / zone qualifiers) that a report's major MeSH terms name, with the
    labeler's ``convention`` (``chexpert``: Lung Lesion is a nodule or mass; ``iu``: granulomas too)."""
    table = MESH_TO_CHEXPERT if convention == "chexpert" else {**MESH_TO_CHEXPERT, **MESH_IU_EXTENSION}
    positive: set[str] = set()
    sides: dict[str, set[str]] = {}
    zones: dict[str, set[str]] = {}
    for term in terms:
        heading, *qualifiers = [p.strip() for p in term.split("/")]
        for observation, needed, *rest in table.get(heading, []):
            if needed and not any(q in qualifiers for q in needed):
                continue
            if rest and any(q in qualifiers for q in rest[0]):
                continue
            positive.add(observation)
            for q in qualifiers:
                if q in _SIDES:
                    sides.setdefault(observation, set()).add(q)
                if q in _ZONES:
                    zones.setdefault(observation, set()).add(_ZONES[q])
    findings = positive - {"Support Devices"}
    if not findings:
        positive.add("No Finding")
    return Reference(positive, sides, zones)


def _load_iu() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(uid, findings + impression, major MeSH terms)`` for each IU report."""
    try:
        from medvl.data.reports import iter_iu_reports, report_text
    except ImportError:  # pragma: no cover - before medvl.data.reports existed
        return _load_iu_local()
    return [(r.uid, report_text(r, "both"), r.mesh_major) for r in iter_iu_reports()]


def _load_iu_local() -> list[tuple[str, str, tuple[str, ...]]]:
    import tarfile
    import xml.etree.ElementTree as ET

    import torchxrayvision

    out = []
    with tarfile.open(Path(torchxrayvision.__file__).parent / "data" / "NLMCXR_reports.tgz") as tf:
        for m in tf:
            if not m.name.endswith(".xml"):
                continue
            root = ET.fromstring(tf.extractfile(m).read())
            text = " ".join(
                " ".join(e.itertext()).strip()
                for e in root.iter("AbstractText")
                if e.get("Label") in ("FINDINGS", "IMPRESSION") and "".join(e.itertext()).strip()
            )
            mesh = tuple((e.text or "").strip() for e in root.iter("major"))
            out.append((root.find("uId").get("id"), text, mesh))
    return out


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _prf(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    tp = int((pred & ref).sum())
    fp = int((pred & ~ref).sum())
    fn = int((~pred & ref).sum())
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    f = 2 * p * r / (p + r) if tp else 0.0
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "support": int(ref.sum()),
        "predicted": int(pred.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--errors", default=None, help="print disagreements for this CheXpert label")
    ap.add_argument("--max-errors", type=int, default=30)
    ap.add_argument(
        "--out", type=Path, default=None, help=f"JSON (default {RESULTS.name}, or _iu with --convention iu)"
    )
    ap.add_argument(
        "--convention",
        choices=["chexpert", "iu"],
        default="chexpert",
        help="the labeler's convention and the matching MeSH mapping (default: CheXpert's Lung Lesion = nodule or mass)",
    )
    args = ap.parse_args()
    if args.out is None:
        args.out = RESULTS if args.convention == "chexpert" else RESULTS.with_name("labeler_quality_iu.json")

    t0 = time.perf_counter()
    reports = _load_iu()
    load_s = time.perf_counter() - t0
    texts = [t for _, t, _ in reports]
    t0, c0 = time.perf_counter(), time.process_time()
    labels = label_reports(texts, convention=args.convention)
    label_s, label_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    all_mentions = [extract_mentions(t) for t in texts]
    mentions_s, mentions_cpu = time.perf_counter() - t0, time.process_time() - c0

    keep = [
        i for i, (_, text, mesh) in enumerate(reports) if text.strip() and mesh and "No Indexing" not in mesh
    ]
    refs = {i: mesh_reference(reports[i][2], args.convention) for i in keep}
    names = list(CHEXPERT_LABELS)
    ref_mat = np.array([[n in refs[i].positive for n in names] for i in keep], dtype=bool)
    lab = labels[keep]
    pred_loose = (lab == 1) | (lab == -1)
    pred_strict = lab == 1

    per_label = {}
    for j, name in enumerate(names):
        per_label[name] = {
            "positive_or_uncertain": _prf(pred_loose[:, j], ref_mat[:, j]),
            "positive_only": _prf(pred_strict[:, j], ref_mat[:, j]),
        }
    findings = [j for j, n in enumerate(names) if n != "No Finding"]
    micro = _prf(pred_loose[:, findings].ravel(), ref_mat[:, findings].ravel())
    macro_f1 = float(np.mean([per_label[names[j]]["positive_or_uncertain"]["f1"] for j in findings]))

    # Laterality and zone of positive / uncertain mentions against the MeSH qualifiers of the same observation.
    side_n = side_ok = side_exact = zone_n = zone_ok = 0
    side_confusion: Counter[str] = Counter()
    for i in keep:
        ref = refs[i]
        for m in all_mentions[i]:
            if m.value == 0.0:
                continue
            if m.side is not None and ref.sides.get(m.observation):
                mesh_sides = ref.sides[m.observation]
                side_n += 1
                exact = m.side in mesh_sides
                side_exact += exact
                # "bilateral" agrees with MeSH terms for both sides; one side agrees with a bilateral term
                # (a report that describes the left and the right effusion separately).
                ok = (
                    exact
                    or (m.side == "bilateral" and {"left", "right"} <= mesh_sides)
                    or (m.side in ("left", "right") and "bilateral" in mesh_sides)
                )
                side_ok += ok
                if not ok:
                    side_confusion[f"{m.side} vs {'/'.join(sorted(mesh_sides))}"] += 1
            if m.zone is not None and ref.zones.get(m.observation):
                zone_n += 1
                z = {m.zone} | ({"base", "lower"} if m.zone in ("base", "lower") else set())
                zone_ok += bool(z & ref.zones[m.observation])

    rows = [(n, per_label[n]["positive_or_uncertain"]) for n in names]
    print(
        f"IU X-ray: {len(reports)} reports, {len(keep)} compared with NLM MeSH major terms "
        f"(positive = labeler 1 or -1)"
    )
    print(
        f"{'label':28s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'support':>8s} {'predicted':>9s} "
        f"{'F1 (1 only)':>11s}"
    )
    for n, r in rows:
        strict = per_label[n]["positive_only"]["f1"]
        print(
            f"{n:28s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:8d} {r['predicted']:9d} "
            f"{strict:11.3f}"
        )
    print(
        f"{'micro (13 findings)':28s} {micro['precision']:9.3f} {micro['recall']:7.3f} {micro['f1']:6.3f} "
        f"{micro['support']:8d} {micro['predicted']:9d}"
    )
    print(f"{'macro F1 (13 findings)':28s} {'':9s} {'':7s} {macro_f1:6.3f}")
    side_share = side_ok / side_n if side_n else float("nan")
    zone_share = zone_ok / zone_n if zone_n else float("nan")
    print(
        f"laterality agreement: {side_ok}/{side_n} = {side_share:.3f} (exact side: {side_exact}/{side_n} = "
        f"{side_exact / max(side_n, 1):.3f}); zone agreement: {zone_ok}/{zone_n} = {zone_share:.3f}"
    )
    print(
        f"speed: label_reports {label_s:.2f} s wall ({label_cpu:.2f} s CPU) for {len(texts)} reports, identical "
        f"reports labelled once; extract_mentions on every report {mentions_s:.2f} s wall ({mentions_cpu:.2f} s "
        f"CPU); reading the archive {load_s:.2f} s"
    )

    result = {
        "dataset": "IU X-ray (Open-i, torchxrayvision NLMCXR_reports.tgz), FINDINGS + IMPRESSION",
        "reference": "NLM MeSH major terms mapped to CheXpert observations (see MESH_TO_CHEXPERT)",
        "label_convention": args.convention,
        "convention": "positive = labeler value 1 or -1; not positive = 0 or blank; 'positive_only' counts 1 only",
        "reports": len(reports),
        "compared": len(keep),
        "per_label": per_label,
        "micro_13": micro,
        "macro_f1_13": macro_f1,
        "laterality": {
            "agree": side_ok,
            "compared": side_n,
            "share": side_share,
            "exact_agree": side_exact,
            "exact_share": side_exact / max(side_n, 1),
            "disagreements": dict(side_confusion.most_common()),
        },
        "zone": {"agree": zone_ok, "compared": zone_n, "share": zone_share},
        "speed": {
            "label_reports_s": label_s,
            "label_reports_cpu_s": label_cpu,
            "extract_mentions_all_s": mentions_s,
            "extract_mentions_all_cpu_s": mentions_cpu,
            "reports": len(texts),
            "unique_reports": len(set(texts)),
            "load_average_1min": _loadavg(),
            "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        },
        "mesh_to_chexpert": {k: [[o, *map(list, q)] for o, *q in v] for k, v in MESH_TO_CHEXPERT.items()},
        "mesh_iu_extension": {k: [[o, *map(list, q)] for o, *q in v] for k, v in MESH_IU_EXTENSION.items()}
        if args.convention == "iu"
        else {},
        "command": f"python benchmarks/labeler_quality.py --convention {args.convention}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {args.out}")

    if args.errors:
        j = names.index(args.errors)
        shown = 0
        for row, i in enumerate(keep):
            if pred_loose[row, j] != ref_mat[row, j] and shown < args.max_errors:
                kind = "FP" if pred_loose[row, j] else "FN"
                mesh = "; ".join(reports[i][2])
                print(f"\n[{kind}] {reports[i][0]} labeler={lab[row, j]} mesh: {mesh}\n  {texts[i]}")
                shown += 1


if __name__ == "__main__":
    main()
