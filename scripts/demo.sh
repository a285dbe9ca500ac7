#!/usr/bin/env bash
# `make demo`: the main job in miniature.  Trains a class-conditional teacher on digits (cached: an
# interrupted run resumes, a finished one is reused), samples it with three samplers, distils it into a
# 1-step student (progressive distillation, guidance 2 baked in), evaluates both, and benchmarks them
# against diffusers' schedulers.  Grids, JSON, a summary and the report go under runs/demo/.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-runs/demo}
STEPS=${DEMO_STEPS:-2000}
FS="$PY -m fewstep"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

if [ -f "$OUT/teacher/checkpoints/latest" ]; then RESUME=--resume; else RESUME=; fi
start=$(date +%s)
$FS train --data digits --conditional --preset tiny8 --steps "$STEPS" --lr 1e-3 --out "$OUT/teacher" $RESUME
train_s=$(( $(date +%s) - start ))

{
  echo "fewstep demo ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo "teacher: digits, class-conditional DDPM (eps), preset tiny8, $STEPS steps; this run's train command took ${train_s} s"
  echo "(the teacher's own recorded training time is in $OUT/teacher/config.json, training.wall_seconds)"
} > "$SUMMARY"
for spec in "dpmpp-2m 10" "ddim 50" "heun 10"; do
  set -- $spec
  $FS sample --model "$OUT/teacher" --sampler "$1" --steps "$2" --guidance 2 --n 100 --seed 0 \
    --out "$OUT/samples_${1}_${2}.png" | tee -a "$SUMMARY"
done
$FS sample --model "$OUT/teacher" --sampler dpmpp-2m --steps 10 --guidance 2 --class 3 --n 16 \
  --out "$OUT/class3_dpmpp-2m_10.png" | tee -a "$SUMMARY"
$FS evaluate --model "$OUT/teacher" --sampler dpmpp-2m --steps 10 --guidance 2 --json "$OUT/evaluate.json" \
  | tee -a "$SUMMARY"
# 4 -> 2 -> 1 steps, 200 iterations a stage (about two minutes on 2 cores); the bench lists both students
if [ -d "$OUT/distill" ]; then DRESUME=--resume; else DRESUME=; fi
$FS distill --teacher "$OUT/teacher" --method progressive --guidance 2 --start-steps 4 --steps 1 \
  --iters "${DEMO_DISTILL_ITERS:-200}" --lr 5e-4 --out "$OUT/distill" $DRESUME | tee -a "$SUMMARY"
$FS sample --model "$OUT/distill/student" --n 100 --seed 0 --out "$OUT/samples_student_1step.png" | tee -a "$SUMMARY"
$FS evaluate --model "$OUT/distill/student" --json "$OUT/evaluate-student.json" | tee -a "$SUMMARY"
$FS bench scripts/demo-bench.yaml | tail -n 1 | tee -a "$SUMMARY"
echo "grids, evaluate.json and this summary are in $OUT/; open $OUT/bench/report.html" | tee -a "$SUMMARY"
