"""The ``medvl`` command: a thin layer over the Python API.

Every command prints a one-line error and exits with status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medvl.version import __version__


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medvl", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"medvl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="build IU-Phantom, train every stage, evaluate, write metrics.json and report.html")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--preset", choices=["quick", "full"], default="quick")

    pr = sub.add_parser("prepare", help="turn raw data into a prepared dataset")
    psub = pr.add_subparsers(dest="source", required=True, metavar="SOURCE")
    ph = psub.add_parser("phantom", help="build the embedded IU-Phantom dataset and prepare it")
    ph.add_argument("--out", type=Path, required=True)
    ph.add_argument("--studies", type=_positive_int, default=None, help="number of studies (default: all 3,955)")
    ph.add_argument("--size", type=_positive_int, default=256)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--workers", type=_positive_int, default=1)
    mc = psub.add_parser("mimic-cxr", help="MIMIC-CXR (DICOM) or MIMIC-CXR-JPG tree")
    mc.add_argument("--root", type=Path, required=True)
    mc.add_argument("--out", type=Path, required=True)
    mc.add_argument("--size", type=_positive_int, default=256)
    mc.add_argument("--views", type=_views, default=["PA", "AP"])
    mc.add_argument("--sections", choices=["findings", "impression", "both"], default="findings")
    mc.add_argument("--workers", type=_positive_int, default=1)
    mc.add_argument("--jpg-compatible", action="store_true",
                    help="read DICOMs the way MIMIC-CXR-JPG was made (min-max, invert, histogram equalisation)")
    iu = psub.add_parser("iu-xray", help="IU X-ray (Open-i) XML reports and PNG images")
    iu.add_argument("--root", type=Path, required=True)
    iu.add_argument("--out", type=Path, required=True)
    iu.add_argument("--size", type=_positive_int, default=256)
    iu.add_argument("--sections", choices=["findings", "impression", "both"], default="both")
    iu.add_argument("--workers", type=_positive_int, default=1)

    t = sub.add_parser("train", help="train one stage")
    t.add_argument("stage", choices=["adamatch", "report", "autoencoder", "diffusion"])
    t.add_argument("--config", required=True, help="YAML file or preset name (tiny, demo, base)")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--from", dest="from_runs", type=Path, nargs="*", default=[], metavar="RUN")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--resume", action="store_true")

    e = sub.add_parser("evaluate", help="score a run; writes a metrics JSON file")
    e.add_argument("kind", choices=["adamatch", "report", "diffusion", "cyclic"])
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--split", choices=["train", "validate", "test"], default="test")
    e.add_argument("--out", type=Path, required=True)

    g = sub.add_parser("generate-report", help="write a report for each scan")
    g.add_argument("scans", type=Path, nargs="+", metavar="SCAN")
    g.add_argument("--run", type=Path, required=True)
    g.add_argument("--beams", type=_positive_int, default=3)
    g.add_argument("--explain", type=Path, default=None, metavar="OUT.png")
    g.add_argument("--json", action="store_true")

    s = sub.add_parser("synthesize", help="draw a scan from a report")
    s.add_argument("report")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True, help="FILE.png or FILE.dcm")
    s.add_argument("--steps", type=_positive_int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)

    lb = sub.add_parser("label", help="CheXpert's 14 observations for reports, as CSV on standard output")
    lb.add_argument("file", nargs="?", default="-", help="CSV with a 'report' column, or - for one report on stdin")

    x = sub.add_parser("explain", help="draw a scan's adaptive boxes with their matched keywords")
    x.add_argument("scan", type=Path)
    x.add_argument("--run", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--word", default=None, help="also draw the similarity map of this word")
    return p


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "label":
        from medvl.text.labeler import label_command

        return label_command(args.file)
    if args.command == "prepare":
        if args.source == "phantom":
            from medvl.data.phantom import prepare_phantom

            prepare_phantom(args.out, studies=args.studies, size=args.size, seed=args.seed, workers=args.workers)
        elif args.source == "mimic-cxr":
            from medvl.data.mimic import prepare_mimic

            prepare_mimic(args.root, args.out, size=args.size, views=args.views, sections=args.sections,
                          workers=args.workers, jpg_compatible=args.jpg_compatible)
        else:
            from medvl.data.iuxray import prepare_iuxray

            prepare_iuxray(args.root, args.out, size=args.size, sections=args.sections, workers=args.workers)
        return 0
    if args.command == "train":
        from medvl.train.stages import run_stage

        run_stage(args.stage, config=args.config, data=args.data, out=args.out, from_runs=args.from_runs,
                  overrides=args.overrides, resume=args.resume)
        return 0
    if args.command == "evaluate":
        from medvl.eval import evaluate

        evaluate(args.kind, run=args.run, data=args.data, split=args.split, out=args.out)
        return 0
    if args.command == "demo":
        from medvl.demo import run_demo

        run_demo(args.out, preset=args.preset)
        return 0
    if args.command == "generate-report":
        from medvl.api import generate_report_command

        return generate_report_command(args.scans, run=args.run, beams=args.beams, explain=args.explain,
                                       as_json=args.json)
    if args.command == "synthesize":
        from medvl.api import synthesize_command

        return synthesize_command(args.report, run=args.run, out=args.out, steps=args.steps,
                                  guidance=args.guidance, seed=args.seed)
    if args.command == "explain":
        from medvl.api import explain_command

        return explain_command(args.scan, run=args.run, out=args.out, word=args.word)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(_dispatch(args) or 0)
    except KeyboardInterrupt:
        print("medvl: interrupted; finished work is kept and a rerun resumes it", file=sys.stderr)
        code = 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # medvl's own errors are ValueErrors with a message meant for the user.
        print(f"medvl: error: {exc}", file=sys.stderr)
        code = 2
    from medvl.train.distributed import finish_distributed_process

    finish_distributed_process(code)  # under torchrun: exits here, past gloo's teardown, whatever the outcome
    return code


if __name__ == "__main__":
    sys.exit(main())
