from __future__ import annotations

import os

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    """The notebook's journey on the quick preset (about 10 minutes on 2 cores: slow)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("MEDVL_NOTEBOOK_OUT", str(tmp_path / "demo_out"))
    client = nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    assert (tmp_path / "demo_out" / "report.html").exists()
    assert (tmp_path / "demo_out" / "synthesized.png").stat().st_size > 0
    assert os.environ["MEDVL_NOTEBOOK_OUT"].endswith("demo_out")
