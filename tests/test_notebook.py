"""notebooks/medusa_jax.ipynb runs top to bottom (nbclient, a fresh kernel) on the tiny random
model, so it cannot rot: streaming, a few training steps, the tree picture and one ablation."""

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDUSA_JAX_NOTEBOOK_CONFIG", "configs/smollm2_medusa1.py:tiny")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "medusa_jax.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "vanilla:" in text and "medusa:" in text and "eval:" in text
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
