#!/usr/bin/env bash
# Everything a lent GPU machine should prove, in one time-boxed run of at most 9.5 minutes on an H100/H200
# (offline install and compiles included):
#
#   scripts/gpu_check.sh              on the GPU machine (python3 there holds torch; nothing is downloaded)
#   scripts/gpu_check.sh --rehearse   the same stages on this CPU machine, in a fresh virtual environment
#
# Stages, in order of value, each step under its own `timeout`; a failing stage is recorded and the next
# one runs anyway:
#   install  pip install --no-index --find-links .whl --no-build-isolation -e . (SSLTM_CUDA=off; `make
#            gpu-wheels` fills .whl/ with what the GPU machine lacks)
#   a        environment: versions, GPU, SMs, L2, clocks
#   b        correctness: the `gpu_quick` tests of the Triton backends, in parallel (pytest-xdist)
#   c        every op's benchmark, quick: SSLTM's shapes and the large one, fwd and fwd+bwd, every peer
#   d        benchmarks/wmsa_decide.py, quick
#   e        the model: one ResNet-101 training step (bf16, 479x479, 2 clips) on the kernels and on the
#            reference backend, and streaming frames/s at 480p; the training step's peak memory with
#            activation checkpointing off and on (benchmarks/train_memory.py); Table 5's short-term modules
#            (benchmarks/short_term.py --quick: baseline, STT, NetWarp with DIS and RAFT flow, ST-OCR, and
#            the CFFM and Sparse-TT token assembly alone; the RAFT case only with GPU_CHECK_RAFT_WEIGHTS, else
#            skipped); the compared systems' training objectives (benchmarks/objectives.py --quick: step time,
#            peak memory and Mean Teacher's EMA update of the baseline, Temporal Loss with DIS and RAFT flow, IFR,
#            SSLTM, SSLTM + Mean Teacher) and configs (benchmarks/baselines.py --quick: a few compared configs'
#            step, memory and streaming frames/s; the Swin-S and ResNet-101 trunks alone). The full runs (the
#            CFFM and Sparse-TT training steps; 10 timed steps per objective; every compared config) are second
#            calls, each under its own limit (5 and 8 minutes for the last two):
#            python benchmarks/short_term.py --results-dir "$OUT" [--raft-weights PATH]
#            python benchmarks/objectives.py --results-dir "$OUT" [--raft-weights PATH]
#            python benchmarks/baselines.py --results-dir "$OUT"
#   f        the CUDA extension, built in the background from the start (MAX_JOBS=16, into a separate build
#            folder): the `gpu_quick` tests of the CUDA backends, then its timings
# Results go to $OUT when it is set, else benchmarks/results/: gpu_check.jsonl (every JSON line of the run),
# gpu_check.log (every step's output) and summary.md (printed last). The rehearsal runs the kernel stages in
# the Triton interpreter on tiny shapes with scaled time limits; what needs a GPU is recorded as not run.
#
# Environment: PYTHON (default python3; the rehearsal builds its environment from it), GPU_CHECK_COMMIT (the
# commit to report where the tree is no git checkout), GPU_CHECK_FAIL_STAGE (a stage id: its steps fail
# without running, to test that the later stages still run), GPU_CHECK_TIMEOUT_SCALE (multiplies every time
# limit; default 1, 3 when rehearsing), GPU_CHECK_WORKERS (pytest-xdist workers; default 12, 2 rehearsing),
# GPU_CHECK_RAFT_WEIGHTS (a local raft_large state dict file for stage e's NetWarp-RAFT and Temporal Loss-RAFT
# cases; nothing is downloaded).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REHEARSE=0
case "${1:-}" in
  "") ;;
  --rehearse) REHEARSE=1 ;;
  -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (usage: scripts/gpu_check.sh [--rehearse])" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "gpu_check.sh: one argument at most (usage: scripts/gpu_check.sh [--rehearse])" >&2; exit 2; }

