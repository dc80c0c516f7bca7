#!/usr/bin/env bash
# paced_two_stage.sh: submit PACED's two-stage chain to SLURM, or report on a submitted one.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage:
  paced_two_stage.sh RECIPE [options]     submit the chain; prints the job ids and the run directory
  paced_two_stage.sh status RUN_DIR       state of every job; names a failed job and its log

The chain (one sbatch job each, linked by --dependency):
  references   teacher reference responses                    (no dependency)
  rollouts     rollout service, publishes RUN_DIR/rollouts.addr (no dependency, runs alongside)
  estimate0    pass rates of the base student                 (after rollouts has started)
  stage1       forward-KL training, `train --stage fkl`       (afterok references, estimate0)
  estimate1    pass rates of the stage-1 checkpoint           (afterok stage1)
  stage2       reverse-KL training, `train --stage rkl`       (afterok estimate1)
  eval         evaluation of the final student                (afterok stage2)
  finish       stops the rollout service                      (afterany of all the above)
Self-distillation (--teacher self, self:current or self:initial; docs/self_distillation.md): the
student is its own teacher, conditioned on each problem's solution or answer. No references job and
no forward-KL stage (chain.env records PACED_SCHEDULE=self, else two-stage, for the job scripts):
  rollouts, estimate0   as above
  self         reverse-KL self-distillation from --student, `train --stage rkl --teacher self..`
               (afterok estimate0); pass rates refreshed by the recipe as in stage2
  eval         evaluation of RUN_DIR/self/final               (afterok self)
  finish       stops the rollout service                      (afterany of all the above)
Frontier teacher (--teacher-engine; docs/frontier_teacher.md): the teacher runs only in its own
service job, and no training job loads its weights. Two jobs join the two-stage chain:
  teacher      teacher service `nemo-paced serve-teacher` on its own nodes, GPUs and image,
               publishes RUN_DIR/teacher.addr                 (no dependency, runs alongside)
  cache        `nemo-paced teacher-cache` through that service: top-k of every reference, problems at
               weight 0 under estimate0's table skipped, in RUN_DIR/teacher-cache
                                                              (afterok references, estimate0)
  stage1 trains from the cache (`--teacher-cache`, afterok cache), stage2 has its samples scored by
  the service (`--teacher-service RUN_DIR/teacher.addr`); finish stops both services. The references
  job generates with the teacher in-process (make-references --engine) on one node with the teacher's
  image and GPUs per node, or, with --teacher-engine openai, through that same server, without GPUs.
A failed job's dependents are cancelled at once (--kill-on-invalid-dep=yes) and never run.
Training jobs are submitted with --requeue and --signal=B:USR1@SECONDS: near the time limit they
save a checkpoint, requeue themselves and resume from it.

Every option has an environment variable; the flag wins.
Data and models:
  --problems PATH       PACED_PROBLEMS     training problems (JSONL, Parquet or HF dataset)   [required]
  --teacher DIR         PACED_TEACHER      teacher model, or self[:current|:initial]            [required]
  --student DIR         PACED_STUDENT      base student model                                  [required]
  --benchmarks 'A B'    PACED_BENCHMARKS   evaluation sets, space-separated                    [required]
  --run-dir DIR         PACED_RUN_DIR      where everything goes (default ./runs/RECIPE-DATE-TIME)
  --k N                 PACED_K            rollouts per problem for the pass rates (default 8)
  --engine hf|vllm      PACED_ENGINE       engine of the rollout service and the references (default vllm)
  --eval-engine hf|vllm PACED_EVAL_ENGINE  evaluation engine (default hf)
  --stage-split F       PACED_STAGE_SPLIT  share of the recipe's training steps spent in stage 1, 0 < F < 1
                                           (default 0.5)
  --train-args 'k=v ..' PACED_TRAIN_ARGS   recipe config overrides for both training stages
                        Training jobs run `nemo-paced train --recipe RECIPE --stage fkl|rkl --init .. --teacher ..
                        --problems .. --references .. --passrates .. --service .. --out RUN_DIR/stage1|stage2
                        --split F`: the recipe maps the chain's files onto its own config. Stage 2 starts from
                        RUN_DIR/stage1/final, the student stage 1 exported in Hugging Face format.
  --service-args '..'   PACED_SERVICE_ARGS extra flags for `nemo-paced serve-rollouts` (e.g. '--template raw')
  --reference-args '..' PACED_REFERENCE_ARGS  extra flags for `nemo-paced make-references`
  --eval-args '..'      PACED_EVAL_ARGS    extra flags for `nemo-paced eval` (e.g. '--n 8 --max-tokens 2048')
