from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from medvl.config import (
    CONFIG_ROOT,
    config_hash,
    load_config,
    preset_file,
    preset_names,
    preset_overrides,
    resolve_config_path,
    to_dict,
)
from medvl.errors import ConfigError


@dataclass
class Inner:
    dim: int = 8
    act: Literal["relu", "gelu"] = "relu"


@dataclass
class Outer:
    lr: float = 1e-3
    use_memory: bool = True
    inner: Inner = field(default_factory=Inner)
    views: list[str] = field(default_factory=lambda: ["PA"])


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.01\ninner:\n  dim: 16\n")
    cfg = load_config(Outer, p, ["inner.act=gelu", "use_memory=false", "lr=3e-4"])
    assert cfg.inner.dim == 16 and cfg.inner.act == "gelu"
    assert cfg.use_memory is False and cfg.lr == pytest.approx(3e-4)
    assert to_dict(cfg)["inner"] == {"dim": 16, "act": "gelu"}
    assert config_hash(cfg) == config_hash(
        load_config(Outer, p, ["inner.act=gelu", "use_memory=false", "lr=3e-4"])
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("inner.dimm=3", "inner.dimm"),
        ("inner.dim=abc", "inner.dim"),
        ("use_memory=yes please", "use_memory"),
        ("inner.act=tanh", "inner.act"),
        ("views=PA", "views"),
    ],
)
def test_bad_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Outer, None, [override])


def test_bool_strings_are_not_silently_true():
    # argparse's type=bool trap: "False" must not become True.
    with pytest.raises(ConfigError):
        load_config(Outer, None, ["use_memory='False'"])


def test_presets_ship_with_the_package():
    import medvl.configs

    assert CONFIG_ROOT.samefile(Path(medvl.configs.__file__).parent)
    for stage in ("adamatch", "report", "autoencoder", "diffusion"):
        assert preset_names(stage) == ["base", "demo", "tiny"]
        assert resolve_config_path(stage, "demo") == CONFIG_ROOT / stage / "demo.yaml"
    with pytest.raises(ConfigError, match="presets: base, demo, tiny"):
        resolve_config_path("report", "huge")
    with pytest.raises(ConfigError, match="no preset file"):
        preset_file("missing.yaml")


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    """'medvl demo --out demo' leaves a folder 'demo' in the working directory: the preset is still read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "huge").mkdir()
    assert resolve_config_path("adamatch", "demo") == CONFIG_ROOT / "adamatch" / "demo.yaml"
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_config_path("adamatch", "huge")
    (tmp_path / "mine.yaml").write_text("train: {steps: 3}\n")
    assert resolve_config_path("adamatch", "mine.yaml") == Path("mine.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config_path("adamatch", "other.yaml")


def test_quick_demo_overrides_come_from_the_shipped_table():
    assert preset_file("demo_quick.yaml").is_file()
    assert preset_overrides("demo_quick", "adamatch")[0] == "train.steps=150"
    assert preset_overrides("demo_quick", "no_such_stage") == []


@pytest.mark.parametrize(
    "stage, override, message",
    [
        ("adamatch", "val_batch_size=0", "'val_batch_size' must be at least 1, got 0"),
        ("adamatch", "keywords.vocab_size=0", "'keywords.vocab_size' must be at least 1, got 0"),
        ("adamatch", "model.text.vocab_size=-5", "'model.text.vocab_size' must be at least 1"),
        ("adamatch", "max_val_images=-1", "'max_val_images' must not be negative"),
        ("report", "data.feature_batch_size=0", "'data.feature_batch_size' must be at least 1"),
        ("diffusion", "data.encode_batch_size=0", "'data.encode_batch_size' must be at least 1"),
        ("autoencoder", "model.image_size=0", "'model.image_size' must be at least 1"),
    ],
)
def test_sizes_and_counts_must_be_positive(stage, override, message):
    from medvl import registry

    with pytest.raises(ConfigError, match=message):
        load_config(registry.config_class(stage), resolve_config_path(stage, "tiny"), [override])
    load_config(registry.config_class(stage), resolve_config_path(stage, "tiny"), ["train.seed=-3"])


def test_zero_that_means_all_is_kept():
    from medvl import registry

    cfg = load_config(registry.config_class("adamatch"), None, ["max_val_images=0", "model.patches.hidden=0"])
    assert cfg.max_val_images == 0


@pytest.mark.parametrize("stage", ["adamatch", "autoencoder"])
def test_image_size_above_the_prepared_data_is_refused_before_training(
    stage, tiny_prepared, tmp_path, capsys
):
    from medvl.cli import main

    out = tmp_path / "run"
    code = main(
        ["train", stage, "--config", "tiny", "--data", str(tiny_prepared), "--out", str(out)]
        + ["--set", "model.image_size=128"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "'model.image_size' is 128" in err and "64 px" in err and "--size 128" in err
    assert not out.exists()
