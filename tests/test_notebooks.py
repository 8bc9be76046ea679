"""The notebooks in notebooks/ run end to end (small CPU setting) and are stored without outputs.

Regenerate them with ``python notebooks/build.py`` after editing the cells there.
"""

import json
import pathlib
import time

import pytest

from tests.conftest import QUICK_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "lipschitz_bounds.ipynb", "bring_your_own_model.ipynb")


def test_every_notebook_is_stored_with_outputs_cleared():
  stored = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
  assert stored == sorted(NOTEBOOKS)
  for name in NOTEBOOKS:
    nb = json.loads((NOTEBOOK_DIR / name).read_text())
    for i, cell in enumerate(nb["cells"]):
      if cell["cell_type"] == "code":
        assert cell["outputs"] == [], f"{name} cell {i} has stored outputs: clear them"
        assert cell["execution_count"] is None, f"{name} cell {i} has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  # The kernel inherits this environment: the small CPU setting, one CPU device (not the
  # 8 virtual devices of conftest.py).
  monkeypatch.setenv("CRMJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  if name == "lipschitz_bounds.ipynb":  # compile-bound: 112 -> 48 CPU-s (docs/results.md)
    for k, v in QUICK_COMPILE.items():
      monkeypatch.setenv(k, v)
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  client = nbclient.NotebookClient(
    nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
  )
  t0 = time.time()
  client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
  print(f"{name}: executed in {time.time() - t0:.1f} s")
