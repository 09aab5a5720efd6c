"""What a frozen AdaMatch run's patch features hold: a linear read-out of the 14 CheXpert labels.

The mean and the max of each frontal scan's patch features, standardised on the training split, feed one logistic
regression per label (full batch, AdamW, 300 steps) fitted on the training split; the table gives its ROC AUC on
the validation split for every label with a positive there. A label the read-out separates well is one the report
head has in its inputs.

Run: ``python benchmarks/feature_probe.py --adamatch RUN --data DIR [--out benchmarks/results/feature_probe.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medvl.data.prepared import PreparedDataset
from medvl.eval.bootstrap import binary_auroc
from medvl.models.adamatch import AdaMatchRun
from medvl.text.chexpert import CHEXPERT_LABELS


@torch.no_grad()
def pooled_features(
    run: AdaMatchRun, data: Path, split: str, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    ds = PreparedDataset(data, split)
    keep = [i for i in range(len(ds)) if ds.index.iloc[i]["view"] in ("PA", "AP")]
    feats = []
    for start in range(0, len(keep), batch):
        images = torch.stack([ds[i]["image"] for i in keep[start : start + batch]])
        patches = run.encode_images(images).features.float()
        feats.append(torch.cat([patches.mean(1), patches.amax(1)], -1))
    return torch.cat(feats), (ds.labels[keep] == 1).float()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adamatch", type=Path, required=True, help="an AdaMatch run (or a run holding one)")
    ap.add_argument("--data", type=Path, required=True, help="the prepared dataset it was trained on")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    run = AdaMatchRun.from_pretrained(args.adamatch)
    x_train, y_train = pooled_features(run, args.data, "train")
    x_val, y_val = pooled_features(run, args.data, "validate")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], y_train.shape[1])
    opt = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(linear(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        probs = torch.sigmoid(linear(x_val)).numpy()
    rows = {}
    print("| label | validation positives | read-out AUROC |\n|---|---:|---:|")
    for j, name in enumerate(CHEXPERT_LABELS):
        positives = int(y_val[:, j].sum())
        if positives == 0:
            continue
        auroc = binary_auroc(probs[:, j], y_val[:, j].numpy())
        rows[name] = {"positives": positives, "auroc": auroc}
        print(f"| {name} | {positives} | {auroc:.3f} |")
    result = {
        "adamatch": str(args.adamatch),
        "train_scans": len(x_train),
        "val_scans": len(x_val),
        "labels": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
