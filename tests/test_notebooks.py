"""Every notebook in notebooks/ runs top to bottom on the default model (outputs are not stored)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_stored_without_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    (tmp_path / "outputs").mkdir()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if path.name == "01_quickstart.ipynb":
        assert "BASELINE:" in text and "STEERED :" in text
        assert (tmp_path / "outputs" / "pirate.safetensors").is_file()
        views = [o for o in nb.cells[-1].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert views, "the Workbench cell shows no widget view"
    if path.name == "03_activation_capture.ipynb":
        for name in ("norms_by_layer", "norms_by_message"):
            for suffix, least in (("png", 10_000), ("svg", 5_000), ("html", 1_000_000)):
                assert (tmp_path / "figures" / f"{name}.{suffix}").stat().st_size > least, (name, suffix)
        svg = (tmp_path / "figures" / "norms_by_layer.svg").read_text()
        # baseline and steered lines for each role (system, user, assistant): six drawn traces
        assert svg.count('class="trace scatter') == 6 and "steered · assistant" in svg
        assert (tmp_path / "figures" / "norms_by_message.svg").read_text().count("heatmap") >= 1
    if path.name == "04_features.ipynb":
        assert (tmp_path / "figures" / "pirate_sweep.html").stat().st_size > 1_000_000
        assert "more in the jokes: ['concept/humor'" in text     # contrast finds humour in held-out jokes
        assert "held-out harmonic mean: auto" in text and "BestSteering(layer=" in text
        assert "mean: {'fixed_mean_diff'" in text  # the benchmark's method comparison is shown
    if path.name == "05_scale_out.ipynb":
        assert "steered requests" in text and "tok/s" in text
        assert "vllm backend: 16 steered requests" in text
        assert "replies identical to the hf server's: 16 of 16" in text
