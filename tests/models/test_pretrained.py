"""The one saved-component format: config.json (format, layout, medvl version, config) + model.safetensors;
folders in an older layout and other components are refused in one line; copies replace what was there."""

from __future__ import annotations

import json

import pytest
import torch

from medvl.errors import RunError
from medvl.models.memory import MemoryConfig, SharedMemory
from medvl.models.pretrained import (
    CONFIG_FILE,
    LAYOUT,
    WEIGHTS_FILE,
    component_dir,
    copy_component,
    is_component,
    load_weights,
    read_config,
    save_weights,
    write_config,
)
from medvl.version import __version__


def test_config_and_weights_round_trip(tmp_path):
    path = write_config(tmp_path / "c", "medvl.test", {"width": 3}, words=["a", "b"])
    assert path == tmp_path / "c" / CONFIG_FILE
    data = read_config(tmp_path / "c", "medvl.test")
    assert data == {
        "format": "medvl.test",
        "layout": LAYOUT,
        "medvl_version": __version__,
        "config": {"width": 3},
        "words": ["a", "b"],
    }
    assert is_component(tmp_path / "c") and is_component(tmp_path / "c", "medvl.test")
    assert not is_component(tmp_path / "c", "medvl.other") and not is_component(tmp_path)
    state = {"w": torch.arange(6.0).view(2, 3), "i": torch.tensor([1, 2], dtype=torch.long)}
    assert save_weights(tmp_path / "c", state) == tmp_path / "c" / WEIGHTS_FILE
    back = load_weights(tmp_path / "c")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_wrong_or_missing_components_are_one_line_errors(tmp_path):
    write_config(tmp_path / "c", "medvl.test")
    with pytest.raises(RunError, match=r"holds a medvl.test component, not a medvl.memory"):
        read_config(tmp_path / "c", "medvl.memory")
    with pytest.raises(RunError, match="does not exist"):
        read_config(tmp_path / "missing", "medvl.test")
    with pytest.raises(RunError, match=r"holds no shared memory \(no config.json\); make one"):
        read_config(tmp_path, "medvl.memory", what="shared memory", hint="make one")
    with pytest.raises(RunError, match="model.safetensors is missing"):
        load_weights(tmp_path / "c")
    (tmp_path / "c" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        read_config(tmp_path / "c", "medvl.test")


@pytest.mark.parametrize(
    "old_file",
    [
        "adamatch.json",
        "memory.yaml",
        "latent.json",
        "head.json",
        "report_head.json",
        "classifier.json",
        "keywords.json",
        "scheduler.json",
    ],
)
def test_a_folder_in_the_older_layout_names_the_medvl_that_reads_it(tmp_path, old_file):
    (tmp_path / old_file).write_text("{}")
    with pytest.raises(RunError) as err:
        read_config(tmp_path, "medvl.memory")
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"{tmp_path} was saved by medvl 0.1.x (layout 1); this medvl {__version__} reads layout "
        f"{LAYOUT}: load it with medvl 0.1.x or train it again"
    )


def test_a_newer_layout_names_the_version_that_wrote_it(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({"format": "medvl.memory", "layout": LAYOUT + 1, "medvl_version": "9.9.9"})
    )
    with pytest.raises(
        RunError, match=rf"saved by medvl 9.9.9 \(layout {LAYOUT + 1}\); this medvl {__version__}"
    ):
        read_config(tmp_path, "medvl.memory")


def test_components_load_from_their_folder_or_the_run_holding_it(tmp_path):
    torch.manual_seed(0)
    mem = SharedMemory(MemoryConfig(num_slots=8, dim=8, num_heads=2, topk=2, dropout=0.0))
    run = tmp_path / "run"
    mem.save_pretrained(run / SharedMemory.DIRNAME)
    assert (
        component_dir(run, "memory") == run / "memory"
        and component_dir(run / "memory", "memory") == run / "memory"
    )
    for where in (run, run / "memory"):
        assert torch.equal(SharedMemory.from_pretrained(where).memory, mem.memory)
    # copied into another run: replaces what is there, refuses a folder in the older layout
    other = tmp_path / "other"
    (other / "memory").mkdir(parents=True)
    (other / "memory" / "stale.txt").write_text("x")
    assert copy_component(run, other / "memory") == other / "memory"
    assert sorted(p.name for p in (other / "memory").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert torch.equal(SharedMemory.from_pretrained(other).memory, mem.memory)
    assert (
        copy_component(other / "memory", other / "memory") == other / "memory"
    )  # onto itself: nothing to do
    old = tmp_path / "old" / "memory"
    old.mkdir(parents=True)
    (old / "memory.yaml").write_text("dim: 8\n")
    with pytest.raises(RunError, match="layout 1"):
        copy_component(old.parent, tmp_path / "third" / "memory")
    assert not (tmp_path / "third").exists()
