#!/usr/bin/env bash
# The RGB smoke (issue 11): a coloured-shapes image folder built offline, a teacher trained on it by the bench,
# a 1-step progressive student distilled from that teacher, and the bench again with the student's row; all in
# the quick profile (about 5 minutes on 2 cores).  `bash benchmarks/rgb-smoke.sh [full]` runs the full profile.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
FS="$PY -m fewstep"
PROFILE=${1:-quick}
[ -d cache/shapes16 ] || $PY -m fewstep.data.shapes cache/shapes16 3000 16
$FS bench shapes.yaml --profile "$PROFILE"
if [ "$PROFILE" = quick ]; then TEACHER=cache/shapes-teacher-v2-quick OUT=cache/students/shapes-v2-quick-progressive ITERS=200
else TEACHER=cache/shapes-teacher OUT=cache/students/shapes-progressive ITERS=400; fi
if [ ! -f "$OUT/student/config.json" ]; then
  RESUME=(); [ -d "$OUT" ] && RESUME=(--resume)
  $FS distill --teacher "$TEACHER" --method progressive --guidance 2 --start-steps 4 --steps 1 --iters "$ITERS" \
    --lr 5e-4 --out "$OUT" "${RESUME[@]}"
fi
$FS bench shapes.yaml --profile "$PROFILE"
