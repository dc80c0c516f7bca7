# shellcheck shell=bash
# common.sh: sourced by every job script of the PACED chain as `source "$1/launch/common.sh" "$@"`.
# paced_two_stage.sh copies launch/jobs/ into RUN_DIR/launch/ at submission, so a requeued or late
# job runs the scripts the chain was submitted with, whatever happens to the checkout afterwards.
#
# Arguments of every job script: RUN_DIR STAGE [stage arguments...].
# Settings come from RUN_DIR/chain.env, written once by paced_two_stage.sh.
set -euo pipefail

PACED_RUN_DIR=$1
PACED_STAGE=$2
# shellcheck source=/dev/null
source "$PACED_RUN_DIR/chain.env"
mkdir -p "$PACED_RUN_DIR/status"

# Record how this job ended, so `paced_two_stage.sh status` can answer after SLURM forgot the job.
paced_record_exit() {
  local rc=$?
  echo "exit=$rc job=${SLURM_JOB_ID:-} restarts=${SLURM_RESTART_COUNT:-0} at=$(date -u +%FT%TZ)" \
    >"$PACED_RUN_DIR/status/$PACED_STAGE"
}
trap paced_record_exit EXIT

echo "[paced] stage $PACED_STAGE, job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0})," \
  "nodes ${SLURM_JOB_NODELIST:-?}, $(date -u +%FT%TZ)"

# The documented failure-injection knob: make one stage fail, to check on a cluster that its
# dependents never run and that `status` names it.
if [ "${PACED_FAIL_STAGE:-}" = "$PACED_STAGE" ]; then
  echo "[paced] failing on purpose: PACED_FAIL_STAGE=$PACED_FAIL_STAGE" >&2
  exit 3
fi

# srun arguments that run a step inside the container image through pyxis/enroot when one is
# configured. The run directory is mounted at the same path, so every path in chain.env means the
# same inside and out.
# The frontier chain's teacher and references jobs run the teacher's image (PACED_TEACHER_IMAGE) when
# one is given.
PACED_SRUN_ARGS=(--kill-on-bad-exit=1)
image=${PACED_IMAGE:-}
case $PACED_STAGE in teacher | references) image=${PACED_TEACHER_IMAGE:-$image} ;; esac
if [ -n "$image" ]; then
  PACED_SRUN_ARGS+=(--container-image="$image"
    --container-mounts="$PACED_RUN_DIR:$PACED_RUN_DIR${PACED_MOUNTS:+,$PACED_MOUNTS}"
    --container-workdir="$PACED_RUN_DIR")
fi

# One `nemo-paced` command as a single-task job step.
paced() {
  srun "${PACED_SRUN_ARGS[@]}" --ntasks=1 nemo-paced "$@"
}

# Wait until a service job ($1) has published its address file (RUN_DIR/$2, default rollouts.addr;
# $3 names the service). Fails at once when the job has ended or left the queue (a job still pending
# is waited for), and after PACED_SERVICE_WAIT seconds (default 1800).
paced_wait_for_service() {
  local addr=$PACED_RUN_DIR/${2:-rollouts.addr} name=${3:-rollout service} state
  local deadline=$((SECONDS + ${PACED_SERVICE_WAIT:-1800}))
  until [ -s "$addr" ]; do
    state=$(squeue -h -j "$1" -o %T 2>/dev/null || true)
    case $state in
      RUNNING | PENDING | CONFIGURING) ;;
      *)
        echo "[paced] the $name (job $1) is ${state:-no longer queued} and never published $addr;" \
          "see its log in $PACED_RUN_DIR/logs/" >&2
        return 1
        ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "[paced] the $name (job $1) did not publish $addr within ${PACED_SERVICE_WAIT:-1800} s" >&2
      return 1
    fi
    sleep 2
  done
}
