#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with an NVIDIA GPU and a python with torch (the
# project's .venv when there is one, else the machine's own python3; no package registry needed),
# in one command that fits a 10-minute slot:
#
#   1. build the CUDA extension from source (setup.py build_ext --inplace)
#   2. the full pytest suite, GPU tests included
#   3. compute-sanitizer memcheck and racecheck (SANITIZERS=... adds initcheck, synccheck) over
#      bench/sanitize_ops.py (every op, every backend)
#   4. ceilings (copy GB/s, bf16 matmul TFLOP/s) and the decode / prefill / append / generate benchmarks
#   5. bench/results/<YYYY-MM-DD>-<gpu-slug>.json + .md + PNGs, and a short summary printed last
#
# Each phase has a time cap and the whole script a budget (default 480 s); a phase that would not
# fit is skipped and says so. Options:
#   --budget SECONDS   total budget (default 480)
#   --skip-build --skip-tests --skip-sanitizer --skip-bench --skip-generate
#   --slow             pytest --run-slow (larger grids)
#   --quick            smaller benchmark grids
#   --out-dir DIR      where results go (default bench/results)
#   --copy-to DIR      also copy the results files and the log there
# Environment: PYTHON (default python3; `make gpu-check` passes .venv/bin/python when it exists), CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST
# (default: this GPU's architecture), KVKERNELS_COMMIT (when the tree has no .git).
# Wheels in .whl/ (e.g. a FlashInfer peer) are installed into a private folder first.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=480
SKIP_BUILD=0; SKIP_TESTS=0; SKIP_SAN=0; SKIP_BENCH=0; SKIP_GEN=0; SLOW=0; QUICK=0
OUT_DIR=bench/results
COPY_TO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-sanitizer) SKIP_SAN=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --skip-generate) SKIP_GEN=1 ;;
    --slow) SLOW=1 ;;
    --quick) QUICK=1 ;;
    --out-dir) OUT_DIR=$2; shift ;;
    --copy-to) COPY_TO=$2; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

