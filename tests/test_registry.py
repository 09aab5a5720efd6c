"""The stage registry and the command line built from it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

import medvl.registry as registry
from medvl.cli import build_parser, headline_table, main
from medvl.errors import ConfigError, RunError


def test_every_reference_resolves():
    for name, spec in registry.STAGES.items():
        assert spec.name == name
        assert callable(registry.builder(name))
        assert dataclasses.is_dataclass(registry.config_class(name))
        if spec.loader is not None:
            assert callable(registry.loader(name))
        assert set(spec.needs) | set(spec.optional) | set(spec.carries) <= set(registry.STAGES)
        assert name not in spec.sources
    for name, spec in registry.EVALUATIONS.items():
        assert spec.name == name and callable(registry.evaluator(name))
        assert spec.run in registry.STAGES and set(spec.needs) <= set(registry.STAGES)
        assert spec.headline


def test_sources_follow_registry_order():
    # The demo passes --from runs in this order: adamatch, report, autoencoder for diffusion.
    assert registry.stage("diffusion").sources == ("adamatch", "report", "autoencoder")
    assert registry.stage("report").sources == ("adamatch",)
    assert registry.stage("adamatch").sources == ()
    assert registry.stage("distill").sources == ("diffusion",)
    assert registry.holders("adamatch") == ("adamatch", "report", "diffusion", "distill")
    assert registry.evaluation("cyclic").needs == ("report", "diffusion")


def test_unknown_and_missing_entries_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown stage 'segmentation'"):
        registry.stage("segmentation")
    with pytest.raises(ConfigError, match="unknown evaluation 'foo'"):
        registry.evaluation("foo")
    gone = dataclasses.replace(registry.STAGES["report"], builder="medvl.train.stages.report:no_such_builder")
    monkeypatch.setitem(registry.STAGES, "report", gone)
    with pytest.raises(RunError, match="stage 'report' is not available in this version of medvl"):
        registry.builder("report")
    monkeypatch.setitem(
        registry.STAGES, "autoencoder", dataclasses.replace(registry.STAGES["autoencoder"], loader=None)
    )
    with pytest.raises(RunError, match="not used on its own"):
        registry.loader("autoencoder")


def test_a_registered_stage_reaches_the_cli(monkeypatch):
    extra = registry.StageSpec(
        name="segmentation",
        summary="segmentation head: scan -> masks",
        config="tests.train.toy_stage:ToyConfig",
        builder="tests.train.toy_stage:build_stage",
        needs=("adamatch",),
    )
    monkeypatch.setitem(registry.STAGES, "segmentation", extra)
    parser = build_parser()
    args = parser.parse_args(["train", "segmentation", "--config", "c.yaml", "--data", "d", "--out", "o"])
    assert args.stage == "segmentation"
    train = _subparsers(parser)["train"]
    assert "segmentation head: scan -> masks; --from the adamatch run" in " ".join(
        train.format_help().split()
    )


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return found


def test_every_option_has_help_and_a_default_and_every_command_an_example():
    parser = build_parser()
    assert list(_subparsers(parser)) == [
        "demo",
        "prepare",
        "prepare phantom",
        "prepare mimic-cxr",
        "prepare iu-xray",
        "prepare csv",
        "train",
        "evaluate",
        "generate-report",
        "synthesize",
        "label",
        "explain",
        "export",
        "report",
    ]
    for name, sub in _subparsers(parser).items():
        assert sub.description, name
        assert sub.epilog and "example:" in sub.epilog and "medvl " in sub.epilog, name
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest}"
            if action.option_strings and not action.required:
                shown = " ".join(sub._get_formatter()._get_help_string(action).split())
                assert "default" in shown, f"{name} {action.option_strings}"
                assert " ".join((shown % {"default": action.default}).split()) in text, (
                    f"{name} {action.dest}"
                )


def test_choices_come_from_the_registry():
    parser = _subparsers(build_parser())
    stage = next(a for a in parser["train"]._actions if a.dest == "stage")
    kind = next(a for a in parser["evaluate"]._actions if a.dest == "kind")
    assert list(stage.choices) == list(registry.STAGES)
    assert list(kind.choices) == list(registry.EVALUATIONS)


@pytest.mark.parametrize(
    "argv",
    [["--from", "a", "--from", "b"], ["--from", "a", "b"], ["--from", "a", "--from", "b", "--set", "x=1"]],
)
def test_from_keeps_every_run(argv):
    args = build_parser().parse_args(
        ["train", "diffusion", "--config", "demo", "--data", "d", "--out", "o", *argv]
    )
    assert [str(p) for p in args.from_runs] == ["a", "b"]
    assert (
        build_parser()
        .parse_args(["train", "adamatch", "--config", "demo", "--data", "d", "--out", "o"])
        .from_runs
        == []
    )


def test_generate_report_uses_the_runs_beams_by_default():
    args = build_parser().parse_args(["generate-report", "scan.png", "--run", "r"])
    assert args.beams is None


def test_headline_table_lists_present_headline_keys_in_order():
    table = headline_table("report", {"ce.micro.f1": 0.5, "nlg.bleu4": 0.125, "nlg.extra": 1.0, "meta": {}})
    assert table.splitlines() == ["  nlg.bleu4    0.1250", "  ce.micro.f1  0.5000"]
    assert headline_table("cyclic", {}) == ""


def test_cli_reports_a_missing_run_in_one_line(tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "report",
            "--run",
            str(tmp_path / "none"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("medvl: error: ")


def test_a_wrong_run_is_refused_before_the_evaluation_classifier_is_trained(tiny_adamatch_run, tiny_prepared):
    import medvl.api

    cache = Path(tiny_prepared) / "classifiers"
    before = sorted(cache.rglob("*")) if cache.exists() else []
    with pytest.raises(RunError, match="holds no diffusion run"):
        medvl.api.evaluate("diffusion", run=tiny_adamatch_run, data=tiny_prepared)
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before
