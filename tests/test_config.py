from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from medvl.config import config_hash, load_config, to_dict
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
    assert config_hash(cfg) == config_hash(load_config(Outer, p, ["inner.act=gelu", "use_memory=false", "lr=3e-4"]))


@pytest.mark.parametrize(
    "override, key",
    [("inner.dimm=3", "inner.dimm"), ("inner.dim=abc", "inner.dim"), ("use_memory=yes please", "use_memory"),
     ("inner.act=tanh", "inner.act"), ("views=PA", "views")],
)
def test_bad_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Outer, None, [override])


def test_bool_strings_are_not_silently_true():
    # argparse's type=bool trap: "False" must not become True.
    with pytest.raises(ConfigError):
        load_config(Outer, None, ["use_memory='False'"])
