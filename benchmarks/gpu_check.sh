#!/usr/bin/env bash
# One-call GPU check of fathom_jax: environment, every workload's tiny steps, the peaks, profiled
# runs checked against xprof, then paper-size bfloat16 timings of JAX and PyTorch. Stages run
# most important first, each under its own `timeout` cut to what the overall budget has left, and
# a failed stage is logged and skipped past. Everything lands in $OUT (at most 8 files, each under
# 16 MiB); the closing summary table is the last thing printed.
#
#   OUT=/path/to/empty/dir bash benchmarks/gpu_check.sh
#
# Environment: GPU_CHECK_BUDGET_S (whole script, default 500); GPU_CHECK_BACKEND (gpu, or cpu for
# a dry run on a machine without one: tiny stages only, no paper sizes); GPU_CHECK_WORKLOADS
# (tiny stage, default all); GPU_CHECK_BENCH_PLAN (stage 5-6 order, see below); GPU_CHECK_SITE
# (where .whl/ installs, default /tmp/site); PYTHON (default python3).
#
# $OUT: gpu_check.log (everything printed), summary.json, tiny_runs.json, peaks.json,
# profile_residual.tar.gz, profile_seq2seq.tar.gz, bench.txt.

set -u
cd "$(dirname "$0")/.." || exit 1

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-500}
RESERVE=20  # kept back from the stages for the summary at the end
BACKEND=${GPU_CHECK_BACKEND:-gpu}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
TINY=${GPU_CHECK_WORKLOADS:-all}
OUT=${OUT:?set OUT to the folder that receives the results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}  # XLA's INFO lines would flood the log
export PYTHONUNBUFFERED=1

# Paper-size batches that fill an H200 (the rest run at their paper batch), and the order of
# stages 5-6: jax:W is bench_workloads.py's train and infer rows, torch:W PyTorch eager, compile:W
# torch.compile. Each image model's JAX rows are followed by PyTorch's eager ones; torch.compile,
# whose compiles take minutes, comes after them (ResNet-50's) and last (the other two).
declare -A BATCH=([residual]=256 [vgg]=128 [alexnet]=512 [speech]=64 [seq2seq]=256)
PLAN=${GPU_CHECK_BENCH_PLAN:-"jax:residual torch:residual jax:vgg torch:vgg jax:alexnet \
torch:alexnet compile:residual jax:speech jax:seq2seq jax:autoenc jax:memnet jax:deepq \
compile:vgg compile:alexnet"}

left() { echo $(( START + BUDGET - RESERVE - $(date +%s) )); }

