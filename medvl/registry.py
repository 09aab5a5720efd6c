"""Every stage and every evaluation of medvl, in one place.

The command line (``medvl train`` / ``medvl evaluate`` choices and help), the demo (which stages
run, in which order, from which runs), the Python API (which run loads which part) and
:func:`medvl.eval.evaluate` all read these two tables. Code is named as ``"module:attribute"``
strings and imported only when used (:func:`resolve`), so reading the registry is cheap and
importing it imports neither training nor evaluation code.

Adding a head (say, segmentation) is one :class:`StageSpec` entry (and an :class:`EvaluationSpec`
for its evaluation) plus its own files: the model (``medvl/models/``), the training stage
(``medvl/train/stages/``), the evaluation (``medvl/eval/``) and its presets
(``configs/<stage>/{tiny,demo,base}.yaml``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medvl.errors import ConfigError, RunError


@dataclass(frozen=True)
class StageSpec:
    """A stage ``medvl train NAME`` trains.

    ``builder`` is ``build_stage(*, config_path, overrides, data, from_runs) -> Stage`` for the shared
    training loop; ``loader`` loads a finished run for inference, ``(run_dir, device=...) -> object``
    (None for a stage used only to train others). ``needs`` are the stages whose runs must be given with
    ``--from``, ``optional`` those used when given; ``carries`` the stages whose parts the run keeps a copy
    of, so it works alone; ``usage`` a line of Python showing it at work (model cards). Stages are listed
    in the order the demo trains them.
    """

    name: str
    summary: str
    config: str
    builder: str
    loader: str | None = None
    needs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    carries: tuple[str, ...] = ()
    usage: str = ""

    @property
    def sources(self) -> tuple[str, ...]:
        """Every stage whose run this stage takes with ``--from``, in registry order."""
        wanted = set(self.needs) | set(self.optional)
        return tuple(name for name in STAGES if name in wanted)


@dataclass(frozen=True)
class EvaluationSpec:
    """An evaluation ``medvl evaluate NAME --run RUN`` runs.

    ``evaluator`` is ``fn(*, run, data, split, out, **options) -> metrics dict`` (it writes ``out``);
    ``run`` is the stage of the run ``--run`` names (its evaluation record is kept in that run);
    ``needs`` the stages whose runs must be reachable from ``--run``; ``headline`` the metric keys
    (docs/design.md section 4) printed at the end of ``medvl evaluate``; ``uses_classifier`` whether it
    scores scans with the evaluation X-ray classifier (it then takes ``classifier``: a trained one's
    directory or the loaded model, :func:`medvl.train.classifier.evaluation_classifier`).
    """

    name: str
    summary: str
    evaluator: str
    run: str
    needs: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()
    uses_classifier: bool = False

    def headline_of(self, metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """``(key, value)`` of the headline metrics present in ``metrics``, in ``headline`` order."""
        return [(key, metrics[key]) for key in self.headline if key in metrics]


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="adamatch",
            summary="AdaMatch: adaptive patch-word alignment of scans and reports (keywords, keypatch bank)",
            config="medvl.train.stages.adamatch:AdaMatchStageConfig",
            builder="medvl.train.stages.adamatch:build_stage",
            loader="medvl.models.adamatch:AdaMatchRun.from_pretrained",
            usage='match = pipe.match("scan.png", "Small left pleural effusion.")   # each word\'s best box',
        ),
        StageSpec(
            name="report",
            summary="report head: scan -> report, a decoder over AdaMatch patches, shared memory and keywords",
            config="medvl.train.stages.report:ReportStageConfig",
            builder="medvl.train.stages.report:build_stage",
            loader="medvl.inference.generate:ReportGenerator.load",
            needs=("adamatch",),
            carries=("adamatch",),
            usage='report = pipe.generate_report("scan.dcm")   # text, tokens, keywords with boxes',
        ),
        StageSpec(
            name="autoencoder",
            summary="the diffusion head's autoencoder: scans <-> latents",
            config="medvl.train.stages.autoencoder:AutoencoderStageConfig",
            builder="medvl.train.stages.autoencoder:build_autoencoder_stage",
            loader="medvl.models.diffusion:AutoencoderBundle.from_pretrained",
        ),
        StageSpec(
            name="diffusion",
            summary="diffusion head: report -> scan, a latent UNet conditioned on report words, memory and keypatches",
            config="medvl.train.stages.diffusion:DiffusionStageConfig",
            builder="medvl.train.stages.diffusion:build_diffusion_stage",
            loader="medvl.inference.synthesize:Synthesizer.load",
            needs=("autoencoder", "adamatch"),
            optional=("report",),
            carries=("adamatch", "autoencoder"),
            usage='scan = pipe.synthesize("Small left pleural effusion.", seed=0)   # images, keypatches',
        ),
        StageSpec(
            name="distill",
            summary="a few-step student of a diffusion run: the same scans in a few network passes, guidance "
            "built in",
            config="medvl.train.stages.distill:DistillStageConfig",
            builder="medvl.train.stages.distill:build_distill_stage",
            loader="medvl.inference.synthesize:Synthesizer.load",
            needs=("diffusion",),
            carries=("adamatch", "autoencoder"),
            usage='fast = pipe.synthesize("Small left pleural effusion.", sampler="fast")   # the student, 4 passes',
        ),
    )
}

EVALUATIONS: dict[str, EvaluationSpec] = {
    spec.name: spec
    for spec in (
        EvaluationSpec(
            name="adamatch",
            summary="retrieval recall and localization (pointing game, box IoU) of an AdaMatch run",
            evaluator="medvl.eval.alignment:evaluate_adamatch",
            run="adamatch",
            headline=(
                "retrieval.i2t_r1",
                "retrieval.i2t_r5",
                "retrieval.t2i_r1",
                "retrieval.t2i_r5",
                "localization.pointing_game",
                "localization.pointing_game_chance",
                "localization.box_iou",
            ),
        ),
        EvaluationSpec(
            name="report",
            summary="generated reports: BLEU, METEOR, ROUGE-L, CIDEr and CheXpert clinical efficacy",
            evaluator="medvl.eval.report:evaluate_report",
            run="report",
            headline=(
                "nlg.bleu1",
                "nlg.bleu4",
                "nlg.meteor",
                "nlg.rouge_l",
                "nlg.cider",
                "ce.micro.precision",
                "ce.micro.recall",
                "ce.micro.f1",
                "ce.macro.f1",
                "ce.micro5.f1",
                "baselines.classifier_template.ce.micro.f1",
                "baselines.classifier_template.ce.micro5.f1",
            ),
            uses_classifier=True,
        ),
        EvaluationSpec(
            name="diffusion",
            summary="synthesized scans: FID, MS-SSIM diversity, label AUROC, laterality",
            evaluator="medvl.eval.image:evaluate_diffusion",
            run="diffusion",
            headline=(
                "image.fid",
                "image.fid_features",
                "image.ms_ssim_diversity",
                "image.label_auroc",
                "image.real_label_auroc",
                "image.laterality_accuracy",
            ),
            uses_classifier=True,
        ),
        EvaluationSpec(
            name="cyclic",
            summary="both cycles, scan -> report -> scan and report -> scan -> report",
            evaluator="medvl.eval.cyclic:evaluate_cyclic",
            run="diffusion",
            needs=("report", "diffusion"),
            headline=("cyclic.report_image_report.ce_f1", "cyclic.image_report_image.label_auroc"),
            uses_classifier=True,
        ),
    )
}


def stage(name: str) -> StageSpec:
    """The registered stage ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    return STAGES[name]


