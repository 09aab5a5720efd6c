"""The ``medvl`` command: a thin layer over the Python API and the stage registry.

Every command prints a one-line error and exits with status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

import medvl.registry as registry
from medvl.version import __version__


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows each option's default (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or not action.option_strings:
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text  # such an option's help says what leaving it out does
        return f"{text} (default: %(default)s)"


def _views(text: str) -> list[str]:
    views = [v.strip().upper() for v in text.split(",") if v.strip()]
    if not views:
        raise argparse.ArgumentTypeError("--views needs at least one view, e.g. PA,AP")
    return views


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _command(
    sub: Any, name: str, summary: str, description: str, example: str, details: str = ""
) -> argparse.ArgumentParser:
    text = textwrap.fill(description, width=100) + (f"\n\n{details}" if details else "")
    return sub.add_parser(
        name,
        help=summary,
        description=text,
        formatter_class=_HelpFormatter,
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.strip().splitlines()),
    )


def _entry(name: str, text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent=f"  {name:12} ", subsequent_indent=" " * 15)


def _runs(stages: tuple[str, ...]) -> str:
    return f"the {' and '.join(stages)} run{'s' if len(stages) > 1 else ''}"


def _prepared_options(
    parser: argparse.ArgumentParser, root: str | None = None, sections: str | None = None
) -> None:
    """The options every ``medvl prepare SOURCE`` shares (``--root`` and ``--sections`` for raw data)."""
    if root is not None:
        parser.add_argument("--root", type=Path, required=True, help=root)
    parser.add_argument("--out", type=Path, required=True, help="prepared dataset directory to write")
    parser.add_argument("--size", type=_positive_int, default=256, help="image side in pixels")
    if sections is not None:
        parser.add_argument(
            "--sections",
            choices=["findings", "impression", "both"],
            default=sections,
            help="report sections used as the report text",
        )
    parser.add_argument("--workers", type=_positive_int, default=1, help="worker processes")


def _train_epilog() -> str:
    lines = ["stages (train them in this order; --from names the runs a stage builds on):"]
    for spec in registry.STAGES.values():
        takes = f"--from {_runs(spec.needs)}" if spec.needs else "no --from"
        takes += f" (and {_runs(spec.optional)} when its config uses it)" if spec.optional else ""
        lines.append(_entry(spec.name, f"{spec.summary}; {takes}"))
    return "\n".join(lines)


def _evaluate_epilog() -> str:
    lines = ["evaluations (--run names the run of the stage in brackets, or a demo directory):"]
    for spec in registry.EVALUATIONS.values():
        needs = f"; needs {_runs(spec.needs)}, reachable from --run" if spec.needs else ""
        lines.append(_entry(spec.name, f"[{spec.run}] {spec.summary}{needs}"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medvl",
        description="Chest X-ray vision-language: AdaMatch alignment, reports from scans, scans from reports.",
        formatter_class=_HelpFormatter,
        epilog="Run `medvl COMMAND --help` for a command's options and an example.",
    )
    p.add_argument("--version", action="version", version=f"medvl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = _command(
        sub,
        "demo",
        "build IU-Phantom, train every stage, evaluate, write metrics.json and report.html",
        "Build the embedded IU-Phantom dataset, train every stage with the preset, evaluate each and write "
        "OUT/metrics.json and OUT/report.html. Rerunning with the same --out keeps what is finished and "
        "resumes an interrupted stage.",
        "medvl demo --out demo_out --preset quick",
    )
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the IU-Phantom build: 0 is the phantom the presets were tuned on, another seed a held-out "
        "test bed",
    )
    d.add_argument(
        "--preset",
        choices=["quick", "full"],
        default="quick",
        help="quick: short schedules, under 10 minutes on 2 CPU cores; full: the results tables' runs",
    )

    pr = _command(
        sub,
        "prepare",
        "turn raw data into a prepared dataset",
        "Turn raw data into a prepared dataset (index.csv, skipped.csv, an image cache) that "
        "`medvl train --data` takes.",
        "medvl prepare phantom --out data/phantom --studies 400 --size 128",
    )
    psub = pr.add_subparsers(dest="source", required=True, metavar="SOURCE")
    ph = _command(
        psub,
        "phantom",
        "build the embedded IU-Phantom dataset and prepare it",
        "Draw IU-Phantom, medvl's synthetic chest X-ray dataset with reports and finding boxes, "
        "and prepare it.",
        "medvl prepare phantom --out data/phantom --studies 400 --size 128",
    )
    _prepared_options(ph)
    ph.add_argument(
        "--studies", type=_positive_int, default=None, help="number of studies (default: all 3,955)"
    )
    ph.add_argument("--seed", type=int, default=0, help="random seed of the drawing")
    mc = _command(
        psub,
        "mimic-cxr",
        "MIMIC-CXR (DICOM) or MIMIC-CXR-JPG tree",
        "Prepare MIMIC-CXR (DICOM) or MIMIC-CXR-JPG: files/p??/p<subject>/s<study>/ with the "
        "metadata, split and CheXpert tables at the root.",
        "medvl prepare mimic-cxr --root /data/mimic-cxr-jpg --out data/mimic --size 256 --workers 8",
    )
    _prepared_options(mc, root="the raw MIMIC-CXR or MIMIC-CXR-JPG tree", sections="findings")
    mc.add_argument(
        "--views",
        type=_views,
        default=["PA", "AP"],
        help="comma-separated view positions to keep (default: PA,AP)",
    )
    mc.add_argument(
        "--jpg-compatible",
        action="store_true",
        help="read DICOMs the way MIMIC-CXR-JPG was made (min-max, invert, histogram equalisation); "
        "default: off (VOI windowing)",
    )
    iu = _command(
        psub,
        "iu-xray",
        "IU X-ray (Open-i) XML reports and PNG images",
        "Prepare IU X-ray (Open-i): its XML reports and PNG images under one folder.",
        "medvl prepare iu-xray --root /data/iu-xray --out data/iu",
    )
    _prepared_options(iu, root="folder with the XML reports and PNG images", sections="both")
    cs = _command(
        psub,
        "csv",
        "any table of images (DICOM, PNG, JPG) and reports",
        "Prepare any image-report dataset listed in a CSV, one row per image: columns image, report (or "
        "findings and impression), and optionally split (train, validate or val, test), patient_id (splits "
        "are then patient-disjoint; without a split column medvl assigns a seeded patient-disjoint "
        "70/10/20 split), study_id, view and CheXpert's 14 label names (without them medvl's labeler "
        "labels the reports). Rows that cannot be used go to skipped.csv with the reason.",
        "medvl prepare csv --csv exports/cxr.csv --image-root /data/cxr --out data/cxr256\n"
        "medvl prepare csv --csv padchest.csv --image-root /data/padchest --out data/padchest "
        "--columns image=ImageID,report=Report,patient_id=PatientID",
    )
    cs.add_argument("--csv", type=Path, required=True, help="the table, one row per image")
    cs.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder that relative image paths start from (default: the CSV's folder)",
    )
    _prepared_options(cs, sections="both")
    cs.add_argument(
        "--columns",
        default="",
        metavar="KEY=NAME,...",
        help="column names other than the defaults (image, report, findings, impression, split, "
        "patient_id, study_id, view, the 14 CheXpert names), e.g. image=Path,report=Text; KEY= leaves a "
        "column out (default: none)",
    )
    cs.add_argument(
        "--seed", type=int, default=0, help="seed of the split when the table has no split column"
    )
    cs.add_argument(
        "--view",
        type=lambda text: text.strip().upper(),
        default=None,
        help="view of the images whose row and DICOM header give none, e.g. PA for a table of frontal images "
        "(default: blank; the report stage trains on PA and AP images only)",
    )

    t = _command(
        sub,
        "train",
        "train one stage",
        "Train one stage into a self-contained run directory (weights, resolved config, tokenizer, "
        "keywords, keypatch bank...).",
        "medvl train adamatch --config demo --data data/phantom --out runs/adamatch\n"
        "medvl train report --config demo --data data/phantom --out runs/report --from runs/adamatch\n"
        "medvl train diffusion --config demo --data data/phantom --out runs/diffusion "
        "--from runs/adamatch --from runs/report --from runs/autoencoder",
        _train_epilog(),
    )
    t.add_argument("stage", choices=list(registry.STAGES), help="the stage to train (see the list above)")
    t.add_argument("--config", required=True, help="YAML file or preset name (tiny, demo, base)")
    t.add_argument("--data", type=Path, required=True, help="prepared dataset (made by `medvl prepare`)")
    t.add_argument("--out", type=Path, required=True, help="run directory to write")
    t.add_argument(
        "--from",
        dest="from_runs",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        metavar="RUN",
        help="an earlier run this stage builds on; repeat the flag (or list several) for several "
        "(default: none)",
    )
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.steps=100; repeat for several (default: none)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (default: off)",
    )

    e = _command(
        sub,
        "evaluate",
        "score a run; writes a metrics JSON file",
        "Score a run on a split of a prepared dataset, write the metrics to --out, keep a copy in the "
        "run (RUN/eval/<kind>-<split>.json) and print the headline figures.",
        "medvl evaluate report --run runs/report --data data/phantom --out eval/report.json",
        _evaluate_epilog(),
    )
    e.add_argument("kind", choices=list(registry.EVALUATIONS), help="what to evaluate (see the list above)")
    e.add_argument("--run", type=Path, required=True, help="run directory (or a demo directory)")
    e.add_argument("--data", type=Path, required=True, help="prepared dataset")
    e.add_argument("--split", choices=["train", "validate", "test"], default="test", help="split to score")
    e.add_argument("--out", type=Path, required=True, help="metrics JSON file to write")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    for flag, metavar, text in (
        ("--features", "xrv:PATH", "diffusion: also FID and label AUROC on torchxrayvision's DenseNet-121"),
        ("--labeler", "chexbert:CKPT[,bert=DIR]", "report, cyclic: also CE on CheXbert's labels"),
    ):
        e.add_argument(flag, metavar=metavar, help=f"{text}, from local files (default: none)")
    e.add_argument(
        "--grounding",
        action="store_true",
        help="diffusion: also the pointing game of the head's "
        "attention maps on the real scans (grounding.*) (default: off)",
    )

    g = _command(
        sub,
        "generate-report",
        "write a report for each scan (files, folders or a CSV)",
        "Write a report for each scan (DICOM, PNG or JPG) with a report run, with the AdaMatch keywords "
        "given to the decoder as hints. Inputs are scan files, folders (searched recursively for .dcm, .png, "
        ".jpg, .jpeg) or CSV files (one scan path per row). A scan that cannot be read is an error row and the "
        "others go on; the exit status is 2 when any scan could not be read.",
        "medvl generate-report scan1.dcm scan2.png --run runs/report --explain explain.png\n"
        "medvl generate-report /data/cxr --run runs/report --out reports.csv --explain-dir explain --sr sr",
    )
    g.add_argument(
        "scans", type=Path, nargs="+", metavar="INPUT", help="DICOM, PNG or JPG file, folder, or CSV file"
    )
    g.add_argument("--run", type=Path, required=True, help="report run directory")
    g.add_argument("--workers", type=_positive_int, default=1, help="processes reading scans (default: 1)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--beams", type=_positive_int, default=None, help="1 = greedy (default: the run's beams)")
    g.add_argument(
        "--jpg-compatible",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read DICOMs as MIMIC-CXR-JPG was made (default: as the run's training data were read)",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE.csv|FILE.jsonl",
        help="write one row per scan (input, status, error, report, score, keywords, DICOM study/series/SOP "
        "instance UIDs, explanation) to this file instead of printing the reports (default: print)",
    )
    g.add_argument(
        "--explain",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="also draw every scan's keyword boxes into this one PNG (default: none)",
    )
    g.add_argument(
        "--explain-dir", type=Path, metavar="DIR", help="one PNG per scan into DIR (default: none)"
    )
    g.add_argument(
        "--sr",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write one DICOM Basic Text SR per study of the DICOM scans, marked machine-generated and "
        'unverified; needs pip install "medvl[sr]" (default: none)',
    )
    g.add_argument("--image-column", default="image", help="the scan path column of a CSV input")
    g.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder that a CSV input's relative paths start from (default: the CSV's folder)",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON list (report, score, tokens, labels, keywords) (default: text)",
    )

    s = _command(
        sub,
        "synthesize",
        "draw a scan from a report",
        "Draw a chest X-ray from a report with a diffusion run; a .dcm output is marked synthetic.",
        'medvl synthesize "Small left pleural effusion." --run runs/diffusion --out scan.png --seed 1',
    )
    s.add_argument("report", help="the report text")
    s.add_argument("--run", type=Path, required=True, help="diffusion run directory")
    s.add_argument("--out", type=Path, required=True, help="FILE.png or FILE.dcm")
    s.add_argument(
        "--steps", type=_positive_int, default=None, help="sampling steps (default: the run's sampler)"
    )
    s.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the run's sampler)",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed: same seed, same image")
    s.add_argument(
        "--sampler",
        choices=["ddim", "plms", "dpm_solver_2m", "consistency", "fast"],
        default=None,
        help="sampler (default: the run's); fast: a distilled student's few-step sampler (a run made by "
        "`medvl train distill`)",
    )

    lb = _command(
        sub,
        "label",
        "CheXpert's 14 observations for reports, as CSV on standard output",
        "Label reports with CheXpert's 14 observations (1, 0, -1, blank), one CSV row per report in "
        "input order.",
        'medvl label reports.csv > labels.csv\necho "Small left pleural effusion." | medvl label',
    )
    lb.add_argument(
        "file",
        nargs="?",
        default="-",
        help="CSV with a 'report' column, or - for one report on stdin (default: -)",
    )
    lb.add_argument(
        "--convention",
        choices=["chexpert", "iu"],
        default="chexpert",
        help="label definitions: CheXpert's (default), or 'iu', which also counts granulomas and calcified "
        "nodules as Lung Lesion",
    )

    x = _command(
        sub,
        "explain",
        "draw a scan's adaptive boxes with their matched keywords",
        "Draw a scan's adaptive patches with the keywords they match best (an AdaMatch run, or a run "
        "that carries one).",
        "medvl explain scan.png --run runs/adamatch --out explain.png --word effusion",
    )
    x.add_argument("scan", type=Path, help="DICOM, PNG or JPG chest X-ray")
    x.add_argument("--run", type=Path, required=True, help="AdaMatch run (or a report or diffusion run)")
    x.add_argument("--out", type=Path, required=True, help="PNG to write")
    x.add_argument("--word", default=None, help="also draw the similarity map of this word (default: none)")

    ex = _command(
        sub,
        "export",
        "export a report run's networks to ONNX",
        "Write a report run's AdaMatch image encoder (with its adaptive patch layer), its conditioning and its "
        "decoder (full-sequence forward) as ONNX files to --out, each checked against PyTorch with onnxruntime on "
        "the CPU; export.json records the shapes, token ids and differences. Needs the onnx extra.",
        "medvl export onnx --run runs/report --out onnx/",
    )
    ex.add_argument("format", choices=["onnx"], help="the format to write")
    ex.add_argument("--run", type=Path, required=True, help="report run directory")
    ex.add_argument("--out", type=Path, required=True, help="directory to write")

    rp = _command(
        sub,
        "report",
        "an HTML page of trained runs: studies, training curves, figures, metrics",
        "Write one self-contained HTML page for a set of trained runs (any of adamatch, report, autoencoder, "
        "diffusion; a demo directory or a pipeline folder stands for its runs): a few studies of --data with "
        "what each run does with them, training curves from the runs' TensorBoard logs, the pointing game per "
        "finding word and per-label ROC curves from their evaluations, and every evaluation kept in the runs.",
        "medvl report --runs runs/adamatch runs/report runs/diffusion --data data/phantom --out report.html",
    )
    rp.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories (one per stage)")
    rp.add_argument(
        "--data", type=Path, default=None, help="prepared dataset the studies come from (default: no studies)"
    )
    rp.add_argument("--out", type=Path, required=True, help="HTML file to write")
    rp.add_argument("--studies", type=int, default=6, help="number of studies shown (default: 6)")
    rp.add_argument("--title", default="medvl report", help="the page's title")
    return p


def headline_table(kind: str, metrics: dict) -> str:
    """The headline figures of an evaluation (``registry.EVALUATIONS[kind].headline`` present in
    ``metrics``), one aligned line each."""
    rows = registry.evaluation(kind).headline_of(metrics)
    if not rows:
        return ""
    width = max(len(key) for key, _ in rows)
    return "\n".join(
        f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
        for key, value in rows
    )


def _dispatch(args: argparse.Namespace) -> int:
    # Each command imports only what it uses: `medvl --help` and `medvl label` start in a blink.
    if args.command == "label":
        from medvl.text.labeler import label_command

        return label_command(args.file, convention=args.convention)
    if args.command == "prepare":
        if args.source == "phantom":
            from medvl.data.phantom import prepare_phantom

            prepare_phantom(
                args.out, studies=args.studies, size=args.size, seed=args.seed, workers=args.workers
            )
        elif args.source == "mimic-cxr":
            from medvl.data.mimic import prepare_mimic

            prepare_mimic(
                args.root,
                args.out,
                size=args.size,
                views=args.views,
                sections=args.sections,
                workers=args.workers,
                jpg_compatible=args.jpg_compatible,
            )
        elif args.source == "csv":
            from medvl.data.csvdata import parse_columns, prepare_csv

            prepare_csv(
                args.csv,
                args.out,
                image_root=args.image_root,
                columns=parse_columns(args.columns),
                size=args.size,
                sections=args.sections,
                workers=args.workers,
                seed=args.seed,
                view=args.view,
            )
        else:
            from medvl.data.iuxray import prepare_iuxray

            prepare_iuxray(args.root, args.out, size=args.size, sections=args.sections, workers=args.workers)
        return 0
    if args.command == "train":
        from medvl.train.stages import run_stage

        run_stage(
            args.stage,
            config=args.config,
            data=args.data,
            out=args.out,
            from_runs=args.from_runs,
            overrides=args.overrides,
            resume=args.resume,
        )
        return 0
    if args.command == "evaluate":
        from medvl.api import evaluate

        if args.grounding and args.kind != "diffusion":
            raise ValueError("--grounding scores a diffusion run: use it with `medvl evaluate diffusion`")
        options = {k: v for k in ("features", "labeler", "grounding", "device") if (v := getattr(args, k))}
        metrics = evaluate(args.kind, run=args.run, data=args.data, split=args.split, out=args.out, **options)
        meta = metrics.get("meta") or {}
        print(
            f"medvl evaluate {args.kind} ({args.split}, {meta.get('num_samples', '?')} samples): {args.out}"
        )
        table = headline_table(args.kind, metrics)
        if table:
            print(table)
        return 0
    if args.command == "demo":
        from medvl.demo import run_demo

        run_demo(args.out, preset=args.preset, seed=args.seed)
        return 0
    if args.command == "generate-report":
        from medvl.api import generate_report_command

        keys = "run beams explain explain_dir out sr image_column image_root workers jpg_compatible device".split()
        return generate_report_command(args.scans, as_json=args.json, **{k: getattr(args, k) for k in keys})
    if args.command == "synthesize":
        from medvl.api import synthesize_command

        keys = ("run", "out", "steps", "guidance", "seed", "sampler")
        return synthesize_command(args.report, **{k: getattr(args, k) for k in keys})
    if args.command == "export":
        from medvl.export.onnx import export_command

        return export_command(args.run, args.out)
    if args.command == "explain":
        from medvl.api import explain_command

        return explain_command(args.scan, run=args.run, out=args.out, word=args.word)
    if args.command == "report":
        from medvl.report.html import write_run_report

        path = write_run_report(args.runs, args.data, args.out, title=args.title, num_studies=args.studies)
        print(f"medvl report: {path}")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(_dispatch(args) or 0)
    except KeyboardInterrupt:
        print("medvl: interrupted; finished work is kept and a rerun resumes it", file=sys.stderr)
        code = 130
    except (ValueError, OSError) as exc:
        # medvl's own errors are ValueErrors with a message meant for the user; an OSError (a missing, unreadable
        # or unwritable file, a full disk) names its file
        os_error = isinstance(exc, OSError) and exc.strerror and exc.filename
        print(f"medvl: error: {f'{exc.strerror}: {exc.filename}' if os_error else exc}", file=sys.stderr)
        code = 2
    if "torch.distributed" in sys.modules:  # only a command that imported torch can hold a process group
        from medvl.train.distributed import finish_distributed_process

        finish_distributed_process(
            code
        )  # under torchrun: exits here, past gloo's teardown, whatever the outcome
    return code


if __name__ == "__main__":
    sys.exit(main())
