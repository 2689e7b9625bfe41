#!/usr/bin/env bash
# Runs rendered projects on a CUDA machine: each project's CUDA-marked tests
# (AMP, torchrun with NCCL on every GPU) and a 2-epoch synthetic train with
# AMP, plus, with --full, the project's whole suite. Needs torch with CUDA and
# the projects' dependencies, not Copier: render first, e.g.
#   freeze-scaffold matrix --limit 4 --render-only --out renders
#   bash tests/cuda_renders.sh [--full] [-j N] renders logs
# Writes logs/<project>.log and prints one summary row per project; exits 1
# if any project failed.
set -uo pipefail
full=0 jobs=1
while [ $# -gt 2 ]; do
  case "$1" in
    --full) full=1; shift ;;
    -j) jobs="$2"; shift 2 ;;
    *) echo "usage: $0 [--full] [-j N] RENDERS LOGS" >&2; exit 2 ;;
  esac
done
renders=$(cd "$1" && pwd) logs="$2"
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
python=${PYTHON:-python3}
# Absolute, since each project runs from its own folder.
case "$python" in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac

one() {
  local project=$1 name package status=pass
  name=$(basename "$project")
  package=$(sed -n 's/^package_name: *//p' "$project/.copier-answers.yml")
  local log="$logs/$name.log"
  {
    echo "== $name: pytest -m cuda"
    (cd "$project" && PYTHONPATH=src "$python" -m pytest -m cuda -q -p no:cacheprovider) || status=fail
    echo "== $name: 2-epoch synthetic train, AMP, --device cuda"
    # Offline: a torchvision backbone starts from its random init, not a download.
    local config="$project/runs/offline.toml"
    mkdir -p "$project/runs"
    if grep -q '^pretrained' "$project/src/$package/config.toml"; then
      printf '[model]\npretrained = false\n' >"$config"
    else
      : >"$config"
    fi
    (cd "$project" && CI=true PYTHONPATH=src "$python" -m "$package" --config "$config" train --data synthetic \
      --epochs 2 --out runs/cuda --device cuda --overwrite) || status=fail
    if [ -f "$project/src/$package/plot.py" ]; then  # the plot feature
      (cd "$project" && PYTHONPATH=src "$python" -m "$package" plot runs/cuda) || status=fail
    fi
    if [ "$full" = 1 ]; then
      echo "== $name: whole suite"
      (cd "$project" && PYTHONPATH=src OMP_NUM_THREADS=2 "$python" -m pytest -m "" -q -p no:cacheprovider) || status=fail
    fi
    echo "== $name: $status"
  } >"$log" 2>&1
  printf '%s %s %s\n' "$status" "$name" "$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$log" | grep -E ' in [0-9.]+s' | tr '\n' ';')"
}
export -f one
export logs python full

find "$renders" -mindepth 1 -maxdepth 1 -type d | sort | xargs -P "$jobs" -I{} bash -c 'one "$@"' _ {} | sort -k2 | tee "$logs/summary.txt"
! grep -q '^fail' "$logs/summary.txt"
