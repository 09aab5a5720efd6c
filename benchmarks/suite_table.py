"""The speed table of README and docs/results.md, written from one ``benchmarks/gpu_suite.py`` JSON.

    python benchmarks/suite_table.py benchmarks/results/gpu_suite_h200.json

prints a Markdown table: every figure read from the JSON (nothing typed by hand), the variant and batch that gave
it, and, for a figure its run could not measure, the reason the JSON gives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fastest(row: dict) -> tuple[str, dict] | None:
    """The variant of a training row with the highest images/s."""
    measured = {k: v for k, v in row["variants"].items() if v.get("images_per_s")}
    if not measured:
        return None
    name = max(measured, key=lambda k: measured[k]["images_per_s"])
    return name, measured[name]


def _mfu(value: float | None) -> str:
    return "" if value is None else f", {100 * value:.1f}% MFU"


def _why(result: dict, key: str, row: str) -> str:
    """Why a figure is missing: its row's own note (left out, or the error it raised), else the figure's note."""
    notes = result["notes"]
    return "not measured: " + str(notes.get(row) or notes.get(key) or "no reason recorded")


def training(result: dict, row_name: str, key: str) -> str:
    row = result["rows"].get(row_name)
    best = _fastest(row) if row else None
    if best is None:
        return _why(result, key, row_name)
    name, v = best
    batch = v.get("batch", row["batch"])
    return (
        f"{v['images_per_s']:,.1f} images/s{_mfu(v.get('mfu'))} ({name}, batch {batch}, {row['precision']})"
    )


def sampling(result: dict, batch: int, key: str) -> str:
    row = (result["rows"].get("sampling") or {}).get(f"batch_{batch}")
    if not row or result[key] is None:
        return _why(result, key, "sampling")
    recipe, fast = row["monai_recipe"], row["fastest"]
    graphed = row.get("fastest_graphed") or {}
    text = (
        f"{fast['s_per_image']:.4f} s/image ({fast['sampler']}, {fast['steps']} steps) against the MONAI recipe's "
        f"{recipe['s_per_image']:.4f} ({recipe['sampler'].upper()} {recipe['steps']}, {recipe['precision']}): "
        f"**{result[key]:.1f}x**"
    )
    if graphed.get("s_per_image") and graphed.get("same_latents"):
        text += f"; replayed from CUDA graphs {recipe['s_per_image'] / graphed['s_per_image']:.1f}x"
    return text


def decoding(result: dict) -> str:
    dec = result["rows"].get("decode")
    if not dec or result["decode_reports_per_min"] is None:
        return _why(result, "decode_reports_per_min", "decode")
    return (
        f"{result['decode_reports_per_min']:,.0f} reports/min at batch {dec['best_batch']}; one report in "
        f"{result['decode_one_report_s']:.3f} s (beam {dec['beams']}, {dec['tokens']} tokens)"
    )


def loader(result: dict) -> str:
    row = result["rows"].get("loader")
    if not row or result["loader_images_per_s"] is None:
        return _why(result, "loader_images_per_s", "loader")
    ratio = row.get("loader_over_training")
    over = f", {ratio:.1f}x AdaMatch's training rate" if ratio else ""
    return f"{result['loader_images_per_s']:,.0f} images/s with {row['num_workers']} workers{over}"


def preparing(result: dict) -> str:
    row = result["rows"].get("prepare")
    if not row or result["prepare_images_per_s"] is None:
        return _why(result, "prepare_images_per_s", "prepare")
    res, mem = row["resume"], row["memory"]
    resumed = (
        f"killed at {res['chunks_done_at_kill']} of {res['chunks']} chunks and rerun: {res['decoded_again']} "
        f"decoded, {res['reused']} reused, the same bytes"
        if res["killed"] and res["same_images"] and res["same_index"]
        else "resume not shown (see the JSON's prepare row)"
    )
    return (
        f"{result['prepare_images_per_s']:,.0f} images/s with {row['workers']} workers ({row['jpgs']} JPGs + "
        f"{row['dicoms']} DICOMs of {row['source_shape'][0]} x {row['source_shape'][1]} to {row['size']} px); "
        f"memory peak {mem['peak_mb']:,.0f} MB, {mem['growth_mb']:+.0f} MB from the run's first half to its "
        f"second; {resumed}"
    )


def learning(result: dict) -> str:
    row = result["rows"].get("learn")
    if not row:
        return _why(result, "learn", "learn")
    names = {
        "adamatch": "AdaMatch",
        "report": "report head",
        "autoencoder": "autoencoder",
        "diffusion": "diffusion",
    }
    parts = []
    for stage, name in names.items():
        r = row[stage]
        fell = "fell" if r["learned"] else "did not fall"
        parts.append(
            f"{name} {r['steps']} steps, mean loss {r['loss_first_mean']:.3f} to {r['loss_last_mean']:.3f} ({fell})"
        )
    ada = row["adamatch"]
    return (
        f"{row['seconds_per_stage']:.0f} s per stage on IU-Phantom at {row['phantom']['size']} px: "
        + "; ".join(parts)
        + f"; AdaMatch's validation pointing game {ada['val_pointing_game']:.3f} against its text-only prior's "
        f"{ada['val_pointing_game_prior']:.3f}"
    )


def table(result: dict) -> str:
    b8, b64 = result["batches"]["sampling"]
    lines = [
        f"| one {result['device']}, torch {result['torch']}, `{result['sizes']['preset']}` presets | measured |",
        "|---|---|",
        f"| diffusion head training | {training(result, 'diffusion_train', 'diffusion_train_images_per_s')} |",
        f"| AdaMatch training | {training(result, 'adamatch_train', 'adamatch_train_mfu')} |",
        f"| synthesis, batch {b8} | {sampling(result, b8, 'sampling_speedup_b8')} |",
        f"| synthesis, batch {b64} | {sampling(result, b64, 'sampling_speedup_b64')} |",
        f"| report decoding | {decoding(result)} |",
        f"| training data loader | {loader(result)} |",
        f"| `medvl prepare mimic-cxr` | {preparing(result)} |",
        f"| the presets learn | {learning(result)} |",
    ]
    return "\n".join(lines) + f"\n\n`{result['command']}`\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a gpu_suite.py JSON")
    args = p.parse_args()
    print(table(json.loads(args.result.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
