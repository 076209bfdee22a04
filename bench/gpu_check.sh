#!/usr/bin/env bash
# The one-call GPU check (issue 13), from the repository root of a checkout on a GPU machine without a registry:
#   bash bench/gpu_check.sh [OUT]                      (default runs/gpu-check; ~5 min on one H100/H200)
# Before, on any machine with the venv (README "The GPU path"):
#   .venv/bin/python bench/gpu_check.py data gpu-check-data     # slides + shards it trains on (ignored folder)
#   wheels of what the GPU machine lacks in .whl/ (ignored), e.g. webdataset, pyvips, pyvips-binary, deepspeed
# It installs nothing system-wide: carried wheels go to /tmp/site, the checkout is put on PYTHONPATH. Then:
# torchrun (NCCL, bf16) trains a teacher, killed after its first checkpoint and resumed, and a distillation student;
# evaluate and predict run on cuda; bench/bench_gpu.py measures throughput. GPU_CHECK_DEVICE=cpu runs the same
# script on a CPU (gloo, fp32; with GPU_CHECK_WHEELS= and PYTHON=.venv/bin/python) as a rehearsal. Writes OUT/gpu_check.json and OUT/gpu_check.md; the log is
# OUT/gpu_check.log.
set -uo pipefail
OUT=${1:-runs/gpu-check}
DATA=${GPU_CHECK_DATA:-gpu-check-data}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS-.whl}  # GPU_CHECK_WHEELS= (empty): use the packages already installed (the CPU rehearsal)
mkdir -p "$OUT" && : > "$OUT/steps.txt" && : > "$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f "$DATA/shards/manifest.json" ] || { echo "gpu_check: $DATA/shards: no shards (make them first: $PY bench/gpu_check.py data $DATA)"; exit 2; }
if [ "$DEVICE" = cuda ]; then
  PRECISION=bf16
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_check: no CUDA device"; exit 2; }
else
  PRECISION=fp32; export DS_ACCELERATOR=cpu
fi

step() {  # name, command...: runs it, logs its output, records status and seconds
  local name=$1 start=$SECONDS status=ok; shift
  echo "== $name: $*" >> "$OUT/gpu_check.log"
  "$@" >> "$OUT/gpu_check.log" 2>&1 || status=failed
  echo "$name $status $((SECONDS - start))" >> "$OUT/steps.txt"
  echo "gpu_check: $name $status ($((SECONDS - start)) s)"
}
RUNS=$OUT/runs
COMMON=(run.out_dir="$RUNS" data.shards="$DATA/shards" precision=$PRECISION log.progress=false data.num_workers=4
        data.epoch_samples=64 train.grad_accum=1)
train() { $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m hpcdistill train "$@"; }
summary_to() { local file=$1; shift; train "$@" > "$file"; }

kill_and_resume() {  # the teacher killed (SIGKILL, torchrun and its worker) once a checkpoint is complete, resumed
  local args=(configs/demo/teacher.yaml "${COMMON[@]}" train.epochs=4 train.checkpoint_every_steps=16)
  train "${args[@]}" &
  local pid=$!
  for _ in $(seq 1200); do
    compgen -G "$RUNS/teacher/checkpoints/*/COMPLETE" > /dev/null && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.25
  done
  pkill -9 -f "run.out_dir=$RUNS"  # torchrun starts its worker in a session of its own: kill both, like a preemption
  wait $pid 2>/dev/null
  [ ! -f "$RUNS/teacher/last.pt" ] || { echo "the teacher finished before it could be killed"; return 1; }
  echo "killed after $(ls "$RUNS/teacher/checkpoints")"
  summary_to "$OUT/teacher.json" "${args[@]}"
  grep -q '"global_step": 256' "$OUT/teacher.json"
}
step teacher_kill_resume kill_and_resume
step distill summary_to "$OUT/distill.json" configs/demo/distill.yaml "${COMMON[@]}" train.epochs=2 \
  teacher.checkpoint="$RUNS/teacher/best.pt" data.mag=2.5
step evaluate $PY -m hpcdistill evaluate "$RUNS/distill-2.5x/best.pt" --shards "$DATA/shards" --device $DEVICE \
  --iterations 1000 --out "$OUT/eval"
TEST_SLIDES=$(tr -d '\r' < "$DATA/slides/labels.csv" | awk -F, -v d="$DATA/slides" '$4 == "test" {print d "/" $1}')
step predict $PY -m hpcdistill predict "$RUNS/distill-2.5x/best.pt" $TEST_SLIDES --device $DEVICE \
  --out "$OUT/predict" --heatmap
QUICK=(); [ "$DEVICE" = cuda ] || QUICK=(--quick)
step bench $PY bench/bench_gpu.py "${QUICK[@]}" --out "$OUT/bench" --shards "$DATA/shards"
$PY bench/gpu_check.py summary "$OUT"
