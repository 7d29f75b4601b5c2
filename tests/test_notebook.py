"""The Colab notebook runs top to bottom on CPU (the tiny recipe, few steps) and shows what it promises."""

import json

import nbformat
import pytest
from conftest import ROOT, TINY_RECIPE, tiny_overrides
from nbclient import NotebookClient


@pytest.fixture(scope="module")
def executed(tiny_inputs, tmp_path_factory):
    nb = nbformat.read(ROOT / "notebooks" / "qllava_colab.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    overrides = tiny_overrides(tiny_inputs, tmp_path_factory.mktemp("nb") / "run") + [
        "stage1.max_steps=20",
        "stage2.max_steps=40",
        "eval.limit=36",
        "eval.batch_size=36",
    ]
    params.source += (
        f"\nRECIPE = {str(TINY_RECIPE)!r}\nOVERRIDES = {overrides!r}\nQUESTION = 'What color is the shape?'\n"
    )
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def outputs(cell) -> str:
    return "".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in cell.get("outputs", []))


def test_notebook_trains_plots_merges_and_chats(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    assert "device: CPU" in outputs(code[2]) and "tiny_demo.toml" in outputs(code[2])
    plot = next(c for c in code if "plt.show()" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)
    assert "accuracy_stage2" in outputs(plot)
    merge = next(c for c in code if '"merge"' in c.source)
    assert '"max_abs_diff_vs_unmerged"' in outputs(merge)
    chat = next(c for c in code if "Chat(" in c.source)
    assert "Q: What color is the shape?\nA: " in outputs(chat)