START=$SECONDS
WORK=$(mktemp -d /tmp/kvk-gpu-check.XXXXXX)
CHECKS=$WORK/checks.tsv
: > "$CHECKS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(( SECONDS - START )); }
remaining() { echo $(( BUDGET - (SECONDS - START) )); }
# cap WANT RESERVE -> seconds this phase may take: WANT, or less so that RESERVE seconds stay for
# the phases after it; 0 when less than 15 s would be left.
cap() {
  local left=$(( $(remaining) - $2 ))
  if [ "$left" -lt 15 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# record NAME STATUS SECONDS DETAIL
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$CHECKS"; }
banner() { echo; echo "=== [$(elapsed)s / ${BUDGET}s] $*"; }

# ------------------------------------------------------------------------------------ machine
banner "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo "nvidia-smi: unavailable"
PY_PATH=$(command -v "$PY" 2>/dev/null || echo "$PY")
if ! PY_DESC=$($PY -c "import sys, torch; print(f'Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})')" 2>&1); then
  echo "gpu_check: $PY_PATH cannot import torch:" >&2
  echo "$PY_DESC" | tail -n 3 >&2
  echo "gpu_check: run \`make install\` for the project's .venv, or point PYTHON=... at a python with torch" >&2
  exit 2
fi
echo "python: $PY_PATH ($PY_DESC)"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: $PY_PATH's torch ($PY_DESC) sees no CUDA device; this script is for a GPU machine" >&2
  exit 2
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site" && echo "installed wheels from .whl/ into $WORK/site"
fi
$PY - <<'EOF'
import torch, platform
p = torch.cuda.get_device_properties(0)
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
try:
    import flashinfer; fv = getattr(flashinfer, "__version__", "?")
except Exception:
    fv = None
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  triton {tv}  flashinfer {fv}")
print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
EOF
STEM=$($PY -c "import torch, datetime, re; print(datetime.date.today().isoformat() + '-' + (re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-')))")
mkdir -p "$OUT_DIR"
JSON="$OUT_DIR/$STEM.json"
LOG="$OUT_DIR/$STEM.log"
rm -f "$JSON"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
# keep_log NAME FILE: a phase's full output goes into the log file; the console shows its summary
keep_log() { { echo; echo "----- $1: full output"; cat "$2"; echo "----- end of $1"; } >> "$LOG" 2>/dev/null; }
echo "results: $JSON"

# -------------------------------------------------------------------------------------- build
if [ "$SKIP_BUILD" = 0 ]; then
  banner "build (setup.py build_ext --inplace)"
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this GPU only: half the compile time of the default list
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}' + ('a' if (m, n) == (9, 0) else ''))")
    export TORCH_CUDA_ARCH_LIST
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  T=$(cap 240 200); t0=$SECONDS
  if [ "$T" -gt 0 ] && timeout "$T" $PY setup.py build_ext --inplace > "$WORK/build.log" 2>&1 \
      && keep_log build "$WORK/build.log" && $PY -c "import kvkernels._C"; then
    record build ok $(( SECONDS - t0 )) "arch $TORCH_CUDA_ARCH_LIST"
    grep -iE "warning|spill" "$WORK/build.log" | grep -v "^\s*$" | head -20
  else
    tail -40 "$WORK/build.log"
    keep_log build "$WORK/build.log"
    record build FAILED $(( SECONDS - t0 )) "see log (arch $TORCH_CUDA_ARCH_LIST, cap ${T}s)"
  fi
fi
$PY -c "import kvkernels.cuda as c; print('extension:', 'available' if c.available() else c.unavailable_reason())"

# -------------------------------------------------------------------------------------- tests
if [ "$SKIP_TESTS" = 0 ]; then
  banner "pytest (GPU tests included)"
  T=$(cap 150 260); t0=$SECONDS
  # With a GPU present Triton compiles for it and cannot also interpret kernels on CPU tensors, so
  # the interpreter's parametrisations (ids "triton-cpu", run by CI) are left out here.
  ARGS=(-q -p no:cacheprovider -k "not triton-cpu" tests)
  [ "$SLOW" = 1 ] && ARGS+=(--run-slow)
  $PY -c "import xdist" 2>/dev/null && ARGS+=(-n 8)
  if [ "$T" -gt 0 ]; then
    timeout -s INT -k 15 "$T" $PY -m pytest "${ARGS[@]}" > "$WORK/pytest.log" 2>&1
    rc=$?
    keep_log pytest "$WORK/pytest.log"
    grep -E "^(FAILED|ERROR)" "$WORK/pytest.log" | head -30
    SUMMARY=$(grep -E "(passed|failed|error|no tests ran)" "$WORK/pytest.log" | tail -1)
    [ "$rc" = 124 ] && SUMMARY="timed out after ${T}s: $SUMMARY"
    echo "$SUMMARY"
    record tests "$([ "$rc" = 0 ] && echo ok || echo FAILED)" $(( SECONDS - t0 )) "$SUMMARY"
  else
    record tests skipped 0 "out of time"
  fi
fi

# ---------------------------------------------------------------------------------- sanitizer
SAN_JSON=$WORK/sanitizer.json
echo '{}' > "$SAN_JSON"
if [ "$SKIP_SAN" = 0 ]; then
  SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  entries=()
  # memcheck and racecheck always; SANITIZERS="memcheck racecheck initcheck synccheck" adds the others
  for tool in ${SANITIZERS:-memcheck racecheck}; do
    banner "compute-sanitizer --tool $tool"
    T=$(cap 60 170); t0=$SECONDS
    if [ "$T" -gt 0 ] && [ -x "$SAN" ]; then
      # No caching allocator under memcheck: each tensor is its own allocation, so a read past
      # its end is caught instead of landing in a neighbour's block.
      SAN_ARGS=()
      [ "$QUICK" = 1 ] && SAN_ARGS+=(--quick)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$T" "$SAN" --tool "$tool" --print-limit 20 \
        $PY bench/sanitize_ops.py "${SAN_ARGS[@]}" > "$WORK/$tool.log" 2>&1
      rc=$?
      keep_log "$tool" "$WORK/$tool.log"
      case "$rc" in 0) status=ok ;; 124|137) status=timeout ;; *) status="exit $rc" ;; esac
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_ops:|FAIL" "$WORK/$tool.log" | tail -6
      $PY bench/sanitize_ops.py --parse "$WORK/$tool.log" --tool "$tool" --status "$status" --seconds $(( SECONDS - t0 )) > "$WORK/$tool.json"
      entries+=("\"$tool\": $(cat "$WORK/$tool.json")")
      summary=$(grep -oE 'ERROR SUMMARY: [0-9]+ errors?' "$WORK/$tool.log" | tail -1)
      # clean: the workload finished (exit 0: no call failed) and the tool reported 0 errors
      if [ "$status" = ok ] && [ "$summary" = "ERROR SUMMARY: 0 errors" ]; then verdict=ok
      elif [ "$status" = timeout ]; then verdict=timeout
      else verdict=FAILED; fi
      record "$tool" "$verdict" $(( SECONDS - t0 )) "$summary${status:+ ($status)}"
    else
      record "$tool" skipped 0 "$([ -x "$SAN" ] && echo 'out of time' || echo 'compute-sanitizer not found')"
    fi
  done
  (IFS=,; echo "{${entries[*]}}") > "$SAN_JSON"
