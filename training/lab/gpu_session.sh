#!/bin/sh
# ./session.sh RUNS [MINUTES [PACK]]: one GPU session's runs, all at once under one deadline
# (default 9 minutes), each in a run directory of RUNS named for its part:
#   - teacher: default_gpu; then student-80 and student-200: student_gpu distilled from it for 80
#     and 200 epochs (the held-out split chooses between them back here);
#   - port: the port at airbench94's settings, monitored on the test split (time to 94%);
#   - study/: the seed's study at its own epoch budgets, 10 processes;
#   - reference: where AIRBENCH94 names airbench94.py and PyTorch is there, the reference itself on
#     the same images (a measurement: the file is not the project's).
# A run the deadline stops resumes from its last epoch the next time. With PACK, RUNS is packed
# for the trip back into PACK/session.tar.part00, ... (15 MB each; finished runs without their
# checkpoints). Back here: cat session.tar.part* | tar -x -C runs/gpu; make export RUN=runs/gpu/...
# TEACHER, STUDENT, PORT, STUDY (configurations), STUDENT_EPOCHS and OPTIONS (appended to the
# options of every training run and of the study) override the plan.
set -u
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { echo "usage: ./session.sh RUNS [MINUTES [PACK]]" >&2; exit 2; }
runs=$(mkdir -p "$1" && cd "$1" && pwd); minutes=${2:-9}; pack=${3:-}
TEACHER=${TEACHER:-default_gpu} STUDENT=${STUDENT:-student_gpu} PORT=${PORT:-airbench94}
STUDY=${STUDY:-base1,base2,base3,vgg3_bn,vgg3_l2,vgg3_dropout,vgg3_aug,final_centered,final_normalized,final}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-80 200} OPTIONS=${OPTIONS:-}
deadline=$(( $(date +%s) + minutes * 60 ))
"$here/run.sh" unpack || exit 1  # once, before the runs share it

# run NAME ARGS...: run.sh ARGS until the deadline (its whole process group), output in RUNS/NAME.log
run() {
    name=$1; shift
    left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 0 ] || { echo "$name: no time left" >>"$runs/$name.log"; return 1; }
    echo "$(date -u +%T) $name: start, ${left} s left"
    timeout -s KILL "$left" "$here/run.sh" "$@" >>"$runs/$name.log" 2>&1
    status=$?
    echo "$(date -u +%T) $name: exit $status"
    return $status
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$runs/gpu.txt" 2>&1
# shellcheck disable=SC2086
{ run teacher "$TEACHER" "$runs/teacher" $OPTIONS &&
  for epochs in $STUDENT_EPOCHS; do
      run "student-$epochs" "$STUDENT" "$runs/student-$epochs" --teacher "$runs/teacher" --epochs "$epochs" $OPTIONS &
  done && wait; } &
# shellcheck disable=SC2086
run port "$PORT" "$runs/port" $OPTIONS &
# shellcheck disable=SC2086
run study study "$runs/study" --configs "$STUDY" --jobs 10 $OPTIONS &
if [ -n "${AIRBENCH94:-}" ]; then
    run reference reference "$runs/reference" "$AIRBENCH94" &
fi
wait
echo "$(date -u +%T) all done"
[ -n "$pack" ] || exit 0
mkdir -p "$pack"
# Finished runs (their weights file written) travel without checkpoints; the others keep theirs to resume.
exclude=$(cd "$runs" && for state in $(find . -name weights.float16.npz); do echo "--exclude=$(dirname "$state")/checkpoints"; done)
# shellcheck disable=SC2086
tar -cf - -C "$runs" $exclude . | split -b 15000000 -d -a 2 - "$pack/session.tar.part"
ls -l "$pack"