Frontier teacher (all but --teacher-engine need it):
  --teacher-engine hf|vllm|openai  PACED_TEACHER_ENGINE  submit the frontier chain; engine of `serve-teacher`.
                                           vllm on more than one node: the job starts one `vllm serve`
                                           over all of them (tensor parallel over each node's GPUs, pipeline
                                           parallel over the nodes, API on 127.0.0.1:PACED_TEACHER_VLLM_PORT,
                                           default 8200) and the service drives it through the openai engine;
                                           openai: a server you run, named by --openai-url in --teacher-args
  --teacher-nodes N     PACED_TEACHER_NODES  nodes of the teacher service job (default 1)
  --teacher-gpus G      PACED_TEACHER_GPUS GPUs per teacher node, also of the references job unless
                                           the engine is openai (default: --aux-gpus)
  --teacher-image IMG   PACED_TEACHER_IMAGE container image of the teacher and references jobs
                                           (default: --image)
  --teacher-args '..'   PACED_TEACHER_ARGS extra flags for `nemo-paced serve-teacher` (e.g.
                                           '--tensor-parallel-size 8 --max-k 64')
  --teacher-vllm-args '..' PACED_TEACHER_VLLM_ARGS  extra flags for the teacher's multi-node `vllm serve`
  --teacher-k K         PACED_TEACHER_K    top-k log-probs per token kept in the cache (default 64); the
                                           reverse-KL stage's k is the recipe's (tiny_cpu: teacher_k=K)
  --cache-args '..'     PACED_CACHE_ARGS   extra flags for `nemo-paced teacher-cache`: the training run's
                                           --template and kernel (--alpha --beta --weight-mode --unknown)
