#!/usr/bin/env bash
# The lowest releases pyproject.toml allows, in a fresh virtual environment, against a fast
# subset of the test suite: checks that the lower version bounds are true.
#
#   bash tools/lowest_versions.sh                       # venv in /tmp/crmjax-lowest
#   bash tools/lowest_versions.sh DIR tests/test_x.py   # another folder, other pytest arguments
#   PINS="jax==0.9.0 flax==0.12.2" bash tools/lowest_versions.sh   # try other releases
#
# Every ">=" bound of [project] dependencies becomes "==" (jaxlib follows jax); PINS replaces
# the pins of the packages it names. The dev tools (pytest, scipy, ...) take whatever release
# pip resolves next to them. Installs crmjax editable from this tree; exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/crmjax-lowest}"
shift || true
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  tests=(
    tests/test_losses.py tests/test_liplt.py tests/test_lanczos.py tests/test_checkpoint.py
    tests/test_nnx.py tests/test_train.py -k "not real_mnist and not main_command"
  )
fi
mapfile -t pins < <(PINS="${PINS:-}" python3 - <<'PY'
import os, re, tomllib
with open("pyproject.toml", "rb") as f:
  deps = tomllib.load(f)["project"]["dependencies"]
pins = {}
for dep in deps:
  m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)", dep.strip())
  if m:
    pins[m.group(1).split("[")[0].lower()] = m.group(2)
if "jax" in pins:
  pins["jaxlib"] = pins["jax"]
for spec in os.environ.get("PINS", "").split():
  name, version = spec.split("==")
  pins[name.lower()] = version
  if name.lower() == "jax":
    pins["jaxlib"] = version
print("\n".join(f"{k}=={v}" for k, v in pins.items()))
PY
)
echo "pins: ${pins[*]}"
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[dev]" "${pins[@]}"
"$venv/bin/python" -m pip list 2>/dev/null |
  grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|chex|numpy|tensorflow-datasets|ml.collections) '
# every module imports (binary compatibility, e.g. matplotlib against numpy), then the tests
"$venv/bin/python" - <<'PY'
import importlib, pkgutil
import crmjax, experiments
for pkg in (crmjax, experiments):
  for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
    importlib.import_module(m.name)
print("every crmjax and experiments module imports")
PY
# -p no:cacheprovider: no .pytest_cache written into the tree
exec "$venv/bin/python" -m pytest -q -p no:xdist -p no:cacheprovider "${tests[@]}"