fi

# --------------------------------------------------------------------------------- benchmarks
bench() {  # bench NAME WANT RESERVE ARGS...
  local name=$1 want=$2 reserve=$3; shift 3
  banner "bench $name"
  local T; T=$(cap "$want" "$reserve"); local t0=$SECONDS
  if [ "$T" -le 0 ]; then record "bench $name" skipped 0 "out of time"; return; fi
  # --budget-s stops starting new points; timeout is the hard stop (points done are kept: the
  # JSON is written after every point).
  timeout -k 10 $(( T + 20 )) $PY -m kvkernels bench "$@" --budget-s "$T" --out "$JSON" --merge --no-plots \
    --no-progress > "$WORK/bench-$name.log" 2>&1
  local rc=$?
  keep_log "bench $name" "$WORK/bench-$name.log"
  grep -vE "^\s*$" "$WORK/bench-$name.log" | grep -vE "^(\||- |<)" | tail -4
  record "bench $name" "$([ "$rc" = 0 ] && echo ok || echo "FAILED rc=$rc")" $(( SECONDS - t0 )) ""
}
if [ "$SKIP_BENCH" = 0 ]; then
  # shellcheck disable=SC2054  # the commas separate sweep values inside one argument
  if [ "$QUICK" = 1 ]; then
    DEC=(--batch 1,32 --context 1k,8k --page-size 0,16)
    PRE=(--seqlen 1k,4k)
    APP=(--batch 1,64 --new-tokens 1,256 --fp8 off)
  else
    DEC=(--batch 1,16,64 --context 1k,4k,16k,32k --page-size 0,16)
    PRE=(--seqlen 1k,4k,16k --causal both)
    APP=(--batch 1,32,128 --new-tokens 1,512 --page-size 0,16 --fp8 both)
  fi
  # The main decode grid without FlexAttention (one compile per shape would eat the budget), then a
  # few points with every peer, flex included, measured side by side.
  bench decode 90 120 decode --preset llama-3-8b "${DEC[@]}" --cuda-graph --exclude flex
  bench decode-fp8 30 100 decode --preset llama-3-8b --batch 16,64 --context 4k,16k --page-size 16 --fp8 on --cuda-graph --exclude flex
  bench decode-peers 40 70 decode --preset llama-3-8b,llama-3-70b --batch 16 --context 8k --page-size 0 --cuda-graph
  bench prefill 50 40 prefill --preset llama-3-8b "${PRE[@]}"
  bench append 25 25 append --preset llama-3-8b "${APP[@]}" --cuda-graph
  bench cache 30 20 cache --preset llama-3-8b --scenario speculative,chunked-prefill,mixed --cuda-graph
  if [ "$SKIP_GEN" = 0 ]; then
    bench generate 30 10 generate --tokens 256
  fi
fi

# ------------------------------------------------------------------------------------- report
banner "report"
$PY - "$CHECKS" "$WORK/checks.json" <<'EOF'
import json, sys
checks = {}
for line in open(sys.argv[1]):
    name, status, seconds, detail = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
    checks[name] = {"status": status, "seconds": int(seconds or 0), "detail": detail}
json.dump(checks, open(sys.argv[2], "w"))
EOF
if [ -f "$JSON" ]; then
  $PY -m kvkernels.benchmark.results attach "$JSON" --sanitizer "$SAN_JSON" --checks "$WORK/checks.json"
else
  # no benchmark ran: still write a results file holding the ceilings, sanitizer and check results
  $PY - "$JSON" "$SAN_JSON" "$WORK/checks.json" <<'EOF'
import json, sys, torch
from kvkernels.benchmark import results, timing
doc = results.new_document("cuda", timing.measure_ceilings("cuda"))
doc["sanitizer"] = {**results.empty_sanitizer(), **json.load(open(sys.argv[2]))}
doc["checks"] = json.load(open(sys.argv[3]))
results.write_outputs(doc, sys.argv[1])
EOF
fi
echo
echo "=== summary ($(elapsed)s)"
column -t -s $'\t' "$CHECKS" 2>/dev/null || cat "$CHECKS"
$PY -m kvkernels.benchmark.results summary "$JSON"
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO" && cp "$OUT_DIR/$STEM".* "$OUT_DIR/$STEM"-*.png "$COPY_TO"/ 2>/dev/null
  echo "copied results to $COPY_TO"
fi
grep -qE "FAILED" "$CHECKS" && exit 1
exit 0