STAGE_IDS="install a b c d e f"
FAIL_STAGE=${GPU_CHECK_FAIL_STAGE:-}
if [ -n "$FAIL_STAGE" ] && [[ " $STAGE_IDS " != *" $FAIL_STAGE "* ]]; then
  echo "gpu_check.sh: GPU_CHECK_FAIL_STAGE must be one of: $STAGE_IDS (got '$FAIL_STAGE')" >&2
  exit 2
fi
PY=${PYTHON:-python3}
SCALE=${GPU_CHECK_TIMEOUT_SCALE:-$((REHEARSE ? 3 : 1))}
WORKERS=${GPU_CHECK_WORKERS:-$((REHEARSE ? 2 : 12))}
for number in "$SCALE" "$WORKERS"; do
  [[ $number =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: GPU_CHECK_TIMEOUT_SCALE and GPU_CHECK_WORKERS must be positive integers" >&2; exit 2; }
done
# seconds for all stages (the summary follows): the steps' limits before f sum to 535 s, so that f has 10 s at
# least, and more when the stages before it end early
BUDGET=$((545 * SCALE))

RESULTS=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd) || exit 2
LOG=$RESULTS/gpu_check.log
JSONL=$RESULTS/gpu_check.jsonl
SUMMARY=$RESULTS/summary.md
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
BENCH_RESULTS=$WORK/results  # each benchmark's JSON lines; concatenated into $JSONL after every step
STAGES=$WORK/stages.tsv
mkdir -p "$BENCH_RESULTS"
: >"$LOG"
: >"$STAGES"
rm -f "$JSONL" "$SUMMARY"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SSLTM_BACKEND

if [ -n "${GPU_CHECK_COMMIT:-}" ]; then
  COMMIT=$GPU_CHECK_COMMIT
elif COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
  [ -z "$(git status --porcelain -- . ':(exclude)benchmarks/results' 2>/dev/null)" ] || COMMIT+="+dirty"
else
  COMMIT=unknown
fi

BUILD_PID=
cleanup() {
  [ -z "$BUILD_PID" ] || kill "$BUILD_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { echo "[gpu_check] $*"; }
limit() { echo $(($1 * SCALE)); }

# step STAGE NAME LIMIT COMMAND...: COMMAND under `timeout LIMIT` (clamped to what is left of the budget),
# its output appended to the log; one line of stages.tsv (stage, step, exit status, seconds, limit, note). A
# command may leave a note in $GPU_CHECK_NOTE.
step() {
  local stage=$1 name=$2 lim=$3 rc start=$SECONDS left
  shift 3
  left=$((BUDGET - SECONDS))
  [ "$lim" -le "$left" ] || lim=$left
  export GPU_CHECK_NOTE=$WORK/note
  : >"$GPU_CHECK_NOTE"
  printf '\n### step %s %s (limit %s s): %s\n' "$stage" "$name" "$lim" "$*" >>"$LOG"
  if [ "$stage" = "$FAIL_STAGE" ]; then
    echo "injected failure (GPU_CHECK_FAIL_STAGE=$stage): not run" >>"$LOG"
    echo "injected failure" >"$GPU_CHECK_NOTE"
    rc=97
  elif [ "$lim" -lt 5 ]; then
    echo "time budget spent: not run" >"$GPU_CHECK_NOTE"
    rc=-
  else
    timeout --kill-after=10 "$lim" "$@" >>"$LOG" 2>&1
    rc=$?
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$stage" "$name" "$rc" "$((SECONDS - start))" "$lim" \
    "$(tr '\t\n' '  ' <"$GPU_CHECK_NOTE")" >>"$STAGES"
  say "$stage $name: exit $rc after $((SECONDS - start)) s$( [ -s "$GPU_CHECK_NOTE" ] && echo " ($(cat "$GPU_CHECK_NOTE"))")"
  cat "$BENCH_RESULTS"/*.jsonl >"$JSONL" 2>/dev/null
  return 0
}

# not_run STAGE NAME WHY: a step that cannot run here, recorded as such
not_run() {
  printf '\n### step %s %s: not run (%s)\n' "$1" "$2" "$3" >>"$LOG"
  printf '%s\t%s\t-\t0\t0\t%s\n' "$1" "$2" "$3" >>"$STAGES"
  say "$1 $2: not run ($3)"
}

# ------------------------------------------------------------------------------------------ environment
if [ "$REHEARSE" = 1 ]; then
  # A fresh virtual environment that sees what the GPU machine has preinstalled (this environment's
  # packages, through a folder of links) but neither this project nor the wheelhouse's packages: those it
  # installs from .whl/ with --no-index, as the GPU machine does. No pip configuration (files or PIP_*
  # variables: extra indexes, find links, constraints) applies, as there.
  compgen -G ".whl/*.whl" >/dev/null || { echo "gpu_check.sh: no wheels in .whl/: run make gpu-wheels first" >&2; exit 2; }
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || exit 2
  skip="ssltm"
  for wheel in .whl/*.whl; do
    name=${wheel##*/}
    skip+=" ${name%%-*}"
  done
  skip=${skip,,}
  mkdir -p "$WORK/preinstalled"
  for entry in "$site"/*; do
    name=${entry##*/}
    key=${name,,}
    key=${key//-/_}
    keep=1
    [[ $key == __editable__* || $key == *.pth ]] && keep=0
    for dist in $skip; do
      [[ $key == "$dist" || $key == "$dist"[._-]* ]] && keep=0
    done
    [ "$keep" = 0 ] || ln -s "$entry" "$WORK/preinstalled/$name"
  done
  "$PY" -m venv --without-pip "$WORK/venv" || exit 2
  venv_site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || exit 2
  echo "$WORK/preinstalled" >"$venv_site/preinstalled.pth"
  PY=$WORK/venv/bin/python
  while read -r variable; do unset "$variable"; done < <(compgen -e | grep '^PIP_')
  export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
  say "rehearsal on the CPU: virtual environment $WORK/venv (packages preinstalled but $skip)"
fi
say "results in $RESULTS; time budget $BUDGET s; commit $COMMIT"

# f, in the background from the start: the CUDA extension into a folder of its own, so that the stages
# before f import the package without it
BUILD=$WORK/cuda_build
if [ "$REHEARSE" = 0 ] && [ "$FAIL_STAGE" != f ]; then
  SSLTM_CUDA=on MAX_JOBS=${MAX_JOBS:-16} nice -n 10 timeout --kill-after=10 "$BUDGET" \
    "$PY" setup.py build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp" >"$WORK/cuda_build.log" 2>&1 &
  BUILD_PID=$!
fi

# ---------------------------------------------------------------------------------------------- install
compgen -G ".whl/*.whl" >/dev/null || say "no wheels in .whl/ (make gpu-wheels, then carry .whl): the install may fail"
install_project() {
  if SSLTM_CUDA=off "$PY" -m pip install --no-index --find-links .whl --no-build-isolation -e .; then
    return 0
  fi
  echo "offline install with dependencies failed: the wheelhouse and the project again with --no-deps" | tee "$GPU_CHECK_NOTE"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --no-index --no-deps .whl/*.whl || return 1
  fi
  SSLTM_CUDA=off "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
}
export -f install_project
export PY
step install "pip install" "$(limit 25)" bash -c install_project
step install "imports" "$(limit 20)" "$PY" -c '
import benchmarks, omegaconf, ssltm, ssltm_kernels
for module in (ssltm_kernels, ssltm, omegaconf):
    print(module.__name__, getattr(module, "__version__", ""), module.__file__)'
if ! grep -q "^install"$'\t'"imports"$'\t'"0"$'\t' "$STAGES"; then
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  say "the installed package does not import: the stages run from the source tree (PYTHONPATH)"
fi

# ------------------------------------------------------------------------------------------ a: environment
step a "ssltm_kernels.env" "$(limit 15)" bash -c 'set -o pipefail; "$1" -m ssltm_kernels.env | tee "$2"' _ "$PY" "$WORK/env.txt"
if command -v nvidia-smi >/dev/null; then
  step a "nvidia-smi" "$(limit 5)" bash -c 'set -o pipefail; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu --format=csv | tee -a "$1"; (nvcc --version | tail -1) 2>/dev/null | tee -a "$1"' _ "$WORK/env.txt"
else
  not_run a "nvidia-smi" "no GPU"
fi

# ---------------------------------------------------------------------------------- b: GPU correctness
OP_TESTS="tests/test_window_attention_3d.py tests/test_dwconv3x3.py tests/test_gcc_assign.py tests/test_soft_region_pool.py"
# shellcheck disable=SC2086
step b "pytest gpu_quick triton" "$(limit 90)" "$PY" -m pytest -m gpu_quick -k triton -n "$WORKERS" -v \
  -p no:cacheprovider $OP_TESTS

# --------------------------------------------------------------------------------- c: op benchmarks
if [ "$REHEARSE" = 1 ]; then
  export TRITON_INTERPRET=1
  declare -A BENCH_ARGS=(
    [stt_window_attn]="--shapes cpu-small --modes fwd --providers eager,sdpa,triton"
    [mixffn_dwconv]="--modes fwd --providers eager,triton --no-module"
    [ocr_region_pool]="--shapes cpu-k19 --modes fwd --providers eager,triton"
    [gcc_assign]="--modes fwd --providers eager,triton")
else
  declare -A BENCH_ARGS=([stt_window_attn]="--modes fwd,fwd+bwd" [mixffn_dwconv]="--modes fwd,fwd+bwd"
    [ocr_region_pool]="--modes fwd,fwd+bwd" [gcc_assign]="--modes fwd,fwd+bwd")
fi
declare -A BENCH_LIMIT=([stt_window_attn]=50 [mixffn_dwconv]=20 [ocr_region_pool]=15 [gcc_assign]=15)
OP_BENCHMARKS="stt_window_attn mixffn_dwconv ocr_region_pool gcc_assign"
for bench in $OP_BENCHMARKS; do
  # shellcheck disable=SC2086
  step c "$bench" "$(limit "${BENCH_LIMIT[$bench]}")" "$PY" "benchmarks/$bench.py" --quick \
    --results-dir "$BENCH_RESULTS" ${BENCH_ARGS[$bench]}
done

# ------------------------------------------------------------------------------------- d: wmsa_decide
if [ "$REHEARSE" = 1 ]; then
  step d "wmsa_decide" "$(limit 60)" "$PY" benchmarks/wmsa_decide.py --sections ceilings,gate --results-dir "$BENCH_RESULTS"
else
  step d "wmsa_decide" "$(limit 60)" "$PY" benchmarks/wmsa_decide.py --results-dir "$BENCH_RESULTS"
fi
unset TRITON_INTERPRET

# ------------------------------------------------------------------------------------------- e: model
# (on the CPU both providers run the PyTorch references: Triton runs there only in the interpreter)
if [ "$REHEARSE" = 1 ]; then
  MODEL_ARGS="--size 48"
  MEMORY_ARGS="--backbone resnet18 --crop 48 --batch 1 --classes 5"
  SHORT_TERM_ARGS=(--cases baseline,netwarp_dis,netwarp_raft)  # the tiny CPU case: flow, skip and summary paths
  OBJECTIVES_ARGS=(--cases baseline,temporal_loss_raft,mean_teacher)  # a step, a skip, the EMA update
  BASELINES_ARGS=(--configs table5/upernet,table7/ssltm_mt --no-trunks)  # a plain config, one with an objective
else
  MODEL_ARGS="--backbone resnet101 --size 479"
  MEMORY_ARGS="--backbone resnet101 --crop 479 --batch 2 --amp bf16"
  SHORT_TERM_ARGS=(--quick)
  OBJECTIVES_ARGS=(--quick)
  BASELINES_ARGS=(--quick)
fi
if [ -n "${GPU_CHECK_RAFT_WEIGHTS:-}" ]; then
  if [ -f "$GPU_CHECK_RAFT_WEIGHTS" ]; then
    SHORT_TERM_ARGS+=(--raft-weights "$GPU_CHECK_RAFT_WEIGHTS")
    OBJECTIVES_ARGS+=(--raft-weights "$GPU_CHECK_RAFT_WEIGHTS")
  else
    say "GPU_CHECK_RAFT_WEIGHTS: no file at $GPU_CHECK_RAFT_WEIGHTS: the RAFT cases are skipped"
  fi
fi
# shellcheck disable=SC2086
step e "ssltm_model" "$(limit 60)" "$PY" benchmarks/ssltm_model.py --quick --cases train,stream $MODEL_ARGS \
  --results-dir "$BENCH_RESULTS"
# shellcheck disable=SC2086
step e "train_memory" "$(limit 60)" "$PY" benchmarks/train_memory.py --checkpointing off,on $MEMORY_ARGS \
  --results-dir "$BENCH_RESULTS"
step e "short_term" "$(limit 30)" "$PY" benchmarks/short_term.py "${SHORT_TERM_ARGS[@]}" --results-dir "$BENCH_RESULTS"
step e "objectives" "$(limit 30)" "$PY" benchmarks/objectives.py "${OBJECTIVES_ARGS[@]}" --results-dir "$BENCH_RESULTS"
step e "baselines" "$(limit 40)" "$PY" benchmarks/baselines.py "${BASELINES_ARGS[@]}" --results-dir "$BENCH_RESULTS"

# ------------------------------------------------------------------------------ f: the CUDA extension
if [ "$REHEARSE" = 1 ]; then
  not_run f "build" "no GPU"
elif [ "$FAIL_STAGE" = f ]; then
  step f "build" 0 true
else
  start=$SECONDS
  while kill -0 "$BUILD_PID" 2>/dev/null && [ $((BUDGET - SECONDS)) -gt 30 ]; do sleep 2; done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    kill "$BUILD_PID" 2>/dev/null
    not_run f "build" "the build did not finish within the time budget"
    built=0
  else
    wait "$BUILD_PID"
    rc=$?
    BUILD_PID=
    printf '\n### step f build (background, from the start): exit %s\n' "$rc" >>"$LOG"
    cat "$WORK/cuda_build.log" >>"$LOG"
    printf 'f\tbuild\t%s\t%s\t%s\t%s\n' "$rc" "$((SECONDS - start))" "$BUDGET" "waited $((SECONDS - start)) s" >>"$STAGES"
    say "f build: exit $rc (waited $((SECONDS - start)) s)"
    built=0
    if [ "$rc" = 0 ] && compgen -G "$BUILD/lib/ssltm_kernels/_C*.so" >/dev/null; then
      cp "$BUILD"/lib/ssltm_kernels/_C*.so ssltm_kernels/ && built=1
    fi
  fi
  if [ "$built" = 1 ]; then
    # shellcheck disable=SC2086
    step f "pytest gpu_quick cuda" 60 "$PY" -m pytest -m gpu_quick -k cuda -n "$((WORKERS / 2))" -v \
      -p no:cacheprovider $OP_TESTS
    for bench in $OP_BENCHMARKS; do
      step f "$bench cuda" 30 "$PY" "benchmarks/$bench.py" --quick --modes fwd,fwd+bwd --providers eager,cuda \
        --results-dir "$BENCH_RESULTS"
    done
  else
    not_run f "timings" "no extension built"
  fi
fi

# ------------------------------------------------------------------------------------------- summary
say "all stages done after $SECONDS s; summary follows"
cat "$BENCH_RESULTS"/*.jsonl >"$JSONL" 2>/dev/null
if ! "$PY" scripts/gpu_check_summary.py --stages "$STAGES" --log "$LOG" --results "$JSONL" --env "$WORK/env.txt" \
  --commit "$COMMIT" --mode "$([ "$REHEARSE" = 1 ] && echo rehearsal || echo gpu)" --seconds "$SECONDS" \
  --budget "$BUDGET" --out "$SUMMARY" >>"$LOG" 2>&1; then
  {
    echo "# GPU check (the summariser failed: see gpu_check.log)"
    echo
    echo "commit $COMMIT"
    echo
    echo '```'
    cat "$STAGES"
    echo '```'
  } >"$SUMMARY"
fi
echo
cat "$SUMMARY"
