#!/usr/bin/env bash
# Distil the benchmark's students from a cached teacher (issues 4, 13):
#   benchmarks/students.sh digits|mnist|fashion [METHOD ...]
# Each student goes to benchmarks/cache/students/<data>-<method>/student (earlier stages beside it); a second run
# resumes an interrupted distillation or skips a finished one.  The bench configs list these folders.
set -euo pipefail
cd "$(dirname "$0")"
FS=${FS:-../.venv/bin/python -m fewstep}
DATA=${1:?usage: students.sh digits|mnist|fashion [METHOD ...]}
shift
TEACHER=cache/$DATA-teacher
[ "$DATA" = mnist ] && TEACHER=cache/mnist-teacher-tiny28
[ "$DATA" = fashion ] && TEACHER=teachers/fashion-tiny28  # committed: every session distils the same teacher
[ -f "$TEACHER/config.json" ] || { echo "no teacher in $TEACHER: run fewstep bench $DATA.yaml first"; exit 2; }
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(progressive guided consistency reflow ct)

distill_as() {  # distill_as NAME METHOD ARGS...: into cache/students/<data>-NAME
  local out=cache/students/$DATA-$1 resume=()
  # a student committed to benchmarks/students/ (its run folder without checkpoints) is reused, not distilled again
  if [ ! -d "$out" ] && [ -f "students/$DATA-$1/student/config.json" ]; then
    mkdir -p cache/students && cp -r "students/$DATA-$1" "$out"
    echo "== $DATA $1: the committed run in students/$DATA-$1"
    return 0  # finished; it has no checkpoints, so --resume would start it again
  fi
  [ -d "$out" ] && resume=(--resume)
  echo "== $DATA $1 ($2) -> $out"
  $FS distill --method "$2" --out "$out" "${@:3}" "${resume[@]}"
}
distill() { distill_as "$1" "$@"; }  # distill METHOD ARGS...

if [ "$DATA" = fashion ]; then  # issue 13's one-step methods; one thread each (OMP_NUM_THREADS=1)
  # Measured rates on one thread (2026-12-02, the other core busy): dmd2 --steps 1 0.30-0.35 it/s (1,500 iterations
  # ~75 min, plus 300 eps -> v iterations at 0.73 it/s), gan width 32 2.8 it/s, boot 0.57, consistency 0.57 (+ its
  # eps -> v stage), progressive 0.69 a stage.  All of it is about 8 core-hours: two jobs at a time, several sessions.
  [ ${#@} -gt 0 ] || METHODS=(dmd2 cgan boot consistency progressive dmd2-2 dmd2-4)
  for m in "${METHODS[@]}"; do
    case $m in
      # the GAN baseline: no teacher; at least as many generator updates (4,000 vs 300) and as much wall time as
      # dmd2 gets (its 1,500 iterations took 6,815 s on 2026-12-02; 20,000 at 2.8 it/s: ~7,100 s)
      cgan) distill_as cgan gan --data fashion --iters 20000 --set width=32 --set eval_every=5000 --set eval_n=1000 ;;
      dmd2) distill dmd2 --teacher "$TEACHER" --guidance 2 --steps 1 --iters 1500 --set eval_every=300 \
              --set eval_n=1000 ;;
      dmd2-[24]) distill_as "$m" dmd2 --teacher "$TEACHER" --guidance 2 --steps "${m#dmd2-}" --iters 1500 \
                   --set eval_every=300 --set eval_n=1000 ;;
      boot) distill boot --teacher "$TEACHER" --guidance 2 --iters 1500 --set eval_every=300 --set eval_n=1000 ;;
      consistency) distill consistency --teacher "$TEACHER" --guidance 2 --steps 1 --reparam-iters 300 --iters 1000 \
                     --teacher-steps 50 --lr 5e-4 --set eval_every=300 --set eval_n=1000 ;;
      progressive) distill progressive --teacher "$TEACHER" --guidance 2 --start-steps 8 --steps 1 --iters 300 \
                     --lr 5e-4 ;;
      *) echo "students.sh: no fashion settings for $m"; exit 2 ;;
    esac
  done
  exit 0
fi

if [ "$DATA" = mnist ]; then  # a 28x28 teacher step costs ~10x a digits one: smaller budgets, two methods
  for m in "${METHODS[@]}"; do
    case $m in
      progressive) distill progressive --teacher "$TEACHER" --guidance 2 --start-steps 4 --steps 1 --iters 250 \
                     --lr 5e-4 ;;
      # starts from the progressive run's eps -> v stage (guidance 2 baked in): add its time when comparing
      consistency) distill consistency --teacher cache/students/mnist-progressive/round_reparam --steps 1 \
                     --iters 600 --teacher-steps 50 --lr 5e-4 ;;
      # issue 13's one-step methods, at fashion's settings (the same tiny28 network and rates)
      dmd2) distill dmd2 --teacher "$TEACHER" --guidance 2 --steps 1 --iters 1500 --set eval_every=300 \
              --set eval_n=1000 ;;
      boot) distill boot --teacher "$TEACHER" --guidance 2 --iters 1500 --set eval_every=300 --set eval_n=1000 ;;
      *) echo "students.sh: no mnist settings for $m"; exit 2 ;;
    esac
  done
  exit 0
fi

for m in "${METHODS[@]}"; do
  case $m in
    # the bench samples the teacher at guidance 2: students bake that scale in (guided: takes it as an input)
    progressive) distill progressive --teacher "$TEACHER" --guidance 2 --start-steps 16 --steps 1 --iters 400 --lr 5e-4 ;;
    guided) distill guided --teacher "$TEACHER" --guidance-range 1,3 --start-steps 16 --steps 1 --iters 400 --lr 5e-4 ;;
    consistency) distill consistency --teacher "$TEACHER" --guidance 2 --steps 1 --reparam-iters 400 --iters 2000 \
                   --teacher-steps 50 --lr 5e-4 ;;
    reflow) distill reflow --teacher "$TEACHER" --guidance 2 --steps 1 --pairs 4000 --teacher-steps 20 --iters 1500 \
              --lr 5e-4 ;;
    # --steps 2 records iCT's two-step schedule (sigma 80, 0.821); 1 step is the first of it
    ct) distill ct --data "$DATA" --steps 2 --iters 3000 --lr 5e-4 ;;
    *) echo "unknown method $m"; exit 2 ;;
  esac
done
