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


def test_quick_demo_overrides_come_from_the_shipped_table():
    assert preset_file("demo_quick.yaml").is_file()
    assert preset_overrides("demo_quick", "adamatch")[0] == "train.steps=150"
    assert preset_overrides("demo_quick", "no_such_stage") == []
