"""A run directory, and sets of them: the one module that reads ``stage.json``.

What ``medvl train`` leaves in ``RUN/`` (written by :func:`medvl.train.loop.fit`)::

    RUN/stage.json             written last, its presence marks a finished run:
                               {"stage", "medvl_version", "from": [runs it was built from], "data": {"path",
                                "meta"}, "best_step", "best_metrics", "select_metric", "steps", "seconds", ...}
    RUN/config.yaml            the resolved config of the stage
    RUN/<component>/           saved components (weights, tokenizer, scheduler, keypatch bank...)
    RUN/eval/<kind>-<split>.json   the last ``medvl evaluate <kind> --split <split>`` of this run
    RUN/checkpoints/ logs/ best/   training state, not needed for inference (left out of copies)

``from`` holds absolute paths in a run trained in place, and paths relative to the run in a
saved pipeline folder (:func:`save_run_set`), so such a folder can move to another machine.
A *run set* maps stage names to run directories: a demo directory (``OUT/runs/<stage>/``),
a pipeline folder (``DIR/<stage>/``) or one run and the runs its ``from`` leads to.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medvl.data.prepared import read_meta
from medvl.errors import DataError, RunError

STAGE_FILE = "stage.json"
CONFIG_FILE = "config.yaml"
EVAL_DIR = "eval"
TRAINING_STATE = ("checkpoints", "logs", "best")  # resume state and TensorBoard logs: not copied


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def is_finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``stage.json`` is written last)."""
    return (Path(run_dir) / STAGE_FILE).is_file()


def read_stage_info(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/stage.json`` of a finished run; :class:`RunError` naming the problem when ``run_dir`` is
    missing, unfinished (no ``stage.json``) or its ``stage.json`` is not a JSON object with a stage."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    path = run_dir / STAGE_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a finished medvl run (no {STAGE_FILE}); train it to the end first")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); the run is damaged: train it again") from None
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(info, dict) or not isinstance(info.get("stage"), str):
        raise RunError(f"{path} names no stage; it was not written by `medvl train`")
    return info


def stage_of(run_dir: str | Path) -> str | None:
    """The stage of the finished run in ``run_dir``, or None when it holds none."""
    return read_stage_info(run_dir)["stage"] if is_finished(run_dir) else None


def source_runs(run_dir: str | Path, info: Mapping[str, Any] | None = None) -> list[Path]:
    """The runs ``run_dir`` was built from (``stage.json``'s ``from``), relative entries resolved
    against ``run_dir``."""
    run_dir = Path(run_dir)
    info = read_stage_info(run_dir) if info is None else info
    return [
        p if p.is_absolute() else Path(os.path.normpath(run_dir / p))
        for p in map(Path, info.get("from") or [])
    ]


def find_runs(path: str | Path) -> dict[str, Path]:
    """Map stage name -> run directory for everything reachable from ``path``: a run (and the runs its
    ``from`` leads to), a demo directory (``runs/<stage>/``) or a pipeline folder (``<stage>/``).
    The first run found for a stage is kept: the folder's own runs, then those their ``from`` names."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} does not exist")
    todo = deque([path])
    if not is_finished(path):
        todo.extend(
            sub
            for folder in (path / "runs", path)
            if folder.is_dir()
            for sub in sorted(folder.iterdir())
            if is_finished(sub)
        )
    found: dict[str, Path] = {}
    seen: set[Path] = set()
    while todo:
        run = todo.popleft()
        if run.resolve() in seen or not is_finished(run):
            continue
        seen.add(run.resolve())
        info = read_stage_info(run)
        found.setdefault(info["stage"], run)
        todo.extend(dep for dep in source_runs(run, info) if dep.exists())
    if not found:
        raise RunError(
            f"{path} holds no medvl run (no {STAGE_FILE}); train one with `medvl train` or `medvl demo`"
        )
    return found


def find_from_run(from_runs: Iterable[str | Path] | None, stage: str) -> Path:
    """The run among ``--from`` runs whose stage is ``stage``; :class:`RunError` if none or several."""
    from_runs = [Path(r) for r in from_runs or []]
    found = [r for r in from_runs if read_stage_info(r)["stage"] == stage]
    if not found:
        given = ", ".join(map(str, from_runs)) or "none"
        raise RunError(f"this stage needs a finished '{stage}' run given with --from (given: {given})")
    if len(found) > 1:
        raise RunError(f"several '{stage}' runs given with --from: {', '.join(map(str, found))}; give one")
    return found[0]


def training_data(run_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of the prepared dataset a finished run was trained on, as its ``stage.json`` records it
    (source, size, ``jpg_compatible``, ``image_files``...); {} when the run records none."""
    try:
        data = read_stage_info(run_dir).get("data")
    except RunError:
        return {}
    meta = data.get("meta") if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) else {}


def trained_jpg_compatible(run_dir: str | Path) -> bool:
    """Whether a run's training data read DICOMs as MIMIC-CXR-JPG was made (``medvl prepare --jpg-compatible``),
    so that inference reads them the same way."""
    return bool(training_data(run_dir).get("jpg_compatible"))


def stages_of(from_runs: Iterable[str | Path] | None) -> list[tuple[str, Path]]:
    """``(stage, run)`` for each ``--from`` run, in the order given; :class:`RunError` for an unfinished one."""
    return [(read_stage_info(r)["stage"], Path(r)) for r in from_runs or []]


