#!/usr/bin/env bash
# The whole GPU path in one command (docs/gpu.md): on a bare GPU node, from this repository plus the wheels
# of scripts/gpu-wheels.sh in .whl/, run the CUDA tests, then the 7B-shaped benchmarks, and write every
# figure and log into one folder.
#
#   scripts/gpu-check.sh [OUTDIR]                # on the GPU node (OUTDIR defaults to $OUT, else ./gpu-check-out)
#   scripts/gpu-check.sh --cpu-dry-run [OUTDIR]  # the same steps on a CPU: tiny model, few examples (CI)
#   QCACHE_GPU_STEPS="extract-8 ig-4" scripts/gpu-check.sh   # only these steps (model is reused if saved)
#
# Writes at most 8 files, flat: summary.md/.json (every step: status, seconds, the pytest tally),
# figures.md/.json (benchmarks/gpu_figures.py), pytest.log, figures.log, env.txt. Steps, in order:
# pytest model extract-16 extract-4 ig-16 extract-8 ig-4 writer. Each step runs under its
# own time limit and the whole check stops starting steps after QCACHE_GPU_BUDGET_S seconds (default 470),
# so it ends inside a 10-minute command; a step that fails or runs out of time costs only its own figures.
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
OUTDIR=""
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY=1 ;;
    -h | --help) sed -n 2,15p "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg: use --cpu-dry-run or an output folder" >&2; exit 2 ;;
    *) OUTDIR=$arg ;;
  esac
done
OUTDIR=${OUTDIR:-${OUT:-$REPO/gpu-check-out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${QCACHE_GPU_BUDGET_S:-$([ $DRY = 1 ] && echo 300 || echo 470)}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/qcache-gpu-check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# models and scratch stores; kept after the check, so a second run on the same machine reuses the models
if [ $DRY = 1 ]; then WORK_DEFAULT=$TMP/work; else WORK_DEFAULT=${TMPDIR:-/tmp}/qcache-gpu-work; fi
export QCACHE_GPU_WORK=${QCACHE_GPU_WORK:-$WORK_DEFAULT}
export QCACHE_CACHE=$TMP/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
START=$SECONDS
STEPS=()
FAILED=0
LOG=$OUTDIR/figures.log
: >"$LOG"
rm -f "$OUTDIR/figures.json" "$OUTDIR/figures.md"

# The repository is the package `qcache`: a link named qcache to it makes it importable without pip.
mkdir -p "$TMP/pkg" && ln -s "$REPO" "$TMP/pkg/qcache"
PYPATH=$TMP/pkg:$REPO
if [ $DRY = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TMP/site" .whl/*.whl \
    >>"$LOG" 2>&1; then
    PYPATH=$PYPATH:$TMP/site
  else
    echo "warning: installing .whl/ failed (see figures.log)" >&2
  fi
fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl/smollm2-tokenizer ]; then export QCACHE_GPU_TOKENIZER=$REPO/.whl/smollm2-tokenizer; fi

# step NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, time left); record its status and seconds.
step() {
  local name=$1 cap=$2 left status t0=$SECONDS rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 10 ]; then
    STEPS+=("$name|skipped (out of time)|0")
    FAILED=1
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (limit ${cap}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$cap" "$@" >>"${STEP_LOG:-$LOG}" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status="timed out after ${cap}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ $rc = 0 ] || FAILED=1
  echo "   $status in $((SECONDS - t0))s" | tee -a "$LOG"
  STEPS+=("$name|$status|$((SECONDS - t0))")
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git log -1 --format="commit %H %s" 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for m in ("torch", "transformers", "accelerate", "bitsandbytes", "captum", "zarr", "numcodecs", "dask", "numpy"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:
        print(m, "MISSING", type(exc).__name__)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} >"$OUTDIR/env.txt" 2>&1

FIG=("$PY" -m benchmarks.gpu_figures --out "$OUTDIR")
TESTS=("$PY" -m pytest -q -rs -p no:cacheprovider -m requires_gpu tests/gpu)
: >"$OUTDIR/pytest.log"
if [ $DRY = 1 ]; then
  STEP_LOG=$OUTDIR/pytest.log step pytest-requires-gpu "$BUDGET" "${TESTS[@]}"
  # one process for every figure: the dry run checks the code, not the speed (int8 and IG at 4 bits run
  # the same figure code as 16 bits; the CPU tests cover them)
  step figures "$BUDGET" "${FIG[@]}" --dry-run model extract:16 extract:4 ig:16 writer
else
  # QCACHE_GPU_STEPS picks steps (a second run can fill in what the first ran out of time for)
  want() { [ -z "${QCACHE_GPU_STEPS:-}" ] || [[ " $QCACHE_GPU_STEPS " == *" $1 "* ]]; }
  want pytest && STEP_LOG=$OUTDIR/pytest.log step pytest-requires-gpu 150 "${TESTS[@]}"
  want model && step model 120 "${FIG[@]}" model
  for bits in 16 4; do want "extract-$bits" && step "extract-$bits" 75 "${FIG[@]}" --budget-s 25 "extract:$bits"; done
  want ig-16 && step ig-16 90 "${FIG[@]}" ig:16
  want extract-8 && step extract-8 75 "${FIG[@]}" --budget-s 25 extract:8
  want ig-4 && step ig-4 90 "${FIG[@]}" ig:4
  want writer && step writer 60 "${FIG[@]}" writer
fi

"$PY" - "$OUTDIR" "$((SECONDS - START))" "$DRY" "${STEPS[@]}" <<'PY'
import json, re, sys
from pathlib import Path

out, seconds, dry, rows = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
steps = [{"step": n, "status": st, "seconds": int(sec)} for n, st, sec in (r.split("|") for r in rows)]
log = (out / "pytest.log").read_text() if (out / "pytest.log").exists() else ""
tally = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?) in [\d.]+s", log, re.M)
summary = {"dry_run": dry, "seconds": seconds, "steps": steps, "pytest": tally[-1] if tally else None}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
md = ["# GPU check" + (" (CPU dry run)" if dry else ""), "", "| step | status | seconds |", "|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
md += ["", f"pytest -m requires_gpu: {summary['pytest']}", "", f"Total: {seconds} s.", ""]
md += ["```", (out / "env.txt").read_text().strip(), "```", ""]
(out / "summary.md").write_text("\n".join(md))
print("\n".join(md))
PY
exit $FAILED