Cluster:
  --account A           PACED_ACCOUNT      sbatch --account
  --partition P         PACED_PARTITION    sbatch --partition
  --qos Q               PACED_QOS          sbatch --qos
  --nodes N             PACED_NODES        nodes per training job (default 1)
  --gpus-per-node G     PACED_GPUS_PER_NODE  GPUs (= ranks) per training node; 0 = CPU, one rank (default 8)
  --aux-gpus G          PACED_AUX_GPUS     GPUs of the reference, estimate and eval jobs (default 1)
  --rollout-nodes N     PACED_ROLLOUT_NODES  nodes of the rollout service job (default 1)
  --rollout-gpus G      PACED_ROLLOUT_GPUS GPUs per rollout service node (default: --aux-gpus). With --engine
                                           vllm and more GPUs than --rollout-tp, the job starts one vLLM
                                           data-parallel deployment over all of them (`vllm serve
                                           --data-parallel-size NODES*GPUS/TP`, API on 127.0.0.1:PACED_VLLM_PORT,
                                           default 8100) and the service drives it through the openai engine
  --rollout-tp T        PACED_ROLLOUT_TP   tensor parallelism of each student copy in that deployment (default 1)
  --vllm-args '..'      PACED_VLLM_ARGS    extra flags for that `vllm serve` (e.g. '--max-model-len 9216')
  --cpus-per-task C     PACED_CPUS_PER_TASK  CPUs per task (default: the cluster's default)
  --time T              PACED_TIME         time limit of each training job (default 04:00:00)
  --aux-time T          PACED_AUX_TIME     time limit of the reference, estimate and eval jobs (default 02:00:00)
  --service-time T      PACED_SERVICE_TIME time limit of the rollout service (default 1-00:00:00)
  --service-wait S      PACED_SERVICE_WAIT how long estimate jobs wait for the service's address (default 1800)
  --service-host H      PACED_SERVICE_HOST address the rollout service binds, reachable from the training
                                           nodes (default: the service node's first `hostname -I` address)
  --signal-seconds S    PACED_SIGNAL_SECONDS  warn training jobs S seconds before the limit (default 300)
  --max-requeues N      PACED_MAX_REQUEUES how often a training job may requeue itself (default 10)
  --sbatch-args '..'    PACED_SBATCH_ARGS  extra flags for every sbatch call
Container (pyxis/enroot; without an image the jobs run in the submitting environment):
  --image IMG           PACED_IMAGE        e.g. nvcr.io#nvidia/nemo:26.08 or a .sqsh file
  --mounts M            PACED_MOUNTS       extra container mounts, SRC:DST[,SRC:DST...]; RUN_DIR is always mounted
Other:
  --dry-run                                print the exact sbatch commands, submit nothing, write nothing
  --fail-stage NAME     PACED_FAIL_STAGE   make stage NAME exit 3 at once: checks a cluster's failure handling
  -h, --help

Without an image, jobs inherit the submitting shell's environment: activate the environment with
`nemo-paced` on PATH before submitting.
`status` exits 0 when the chain completed, 1 when a job failed, 3 while it is still running.
EOF
}

die() { echo "paced_two_stage.sh: $*" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STAGES=(references rollouts teacher estimate0 cache stage1 estimate1 stage2 self eval finish)

# ---------------------------------------------------------------------------------------- status
job_state() {  # JOBID -> "STATE REASON" from scontrol, then sacct; empty when SLURM forgot the job
  local info
  if info=$(scontrol show job -o "$1" 2>/dev/null); then
    sed -n 's/.*JobState=\([A-Z_]*\).*Reason=\([^ ]*\).*/\1 \2/p' <<<"$info"
  elif info=$(sacct -X -n -P -j "$1" -o State 2>/dev/null) && [ -n "$info" ]; then
    echo "${info%% *} None"
  fi
}

status() {
  local run=$1 stage id log state reason mark result=0 failed="" rows=()
  [ -s "$run/jobs.tsv" ] || die "$run/jobs.tsv not found: is $run a run directory made by this script?"
  while IFS=$'\t' read -r stage id log; do
    read -r state reason <<<"$(job_state "$id")"
    if [ -z "$state" ] && [ -s "$run/status/$stage" ]; then  # SLURM forgot it: the job's own record
      mark=$(cat "$run/status/$stage")
      state=FAILED; [[ $mark == exit=0\ * ]] && state=COMPLETED
      reason=${mark%% *}
    fi
    state=${state:-UNKNOWN}
    [ -e "$log" ] || log="-"
    rows+=("$(printf '%-10s %-8s %-10s %-26s %s' "$stage" "$id" "$state" "${reason:-None}" "$log")")
    # The services end cancelled by design; a service that breaks fails the jobs that use it instead.
    [ "$stage" = rollouts ] || [ "$stage" = teacher ] && continue
    case $state in
      COMPLETED) ;;
      CANCELLED) [ "$reason" = DependencyNeverSatisfied ] || failed=${failed:-$stage:$id:$log} ;;
      PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED | REQUEUE_HOLD | REQUEUE_FED | RESIZING | \
        SUSPENDED | SIGNALING | STAGE_OUT | STOPPED | SPECIAL_EXIT) result=3 ;;
      *) failed=${failed:-$stage:$id:$log} ;;  # FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, UNKNOWN, ...
    esac
  done <"$run/jobs.tsv"
  printf '%-10s %-8s %-10s %-26s %s\n' STAGE JOB STATE REASON LOG
  printf '%s\n' "${rows[@]}"
  if [ -n "$failed" ]; then
    IFS=: read -r stage id log <<<"$failed"
    echo "FAILED: stage $stage (job $id); its dependents were not run. Log: $log"
    return 1
  fi
  if [ "$result" = 3 ]; then echo "RUNNING: the chain has not finished yet"; else echo "COMPLETED"; fi
  return "$result"
}

