#!/usr/bin/env bash
# Everything a GPU machine should run for this project, in under 8 minutes, on a machine with PyTorch,
# Triton and CUDA but no vLLM, no SGLang and no network: nothing is installed (PYTHONPATH only).
#
#   bash bench/gpu_check.sh [--dry-run] [OUT_DIR]      (OUT_DIR: default $OUT, else /tmp/v4_gpu_check)
#
# Each step runs under its own timeout and writes OUT_DIR/<nn>_<step>.log; OUT_DIR/summary.txt gets the
# device, date, commit and one line per step (status, exit code, seconds). Steps: nvidia-smi, the
# environment, the CUDA kernel tests (kernels/), the end-to-end paged forward on CUDA
# (tests/test_dispatch.py), the streaming-bandwidth baseline, and every bench/bench_*.py that needs no
# serving framework, with short settings. The per-step timeouts add up to 470 s.
#
# --dry-run (CPU, `make test` through tests/test_gpu_check.py): runs no GPU work but checks that every
# step is wired: the pytest steps collect (so their imports resolve), the Python snippets run, the
# benchmarks run with their real options in one Python process (without CUDA each parses its options,
# says so and measures nothing; bench_drafting and bench_decode, which also run on a CPU, parse --help), and every
# bench/bench_*.py is either a step or listed in FRAMEWORK_BENCHES.
#
# The kernels folder imports as `v4_kernels` (pyproject's package-dir); without an install a symlink in a
# temporary folder on PYTHONPATH provides that name. The device tool brings back at most 8 files, so
# there run e.g. `bash bench/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp gc; cp /tmp/gc/summary.txt $OUT/`.
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-${TMPDIR:-/tmp}/v4_gpu_check}}
PY=${PYTHON:-python3}
FRAMEWORK_BENCHES="bench_serving.py bench_vllm_drafting.py bench_sglang_drafting.py"  # need vLLM / SGLang

mkdir -p "$OUT_DIR"
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels" "$SHIM/v4_kernels"
export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO" || exit 2

# pytest-xdist and pytest-timeout, where installed (the GPU image has both): parallel compiles, no hung test.
# The end-to-end test runs serially: its real-shape checkpoint (500M random weights) is built once.
PYTEST_OPTS="-q -p no:cacheprovider -rfE"
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_OPTS="$PYTEST_OPTS --timeout=120"; fi
PARALLEL=""
if "$PY" -c "import xdist" 2>/dev/null; then PARALLEL="-n 8"; fi

# One-line snippets (a step is one line of STEPS).
ENV_PY='import torch, triton, v4_kernels, v4_plugin; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; print(p.name, "sm_%d%d" % (p.major, p.minor), p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB") if p else print("no CUDA device")'
STREAM_PY='import sys; sys.path.insert(0, "bench"); import common, torch; torch.cuda.is_available() and (common.Streamer(1 << 30).print_peak(), common.print_copy_peak())'

# name | timeout s | command | dry-run check
STEPS=(
  "nvidia-smi|15|nvidia-smi && nvidia-smi -q -d CLOCK,POWER,ECC|true"
  "environment|30|$PY -c '$ENV_PY'|$PY -c '$ENV_PY'"
  "kernel-tests|160|$PY -m pytest $PYTEST_OPTS $PARALLEL kernels|$PY -m pytest -q -p no:cacheprovider --collect-only kernels"
  "paged-forward-e2e|130|$PY -m pytest $PYTEST_OPTS tests/test_dispatch.py|$PY -m pytest -q -p no:cacheprovider --collect-only tests/test_dispatch.py"
  "stream-baseline|15|$PY -c '$STREAM_PY'|$PY -c '$STREAM_PY'"
  "bench_gemm|20|$PY bench/bench_gemm.py --batch 1,128|bench"
  "bench_sparse_attention|20|$PY bench/bench_sparse_attention.py --batches 1,128 --contexts 4K,128K --pool-gb 1|bench"
  "bench_indexer|20|$PY bench/bench_indexer.py --batches 1,128 --contexts 4K,128K --pool-gb 1|bench"
  "bench_compressor|10|$PY bench/bench_compressor.py --batches 1,128|bench"
  "bench_kv_store|10|$PY bench/bench_kv_store.py --batches 1,128|bench"
  "bench_mhc|10|$PY bench/bench_mhc.py --tokens 1,128,8192|bench"
  "bench_drafting|10|$PY bench/bench_drafting.py --prompt 16 --new 8 --repeats 1|bench --help"
  "bench_decode|20|$PY bench/bench_decode.py --contexts 1K,4K --batches 1,32 --steps 3|bench --help"
)

# Dry run of the benchmark steps: each script's command line in one process (imports shared), run as
# __main__ with a fresh module namespace; prints "<name> ok|FAIL" per script.
DRY_BENCH_PY='
import runpy, shlex, sys, traceback
sys.path.insert(0, "bench")
failed = 0
for spec in sys.argv[1:]:
    name, line = spec.split("=", 1)
    sys.argv = shlex.split(line)[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception:
        traceback.print_exc()
        code = 1
    print(name, "ok" if code == 0 else "FAIL", flush=True)
    failed |= code != 0
sys.exit(failed)'

SUMMARY="$OUT_DIR/summary.txt"
{
  echo "gpu_check $( [ $DRY = 1 ] && echo '(dry run)') $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(git status --short 2>/dev/null | wc -l) changed files"
  echo "device $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
  printf '%-24s %-8s %4s %7s\n' step status rc seconds
} > "$SUMMARY"

failed=0
n=0
dry_benches=()
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd check <<< "$step"
  n=$((n + 1))
  log=$(printf '%s/%02d_%s.log' "$OUT_DIR" "$n" "$name")
  if [ $DRY = 1 ]; then
    case $check in  # "bench": the real command line; "bench ARGS": the script with ARGS instead
      bench) dry_benches+=("$name=$cmd"); continue ;;
      bench\ *) dry_benches+=("$name=${cmd%% --*} ${check#bench }"); continue ;;
    esac
    cmd=$check limit=300
  fi
  start=$(date +%s%N)
  echo "\$ $cmd" > "$log"
  timeout -k 10 "$limit" bash -c "$cmd" >> "$log" 2>&1
  rc=$?
  secs=$(awk "BEGIN { print ($(date +%s%N) - $start) / 1e9 }")
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; failed=1 ;;
    *) status=FAIL; failed=1 ;;
  esac
  printf '%-24s %-8s %4s %7.1f\n' "$name" "$status" "$rc" "$secs" | tee -a "$SUMMARY"
done

if [ ${#dry_benches[@]} -gt 0 ]; then
  log="$OUT_DIR/benchmarks_dry_run.log"
  timeout -k 10 300 "$PY" -c "$DRY_BENCH_PY" "${dry_benches[@]}" > "$log" 2>&1 || failed=1
  grep -E '^bench_[a-z_]+ (ok|FAIL)$' "$log" | awk '{ printf "%-24s %-8s\n", $1, $2 }' | tee -a "$SUMMARY"
fi

for f in bench/bench_*.py; do
  b=$(basename "$f")
  case " $FRAMEWORK_BENCHES " in *" $b "*) continue ;; esac
  if ! printf '%s\n' "${STEPS[@]}" | grep -q "^${b%.py}|"; then
    echo "unwired: $b is neither a step nor in FRAMEWORK_BENCHES" | tee -a "$SUMMARY"
    failed=1
  fi
done
exit $failed
