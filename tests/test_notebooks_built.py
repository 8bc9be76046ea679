"""The committed notebooks are what ``notebooks/build.py`` writes.

The cells are edited in build.py; the .ipynb files are its output (stored without outputs, which
``tests/test_notebooks.py`` checks). A notebook edited by hand, or a build.py edited without
rerunning it, fails here with the notebook and cell that differ.
"""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
FIX = "regenerate them: python notebooks/build.py"


def _build_module():
  """notebooks/build.py as a module (it is a script, not part of a package)."""
  pytest.importorskip("nbformat")
  spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cells(nb: dict) -> list[tuple[str, str, str]]:
  def source(cell):  # nbformat stores a source as one string or as a list of lines
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)

  return [(c["cell_type"], c.get("id", ""), source(c)) for c in nb["cells"]]


def test_committed_notebooks_are_what_build_py_writes(tmp_path, capsys):
  build = _build_module()
  build.HERE = tmp_path  # main() writes every notebook into this folder
  build.main()
  capsys.readouterr()  # its "wrote ..." lines

  generated = sorted(p.name for p in tmp_path.glob("*.ipynb"))
  committed = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
  assert generated == committed, f"notebooks/ holds {committed}, build.py writes {generated}"
  assert generated, "build.py wrote no notebook"

  for name in generated:
    new = json.loads((tmp_path / name).read_text())
    old = json.loads((NOTEBOOK_DIR / name).read_text())
    assert old["metadata"] == new["metadata"], f"{name}: metadata differ; {FIX}"
    new_cells, old_cells = _cells(new), _cells(old)
    assert len(old_cells) == len(new_cells), (
      f"{name}: {len(old_cells)} cells committed, build.py makes {len(new_cells)}; {FIX}"
    )
    for i, (o, n) in enumerate(zip(old_cells, new_cells)):
      assert o == n, f"{name} cell {i} ({o[0]}, id {o[1]!r}) differs from build.py's; {FIX}"
    # build.py makes no outputs, so the committed notebooks, which carry none, compare in full.
    for cell in new["cells"]:
      assert cell.get("outputs", []) == [], f"{name}: build.py wrote an output"