if [ "${1:-}" = status ]; then
  [ $# = 2 ] || die "usage: paced_two_stage.sh status RUN_DIR"
  status "${2%/}"
  exit $?
fi

# ---------------------------------------------------------------------------------------- submit
case "${1:-}" in -h | --help | "") usage; exit 0 ;; -*) die "the first argument is the recipe name (see --help)" ;; esac
PACED_RECIPE=$1
shift
DRY_RUN=0
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || case $1 in --dry-run | -h | --help) ;; *) die "$1 needs a value" ;; esac
  # shellcheck disable=SC2034  # the settings are read through ${!var} below
  case $1 in
    --problems) PACED_PROBLEMS=$2 ;; --teacher) PACED_TEACHER=$2 ;; --student) PACED_STUDENT=$2 ;;
    --benchmarks) PACED_BENCHMARKS=$2 ;; --run-dir) PACED_RUN_DIR=$2 ;; --k) PACED_K=$2 ;;
    --engine) PACED_ENGINE=$2 ;; --eval-engine) PACED_EVAL_ENGINE=$2 ;;
    --stage-split) PACED_STAGE_SPLIT=$2 ;; --train-args) PACED_TRAIN_ARGS=$2 ;;
    --service-args) PACED_SERVICE_ARGS=$2 ;; --reference-args) PACED_REFERENCE_ARGS=$2 ;;
    --eval-args) PACED_EVAL_ARGS=$2 ;;
    --teacher-engine) PACED_TEACHER_ENGINE=$2 ;; --teacher-nodes) PACED_TEACHER_NODES=$2 ;;
    --teacher-gpus) PACED_TEACHER_GPUS=$2 ;; --teacher-image) PACED_TEACHER_IMAGE=$2 ;;
    --teacher-args) PACED_TEACHER_ARGS=$2 ;; --teacher-vllm-args) PACED_TEACHER_VLLM_ARGS=$2 ;;
    --teacher-k) PACED_TEACHER_K=$2 ;; --cache-args) PACED_CACHE_ARGS=$2 ;;
    --account) PACED_ACCOUNT=$2 ;; --partition) PACED_PARTITION=$2 ;; --qos) PACED_QOS=$2 ;;
    --nodes) PACED_NODES=$2 ;; --gpus-per-node) PACED_GPUS_PER_NODE=$2 ;; --aux-gpus) PACED_AUX_GPUS=$2 ;;
    --rollout-nodes) PACED_ROLLOUT_NODES=$2 ;; --rollout-gpus) PACED_ROLLOUT_GPUS=$2 ;;
    --rollout-tp) PACED_ROLLOUT_TP=$2 ;; --vllm-args) PACED_VLLM_ARGS=$2 ;;
    --cpus-per-task) PACED_CPUS_PER_TASK=$2 ;; --time) PACED_TIME=$2 ;; --aux-time) PACED_AUX_TIME=$2 ;;
    --service-time) PACED_SERVICE_TIME=$2 ;; --service-host) PACED_SERVICE_HOST=$2 ;;
    --service-wait) PACED_SERVICE_WAIT=$2 ;; --signal-seconds) PACED_SIGNAL_SECONDS=$2 ;;
    --max-requeues) PACED_MAX_REQUEUES=$2 ;; --sbatch-args) PACED_SBATCH_ARGS=$2 ;;
    --image) PACED_IMAGE=$2 ;; --mounts) PACED_MOUNTS=$2 ;; --fail-stage) PACED_FAIL_STAGE=$2 ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done