def evaluation(name: str) -> EvaluationSpec:
    """The registered evaluation ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in EVALUATIONS:
        raise ConfigError(f"unknown evaluation '{name}' (evaluations: {', '.join(EVALUATIONS)})")
    return EVALUATIONS[name]


def resolve(ref: str, what: str) -> Any:
    """Import ``"module:attribute[.attribute]"``; :class:`RunError` saying ``what`` is not available in
    this version of medvl when the module or attribute does not exist."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise RunError(
                f"{what} is not available in this version of medvl (module {module_name} is missing)"
            ) from None
        raise  # a dependency of that module is missing: a real error, keep its message
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise RunError(f"{what} is not available in this version of medvl ({module_name} has no {attr})")
    return obj


def _callable(ref: str, what: str) -> Callable[..., Any]:
    obj = resolve(ref, what)
    if not callable(obj):
        raise RunError(f"{what} is not available in this version of medvl ({ref} is not callable)")
    return obj


def builder(name: str) -> Callable[..., Any]:
    """``build_stage`` of stage ``name``."""
    return _callable(stage(name).builder, f"stage '{name}'")


def config_class(name: str) -> type:
    """The typed config class of stage ``name``."""
    return _callable(stage(name).config, f"the config of stage '{name}'")


def loader(name: str) -> Callable[..., Any]:
    """What loads a finished run of stage ``name`` for inference; :class:`RunError` if it has none."""
    spec = stage(name)
    if spec.loader is None:
        raise RunError(f"a '{name}' run is not used on its own; load a run built from it")
    return _callable(spec.loader, f"inference with stage '{name}'")


def evaluator(name: str) -> Callable[..., dict]:
    """The evaluation function of evaluation ``name``."""
    return _callable(evaluation(name).evaluator, f"evaluation '{name}'")


def holders(name: str) -> tuple[str, ...]:
    """Stages whose runs hold stage ``name``'s parts: ``name`` itself, then those carrying a copy."""
    return (name, *(s for s, spec in STAGES.items() if name in spec.carries))