# run_stage NAME CAP COMMAND...: COMMAND under timeout, for at most CAP seconds and no more than
# the budget has left; appends NAME, status, seconds and $NOTE to stages.tsv; returns its status.
run_stage() {
  local name=$1 cap=$2 t rc s d status
  shift 2
  t=$(left)
  (( t > cap )) && t=$cap
  if (( t < 15 )); then
    echo "### $name: skipped, ${t}s of the budget left"
    printf '%s\tskipped\t0\tbudget spent\n' "$name" >> "$WORK/stages.tsv"
    return 125
  fi
  echo "### $name (timeout ${t}s, at $(( $(date +%s) - START ))s)"
  s=$(date +%s)
  timeout -k 10 "$t" "$@"
  rc=$?
  d=$(( $(date +%s) - s ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$d" "${NOTE:-}" >> "$WORK/stages.tsv"
  echo "### $name: $status in ${d}s"
  NOTE=
  return $rc
}

install_wheels() {
  # All at once; where that fails, one at a time (a wheel that does not fit costs only itself);
  # without a working pip, unzipped: a wheel is a zip of what goes into site-packages.
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl && return 0
  local w rc=0 pip=1
  "$PY" -m pip --version > /dev/null 2>&1 || pip=0
  echo "pip install of all wheels failed; one at a time ($( ((pip)) && echo pip || echo unzip))"
  for w in .whl/*.whl; do
    if ((pip)); then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$w" || { echo "not installed: $w"; rc=1; }
    else
      "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
        "$w" "$SITE" || { echo "not unzipped: $w"; rc=1; }
    fi
  done
  return $rc
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import sys; print('python', sys.version.split()[0])"
  "$PY" -c "
import jax, jaxlib
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'backend', jax.default_backend())
print('devices', jax.devices())"
  "$PY" -c "
import torch
ok = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', ok,
      torch.cuda.get_device_name() if ok else '')"
  "$PY" -c "
import xprof.convert.raw_to_tool_data, xprof.version as v
print('xprof', v.__version__, 'importable')" || echo "xprof: not importable"
  "$PY" -c "
import ale_py
from fathom_jax import atari
print('ale_py', ale_py.__version__, 'breakout rom', atari.rom_path('breakout'))" \
    || echo "ale_py: not importable (deepq will fail)"
}

tiny_runs() {
  local missing w end=$(( $(date +%s) + 210 ))  # the whole stage, reruns included
  NOTE="$TINY"
  run_stage "tiny runs" 150 "$PY" run.py --workload="$TINY" --preset=tiny --mode=both \
    --backend="$BACKEND" --steps=3 --warmup_steps=1 --output_dir="$WORK/tiny" --quiet
  # run.py stops at the first workload that fails: the ones after it get their own process.
  missing=$("$PY" benchmarks/gpu_check.py missing "$WORK/tiny" "$TINY")
  for w in $missing; do
    run_stage "tiny run $w" $(( end - $(date +%s) < 60 ? end - $(date +%s) : 60 )) \
      "$PY" run.py --workload="$w" --preset=tiny --mode=both --backend="$BACKEND" --steps=3 \
      --warmup_steps=1 --output_dir="$WORK/tiny" --quiet
  done
  "$PY" benchmarks/gpu_check.py tiny "$WORK/tiny" "$OUT/tiny_runs.json"
}

peaks() {
  local dtype
  for dtype in bfloat16 float32; do
    run_stage "peaks $dtype" 45 "$PY" -m fathom_jax.peaks --backend="$BACKEND" --dtype="$dtype" \
      --output="$WORK/peaks_$dtype.json"
  done
  "$PY" benchmarks/gpu_check.py peaks "$OUT/peaks.json" "$WORK"/peaks_*.json
}

profile() {
  local w=$1 dir rc
  local cmd=("$PY" run.py --workload="$w" --preset=tiny --mode=train --backend="$BACKEND"
             --steps=5 --warmup_steps=2 --profile --output_dir="$WORK/profile/$w" --quiet)
  run_stage "profile $w" 100 "${cmd[@]}"
  rc=$?
  # The breakdown calls xprof in-process (fathom_jax.analysis.xprof_check). Should xprof's
  # library crash the run, the run again without xprof: our breakdown, xprof's in its own process.
  if (( rc == 134 || rc == 139 )) && ! ls "$WORK/profile/$w"/*/ops.csv > /dev/null 2>&1; then
    rm -rf "$WORK/profile/$w"
    NOTE="without xprof in the process"
    local without=${PYTHONPATH#"$SITE"}
    PYTHONPATH=${without#:} run_stage "profile $w again" 60 "${cmd[@]}"
  fi
  dir=$(ls -d "$WORK/profile/$w"/*/ 2>/dev/null | head -1)
  if [[ -z $dir ]]; then
    echo "profile $w: no run folder"
    return
  fi
  dir=${dir%/}
  mkdir -p "$dir/xprof"
  # xprof's converters log every step to stderr: that goes into the tarball, its tail here.
  run_stage "xprof $w" 60 bash -c "'$PY' benchmarks/gpu_check.py xprof '$dir' \
    2> '$dir/xprof/stderr.txt'" || tail -n 15 "$dir/xprof/stderr.txt"
  run_stage "pack $w" 60 "$PY" benchmarks/gpu_check.py pack "$dir" "$OUT/profile_$w.tar.gz"
}

bench_jax() {
  local w=$1 steps=10 args=()
  [[ $w == autoenc || $w == memnet || $w == deepq ]] && steps=30
  [[ -n ${BATCH[$w]:-} && $PRESET == paper ]] && args+=("--batch=$w=${BATCH[$w]}")
  # deepq's train source plays 50,000 random steps before the first update; the update timed
  # does not depend on how many, so 2,000 do.
  [[ $w == deepq ]] && args+=("--override=deepq:learning_starts=2000")
  echo "## jax $w" >> "$OUT/bench.txt"
  # No repeats (--min_time_s=0): a repeat compiles the step again. Compiles with autotuning at
  # these batches pass the CPU's 20 s limit, which would only mark rows.
  NOTE="batch ${BATCH[$w]:-paper}"
  run_stage "bench jax $w" 150 bash -c "set -o pipefail; '$PY' benchmarks/bench_workloads.py \
    --workloads=$w --preset=$PRESET --backend=$BACKEND --dtype=bfloat16 --steps=$steps \
    --warmup_steps=2 --min_time_s=0 --max_compile_s=600 ${args[*]} | tee -a '$OUT/bench.txt'"
}

bench_torch() {
  local kind=$1 w=$2 cap=90 extra=""
  [[ $kind == compile ]] && cap=180 extra=--compile
  echo "## torch-$([[ $kind == compile ]] && echo compile || echo eager) $w" >> "$OUT/bench.txt"
  NOTE="batch ${BATCH[$w]}"
  run_stage "bench torch $kind $w" $cap bash -c "set -o pipefail; '$PY' \
    benchmarks/torch_reference.py --device=cuda --dtype=bfloat16 --layouts=channels_last \
    --workloads=$w --batch=$w=${BATCH[$w]} --steps=10 --warmup_steps=3 --min_time_s=0 $extra \
    | tee -a '$OUT/bench.txt'"
}

main() {
  echo "gpu_check: backend $BACKEND, budget ${BUDGET}s, work folder $WORK, out $OUT, $(date -u)"

  # 0. Wheels the machine lacks (xprof, ale-py); their absence fails only what needs them.
  if ls .whl/*.whl > /dev/null 2>&1; then
    NOTE="$(ls .whl | tr '\n' ' ')"
    run_stage "install wheels" 90 bash -c "$(declare -f install_wheels); install_wheels"
  else
    printf 'install wheels\tskipped\t0\tno .whl/ folder\n' >> "$WORK/stages.tsv"
  fi
  [[ -d $SITE ]] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

  # 1. Environment.
  run_stage "environment" 60 bash -c "$(declare -f environment); environment"

  # 2. Every workload's tiny train and inference steps.
  tiny_runs

  # 3. Peaks.
  peaks

  # 4. Profiled tiny runs, xprof's view of the same traces, packed.
  profile residual
  profile seq2seq

  # 5-6. Paper sizes, bfloat16: JAX and PyTorch. (A dry run on the CPU does none of it, unless
  # GPU_CHECK_BENCH_PRESET names a small preset: then the JAX rows only, at that preset.)
  PRESET=${GPU_CHECK_BENCH_PRESET:-paper}
  if [[ $BACKEND == gpu || $PRESET != paper ]]; then
    : > "$OUT/bench.txt"
    local item
    for item in $PLAN; do
      case ${item%%:*} in
        jax) bench_jax "${item#*:}" ;;
        torch|compile) [[ $BACKEND == gpu ]] && bench_torch "${item%%:*}" "${item#*:}" ;;
      esac
    done
  fi

  rm -f "$OUT"/*.part
  echo "### done at $(( $(date +%s) - START ))s"
  "$PY" benchmarks/gpu_check.py summary "$WORK" "$OUT"
}

export PY SITE  # read by the functions that run_stage hands to `bash -c` (timeout runs programs)

main 2>&1 | tee "$OUT/gpu_check.log"
# The log is the one file that could outgrow $OUT's 16 MiB: keep its head and its tail.
if (( $(stat -c %s "$OUT/gpu_check.log") > 15 * 1024 * 1024 )); then
  log=$OUT/gpu_check.log
  { head -c 4M "$log"; printf '\n[... cut ...]\n'; tail -c 10M "$log"; } > "$WORK/log" \
    && mv "$WORK/log" "$log"
fi
rm -rf "$WORK"