: "${PACED_K:=8}" "${PACED_ENGINE:=vllm}" "${PACED_EVAL_ENGINE:=hf}" "${PACED_STAGE_SPLIT:=0.5}"
: "${PACED_NODES:=1}" "${PACED_GPUS_PER_NODE:=8}" "${PACED_AUX_GPUS:=1}" "${PACED_TIME:=04:00:00}"
: "${PACED_AUX_TIME:=02:00:00}" "${PACED_SERVICE_TIME:=1-00:00:00}" "${PACED_SIGNAL_SECONDS:=300}"
: "${PACED_ROLLOUT_NODES:=1}" "${PACED_ROLLOUT_GPUS:=$PACED_AUX_GPUS}" "${PACED_ROLLOUT_TP:=1}" "${PACED_VLLM_PORT:=8100}"
: "${PACED_MAX_REQUEUES:=10}" "${PACED_SERVICE_WAIT:=1800}" "${PACED_RUN_DIR:=runs/$PACED_RECIPE-$(date +%Y%m%d-%H%M%S)}"
: "${PACED_TEACHER_NODES:=1}" "${PACED_TEACHER_GPUS:=$PACED_AUX_GPUS}" "${PACED_TEACHER_K:=64}" "${PACED_TEACHER_VLLM_PORT:=8200}"

for var in PACED_PROBLEMS PACED_TEACHER PACED_STUDENT PACED_BENCHMARKS; do
  [ -n "${!var:-}" ] || die "$var is not set: give --$(tr '[:upper:]_' '[:lower:]-' <<<"${var#PACED_}") (see --help)"
done
for var in PACED_K PACED_NODES PACED_GPUS_PER_NODE PACED_AUX_GPUS PACED_SIGNAL_SECONDS PACED_MAX_REQUEUES \
  PACED_SERVICE_WAIT PACED_ROLLOUT_NODES PACED_ROLLOUT_GPUS PACED_ROLLOUT_TP PACED_VLLM_PORT PACED_TEACHER_NODES \
  PACED_TEACHER_GPUS PACED_TEACHER_K PACED_TEACHER_VLLM_PORT; do
  [[ ${!var} =~ ^[0-9]+$ ]] || die "$var must be a whole number, got '${!var}'"
done
[ "$PACED_ROLLOUT_NODES" -ge 1 ] && [ "$PACED_ROLLOUT_TP" -ge 1 ] ||
  die "PACED_ROLLOUT_NODES and PACED_ROLLOUT_TP must be at least 1"
if [ $((PACED_ROLLOUT_NODES * PACED_ROLLOUT_GPUS)) -gt 1 ]; then
  [ "$PACED_ENGINE" = vllm ] || die "a rollout service on more than one GPU runs vLLM data parallelism: it needs --engine vllm, got '$PACED_ENGINE'"
  [ $((PACED_ROLLOUT_GPUS % PACED_ROLLOUT_TP)) = 0 ] ||
    die "PACED_ROLLOUT_GPUS ($PACED_ROLLOUT_GPUS) must be a multiple of PACED_ROLLOUT_TP ($PACED_ROLLOUT_TP)"
fi
[ -z "${PACED_CPUS_PER_TASK:-}" ] || [[ $PACED_CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] ||
  die "PACED_CPUS_PER_TASK must be a positive whole number, got '$PACED_CPUS_PER_TASK'"
[[ $PACED_STAGE_SPLIT =~ ^0?\.[0-9]*[1-9][0-9]*$ ]] ||
  die "PACED_STAGE_SPLIT must be a fraction strictly between 0 and 1 (both stages train), got '$PACED_STAGE_SPLIT'"
case $PACED_ENGINE in hf | vllm) ;; *) die "PACED_ENGINE must be hf or vllm, got '$PACED_ENGINE'" ;; esac
case $PACED_EVAL_ENGINE in hf | vllm) ;; *) die "PACED_EVAL_ENGINE must be hf or vllm, got '$PACED_EVAL_ENGINE'" ;; esac
if [ -n "${PACED_TEACHER_ENGINE:-}" ]; then  # the frontier chain: the teacher in its own service job
  case $PACED_TEACHER_ENGINE in hf | vllm | openai) ;;
    *) die "PACED_TEACHER_ENGINE must be hf, vllm or openai, got '$PACED_TEACHER_ENGINE'" ;; esac
  [ "$PACED_TEACHER_NODES" -ge 1 ] && [ "$PACED_TEACHER_K" -ge 1 ] || die "PACED_TEACHER_NODES and PACED_TEACHER_K must be at least 1"
  [ "$PACED_TEACHER_NODES" = 1 ] || [ "$PACED_TEACHER_ENGINE" = vllm ] ||
    die "a teacher service on more than one node runs one multi-node vLLM deployment: it needs --teacher-engine vllm, got '$PACED_TEACHER_ENGINE'"
  [ "$PACED_TEACHER_ENGINE" != openai ] || [[ " ${PACED_TEACHER_ARGS:-} " == *" --openai-url "* ]] ||
    die "--teacher-engine openai drives a server you run: name it with --teacher-args '--openai-url http://HOST:PORT'"
  case ${PACED_TEACHER:-} in self | self:*) die "a frontier teacher (--teacher-engine) is a model directory, not the self-teacher '$PACED_TEACHER'" ;; esac