def describe_data(data: str | Path, with_path: bool = True) -> dict[str, Any]:
    """What a run records about a prepared dataset (``stage.json``'s ``data``, an evaluation record's):
    its path and its ``meta.json`` (source, size, sections, counts, phantom parameters), less the raw
    tree's location; no ``meta`` when ``data`` is not a finished prepared dataset."""
    record: dict[str, Any] = {"path": str(Path(data).resolve())} if with_path else {}
    try:
        record["meta"] = {k: v for k, v in read_meta(data).meta.items() if k != "root"}
    except DataError:
        pass
    return record


# ---- evaluation records


# Fields of a metrics record that quote the dataset (a training report); they stay in the metrics file the user
# asked for and are left out of the copy kept in the run, which holds no text or pixels of the data.
DATA_TEXT_FIELDS = frozenset({"most_frequent_report"})


def _without_data_text(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_data_text(v) for k, v in value.items() if k not in DATA_TEXT_FIELDS}
    if isinstance(value, list):
        return [_without_data_text(v) for v in value]
    return value


def evaluation_file(run_dir: str | Path, kind: str, split: str) -> Path:
    return Path(run_dir) / EVAL_DIR / f"{kind}-{split}.json"


def record_evaluation(
    run_dir: str | Path,
    kind: str,
    split: str,
    metrics: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Keep a copy of ``medvl evaluate``'s metrics in the run (``RUN/eval/<kind>-<split>.json``), so the run
    (and a pipeline folder made from it) says how it scored. ``data`` describes the prepared dataset. Fields that
    quote the dataset (:data:`DATA_TEXT_FIELDS`) are left out."""
    path = evaluation_file(run_dir, kind, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": kind,
        "split": split,
        "data": dict(data or {}),
        "metrics": _without_data_text(dict(metrics)),
    }
    write_json_atomic(path, record)
    return path


def read_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every evaluation record kept in ``run_dir`` (see :func:`record_evaluation`), by file name."""
    folder = Path(run_dir) / EVAL_DIR
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(
                f"{path} is not a readable evaluation record ({exc}); delete it or rerun medvl evaluate"
            ) from None
        if not isinstance(record, dict):
            raise RunError(
                f"{path} is not an evaluation record (not a JSON object); delete it or rerun medvl evaluate"
            )
        records.append(record)
    return records


# ---- a portable set of runs


def _portable_paths(value: Any, where: Path, saved: Mapping[Path, Path]) -> Any:
    """``value`` (JSON data) with each absolute path made relative to ``where`` when it lies in a saved run,
    and cut to its last part otherwise, so that a record names no folder of the machine it came from."""
    if isinstance(value, dict):
        return {k: _portable_paths(v, where, saved) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable_paths(v, where, saved) for v in value]
    if not (isinstance(value, str) and len(value) > 1 and os.path.isabs(value)):
        return value
    path = Path(value).resolve()
    for source, target in saved.items():
        if path == source or source in path.parents:
            return os.path.relpath(target / path.relative_to(source), where)
    return Path(value).name


def _portable_info(
    info: dict[str, Any], source: Path, target: Path, saved: Mapping[Path, Path]
) -> dict[str, Any]:
    """``stage.json`` of the run copied from ``source`` to ``target``: ``from`` entries that name a saved run
    become paths relative to ``target`` (others are dropped), the dataset's path is left out (its ``meta``
    stays), any other path as in :func:`_portable_paths`."""
    info = dict(info)
    deps = (saved.get(dep.resolve()) for dep in source_runs(source, info))
    info["from"] = [os.path.relpath(dep, target) for dep in deps if dep is not None]
    if isinstance(info.get("data"), dict):
        info["data"] = {k: v for k, v in info["data"].items() if k != "path"}
    return _portable_paths(info, target, saved)


def save_run_set(runs: Mapping[str, str | Path], dest: str | Path) -> dict[str, Path]:
    """Copy each run into ``dest/<stage>/`` (without training state) and rewrite every ``stage.json`` and
    evaluation record inside so the folder names no path of this machine: ``from`` entries become relative
    (``../adamatch``), the dataset's path is left out, other paths keep their last part."""
    dest = Path(dest)
    sources = {stage: Path(run) for stage, run in runs.items()}
    for run in sources.values():
        read_stage_info(run)
        inside = (
            dest.resolve() in (run.resolve(), *run.resolve().parents)
            or run.resolve() in dest.resolve().parents
        )
        if inside:
            raise RunError(
                f"cannot save the run {run} into {dest} (one holds the other); choose another folder"
            )
    dest.mkdir(parents=True, exist_ok=True)
    saved = {run.resolve(): dest / stage for stage, run in sources.items()}
    for stage, run in sources.items():
        target = dest / stage
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(run, target, ignore=shutil.ignore_patterns(*TRAINING_STATE))
        for path in sorted(target.rglob(STAGE_FILE)):
            source = run / path.parent.relative_to(target)
            info = _portable_info(read_stage_info(path.parent), source, path.parent, saved)
            path.write_text(json.dumps(info, indent=2))
        for path in sorted(target.rglob(f"{EVAL_DIR}/*.json")):
            record = _portable_paths(json.loads(path.read_text()), path.parent.parent, saved)
            path.write_text(json.dumps(record, indent=2))
    return {stage: dest / stage for stage in sources}
