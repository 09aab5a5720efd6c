"""notebooks/quickstart.ipynb: committed with its outputs (pictures a code host shows), and it runs."""

from __future__ import annotations

import base64
import json

import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_committed_notebook_has_its_outputs_and_pictures():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    cells = _code_cells(nb)
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), counts  # every cell run, once, in order
    outputs = [o for c in cells for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    images = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6
    for data in images:
        raw = base64.b64decode(data if isinstance(data, str) else "".join(data))
        assert raw.startswith(PNG) and len(raw) > 2000
    text = json.dumps(outputs)
    assert "/tmp/" not in text and str(REPO) not in text  # no path of the machine it ran on
    source = "".join("".join(c["source"]) for c in cells)
    assert "DICOM_PATH = None" in source and "write_dicom" in source and "read_dicom" in source
    assert "generated:" in text and "my_scan.dcm" in text  # the DICOM cell ran on the demo file


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    """The notebook from a clean folder (a few minutes on 2 cores: slow)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("MEDVL_NOTEBOOK_OUT", str(tmp_path / "out"))
    client = nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    for name in ("report.html", "synthesized.png", "my_scan.dcm", "data/contact_sheet.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