else
  for var in PACED_TEACHER_ARGS PACED_TEACHER_VLLM_ARGS PACED_TEACHER_IMAGE PACED_CACHE_ARGS; do
    [ -z "${!var:-}" ] || die "$var applies to the frontier chain only: give --teacher-engine hf|vllm|openai too"
  done
fi
if [ -n "${PACED_FAIL_STAGE:-}" ] && [[ " ${STAGES[*]} " != *" $PACED_FAIL_STAGE "* ]]; then
  die "PACED_FAIL_STAGE must be one of: ${STAGES[*]}; got '$PACED_FAIL_STAGE'"
fi
# Local paths become absolute (jobs may start elsewhere, or in a container); other values, such as
# a Hugging Face dataset name, pass unchanged.
absolute() { if [ -e "$1" ]; then realpath "$1"; else echo "$1"; fi; }
PACED_PROBLEMS=$(absolute "$PACED_PROBLEMS")
case $PACED_TEACHER in
  self | self:current | self:initial) PACED_SCHEDULE=self ;;
  self:*) die "PACED_TEACHER: the self-teacher is self, self:current or self:initial; got '$PACED_TEACHER'" ;;
  *) PACED_SCHEDULE=two-stage; PACED_TEACHER=$(absolute "$PACED_TEACHER") ;;
esac
PACED_STUDENT=$(absolute "$PACED_STUDENT")
read -r -a benchmarks <<<"$PACED_BENCHMARKS"
for i in "${!benchmarks[@]}"; do benchmarks[i]=$(absolute "${benchmarks[i]}"); done
PACED_BENCHMARKS=${benchmarks[*]}
mkdir_abs() { [ "$DRY_RUN" = 1 ] || mkdir -p "$1"; case $1 in /*) echo "${1%/}" ;; *) echo "$PWD/${1%/}" ;; esac; }
RUN=$(mkdir_abs "$PACED_RUN_DIR")
PACED_RUN_DIR=$RUN
[ "$DRY_RUN" = 1 ] || [ ! -e "$RUN/jobs.tsv" ] || die "$RUN already holds a submitted chain (jobs.tsv); pick another --run-dir"

# Flags shared by every job, then per kind.
read -r -a common <<<"${PACED_SBATCH_ARGS:-}"
common+=(--parsable --kill-on-invalid-dep=yes --open-mode=append)
[ -n "${PACED_ACCOUNT:-}" ] && common+=(--account="$PACED_ACCOUNT")
[ -n "${PACED_PARTITION:-}" ] && common+=(--partition="$PACED_PARTITION")
[ -n "${PACED_QOS:-}" ] && common+=(--qos="$PACED_QOS")
[ -n "${PACED_CPUS_PER_TASK:-}" ] && common+=(--cpus-per-task="$PACED_CPUS_PER_TASK")
aux=(--nodes=1 --ntasks=1 --time="$PACED_AUX_TIME")
[ "$PACED_AUX_GPUS" -gt 0 ] && aux+=(--gpus-per-node="$PACED_AUX_GPUS")
service=(--nodes="$PACED_ROLLOUT_NODES" --ntasks-per-node=1 --time="$PACED_SERVICE_TIME")
[ "$PACED_ROLLOUT_NODES" = 1 ] && service=(--nodes=1 --ntasks=1 --time="$PACED_SERVICE_TIME")
[ "$PACED_ROLLOUT_GPUS" -gt 0 ] && service+=(--gpus-per-node="$PACED_ROLLOUT_GPUS")
train=(--nodes="$PACED_NODES" --time="$PACED_TIME" --requeue --signal=B:USR1@"$PACED_SIGNAL_SECONDS")
if [ "$PACED_GPUS_PER_NODE" -gt 0 ]; then
  train+=(--ntasks-per-node="$PACED_GPUS_PER_NODE" --gpus-per-node="$PACED_GPUS_PER_NODE")
else
  train+=(--ntasks-per-node=1)
fi
small=(--nodes=1 --ntasks=1 --time=00:05:00)
# The frontier chain: the teacher's job, and the references job on one of the teacher's nodes.
teacher=(--nodes="$PACED_TEACHER_NODES" --ntasks-per-node=1 --time="$PACED_SERVICE_TIME")
[ "$PACED_TEACHER_NODES" = 1 ] && teacher=(--nodes=1 --ntasks=1 --time="$PACED_SERVICE_TIME")
[ "$PACED_TEACHER_GPUS" -gt 0 ] && teacher+=(--gpus-per-node="$PACED_TEACHER_GPUS")
references=("${aux[@]}")
if [ -n "${PACED_TEACHER_ENGINE:-}" ]; then
  references=(--nodes=1 --ntasks=1 --time="$PACED_AUX_TIME")
  [ "$PACED_TEACHER_GPUS" -gt 0 ] && [ "$PACED_TEACHER_ENGINE" != openai ] && references+=(--gpus-per-node="$PACED_TEACHER_GPUS")
fi
cache=(--nodes=1 --ntasks=1 --time="$PACED_AUX_TIME")  # scoring happens in the teacher's job

chain_env() {  # the settings every job reads, as a file bash can source
  local var
  for var in PACED_RECIPE PACED_SCHEDULE PACED_RUN_DIR PACED_PROBLEMS PACED_TEACHER PACED_STUDENT PACED_BENCHMARKS PACED_K \
    PACED_ENGINE PACED_EVAL_ENGINE PACED_STAGE_SPLIT PACED_TRAIN_ARGS PACED_SERVICE_ARGS PACED_REFERENCE_ARGS PACED_EVAL_ARGS PACED_IMAGE PACED_MOUNTS \
    PACED_SERVICE_HOST PACED_SERVICE_WAIT PACED_MAX_REQUEUES PACED_FAIL_STAGE PACED_ROLLOUT_NODES PACED_ROLLOUT_GPUS \
    PACED_ROLLOUT_TP PACED_VLLM_ARGS PACED_VLLM_PORT PACED_TEACHER_ENGINE PACED_TEACHER_NODES PACED_TEACHER_GPUS \
    PACED_TEACHER_IMAGE PACED_TEACHER_ARGS PACED_TEACHER_VLLM_ARGS PACED_TEACHER_VLLM_PORT PACED_TEACHER_K PACED_CACHE_ARGS; do
    printf '%s=%q\n' "$var" "${!var:-}"
  done
}
if [ "$DRY_RUN" = 1 ]; then
  echo "# $RUN/chain.env, read by every job, would hold:"
  chain_env | sed 's/^/#   /'
  echo "# and $RUN/launch/ a copy of $HERE/jobs/."
else
  mkdir -p "$RUN/logs" "$RUN/launch"
  cp "$HERE"/jobs/*.sh "$HERE"/jobs/*.sbatch "$RUN/launch/"
  chain_env >"$RUN/chain.env"
fi

declare -A JOB
submitted=()
# submit STAGE SCRIPT DEPENDENCY [sbatch flags...] -- [script arguments...]
submit() {
  local stage=$1 script=$2 dep=$3 flags=() id
  shift 3
  while [ "$1" != -- ]; do flags+=("$1"); shift; done
  shift
  local cmd=(sbatch "${common[@]}" --job-name="paced-$stage" --output="$RUN/logs/$stage-%j.out" "${flags[@]}")
  [ -n "$dep" ] && cmd+=(--dependency="$dep")
  cmd+=("$RUN/launch/$script" "$RUN" "$stage" "$@")
  if [ "$DRY_RUN" = 1 ]; then
    # Placeholders ${JOB_x} stand for the ids the earlier commands print.
    echo "JOB_$stage=\$($(printf '%q ' "${cmd[@]}" | sed 's/\\\$\\{\(JOB_[a-z0-9]*\)\\}/${\1}/g; s/ $//'))"
    JOB[$stage]="\${JOB_$stage}"
    return
  fi
  if ! id=$("${cmd[@]}"); then
    echo "paced_two_stage.sh: sbatch failed for stage $stage; cancelling the jobs already submitted" >&2
    [ ${#submitted[@]} -gt 0 ] && scancel "${submitted[@]}"
    exit 1
  fi
  id=${id%%;*}
  JOB[$stage]=$id
  submitted+=("$id")
  printf '%s\t%s\t%s\n' "$stage" "$id" "$RUN/logs/$stage-$id.out" >>"$RUN/jobs.tsv"
  printf '%-10s %s\n' "$stage" "$id"
}

if [ "$PACED_SCHEDULE" = self ]; then
  submit rollouts rollouts.sbatch "" "${service[@]}" --
  submit estimate0 estimate.sbatch "after:${JOB[rollouts]}" "${aux[@]}" -- "${JOB[rollouts]}"
  submit self train.sbatch "afterok:${JOB[estimate0]}" "${train[@]}" -- rkl
  submit eval eval.sbatch "afterok:${JOB[self]}" "${aux[@]}" --
  submit finish finish.sbatch "afterany:${JOB[estimate0]}:${JOB[self]}:${JOB[eval]}" "${small[@]}" -- "${JOB[rollouts]}"
  if [ "$DRY_RUN" = 0 ]; then
    echo "run directory: $RUN"
    echo "follow it with: $0 status $RUN"
  fi
  exit 0
fi
submit references references.sbatch "" "${references[@]}" --
submit rollouts rollouts.sbatch "" "${service[@]}" --
if [ -n "${PACED_TEACHER_ENGINE:-}" ]; then
  submit teacher teacher.sbatch "" "${teacher[@]}" --
  submit estimate0 estimate.sbatch "after:${JOB[rollouts]}" "${aux[@]}" -- "${JOB[rollouts]}"
  submit cache cache.sbatch "afterok:${JOB[references]}:${JOB[estimate0]}" "${cache[@]}" -- "${JOB[teacher]}"
  submit stage1 train.sbatch "afterok:${JOB[cache]}" "${train[@]}" -- fkl
else
  submit estimate0 estimate.sbatch "after:${JOB[rollouts]}" "${aux[@]}" -- "${JOB[rollouts]}"
  submit stage1 train.sbatch "afterok:${JOB[references]}:${JOB[estimate0]}" "${train[@]}" -- fkl
fi
submit estimate1 estimate.sbatch "afterok:${JOB[stage1]}" "${aux[@]}" -- "${JOB[rollouts]}" "$RUN/stage1/final"
submit stage2 train.sbatch "afterok:${JOB[estimate1]}" "${train[@]}" -- rkl
submit eval eval.sbatch "afterok:${JOB[stage2]}" "${aux[@]}" --
after=("${JOB[references]}" "${JOB[estimate0]}")
services=("${JOB[rollouts]}")
if [ -n "${PACED_TEACHER_ENGINE:-}" ]; then after+=("${JOB[cache]}"); services+=("${JOB[teacher]}"); fi
after+=("${JOB[stage1]}" "${JOB[estimate1]}" "${JOB[stage2]}" "${JOB[eval]}")
submit finish finish.sbatch "afterany:$(IFS=:; echo "${after[*]}")" "${small[@]}" -- "${services[@]}"
if [ "$DRY_RUN" = 0 ]; then
  echo "run directory: $RUN"
  echo "follow it with: $0 status $RUN"
fi
