#!/usr/bin/env bash
# Train EntityCLIP on a Cloud TPU VM (one host, or every host of a pod slice).
#
# First compiles the training step for ACCELERATOR_TYPE here (`entityclip plan`)
# and stops with its message when the run would not fit. Then creates the VM (or
# reuses it), installs this project with jax[tpu] on every worker, and runs `entityclip train` on all workers at once with the workdir on
# a GCS bucket. When the VM is preempted (spot/preemptible TPUs), it deletes and
# re-creates it, reinstalls and runs the same command again: training resumes
# from the latest Orbax checkpoint in the workdir.
#
# Usage: BUCKET=gs://my-bucket [VAR=value ...] launch/tpu_vm.sh [--dry-run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: BUCKET=gs://my-bucket [VAR=value ...] launch/tpu_vm.sh [--dry-run]

Settings (environment variables, defaults in brackets):
  BUCKET            gs:// bucket for checkpoints and logs (required)
  PROJECT           Google Cloud project [gcloud's configured project]
  ZONE              TPU zone [us-central2-b]
  TPU_NAME          VM name [entityclip]
  ACCELERATOR_TYPE  v4-8, v5litepod-8, v6e-8, v4-32 (a pod slice) ... [v4-8]
  RUNTIME_VERSION   TPU software version [chosen from ACCELERATOR_TYPE]
  SPOT              1: a spot VM (cheaper, can be preempted; the loop resumes) [0]
  CONFIG            training config [configs/n24news.py]
  RUN_NAME          run directory under the bucket [entityclip]
  WORKDIR           checkpoint directory [$BUCKET/$RUN_NAME]
  DATA              TFRecords directory (write-records --out) [$BUCKET/records]
  TRAIN_ARGS        extra arguments for entityclip train, e.g. --config.data.dir=gs://...
  JAX_VERSION       jax[tpu] version installed on the workers [0.10.2]
  MAX_RESTARTS      re-creations after preemption before giving up [20]
  POLL_SECONDS      wait between state checks while the VM is starting [30]
  DELETE_WHEN_DONE  1: delete the VM after training finishes [0]
  PLAN              0: skip `entityclip plan` (run here, before anything is created) [1]
  ENTITYCLIP        the local entityclip that plans [.venv/bin/entityclip if present, else entityclip]
  DRY_RUN           1: print the commands instead of running them (same as --dry-run)
USAGE
}

parse_flags "$@"

BUCKET="${BUCKET:-}"
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-entityclip}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
SPOT="${SPOT:-0}"
CONFIG="${CONFIG:-configs/n24news.py}"
RUN_NAME="${RUN_NAME:-entityclip}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
POLL_SECONDS="${POLL_SECONDS:-30}"
DELETE_WHEN_DONE="${DELETE_WHEN_DONE:-0}"
PLAN="${PLAN:-1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${ENTITYCLIP:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/entityclip" ]]; then ENTITYCLIP="$ROOT/.venv/bin/entityclip"; else ENTITYCLIP=entityclip; fi
fi

[[ "$BUCKET" == gs://* ]] || die "BUCKET must be a gs:// bucket (got '${BUCKET}'); every worker writes checkpoints there and a re-created VM resumes from it"
WORKDIR="${WORKDIR:-${BUCKET%/}/${RUN_NAME}}"
[[ "$WORKDIR" == gs://* ]] || die "WORKDIR must be on GCS (got '$WORKDIR'): a VM's local disk is lost when it is preempted"
DATA="${DATA:-${BUCKET%/}/records}"
[[ "$DATA" == gs://* ]] || die "DATA must be on GCS (got '$DATA'): every worker reads its share of the shards from it"

# The TPU software image depends on the chip generation.
default_runtime() {
  case "$1" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}"

GCLOUD_WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_WHERE+=(--project="$PROJECT")
ARCHIVE="${TMPDIR:-/tmp}/entityclip-jax-src.tar.gz"

# State of the VM: READY, CREATING, PREEMPTED, ... or NOT_FOUND. A dry run
# prints the query and pretends the state is DRY_RUN_STATE (default NOT_FOUND).
tpu_state() {
  local cmd=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_WHERE[@]}" --format='value(state)')
  if is_dry_run; then
    echo "+ $(quote "${cmd[@]}")" >&3
    echo "${DRY_RUN_STATE:-NOT_FOUND}"
  else
    "${cmd[@]}" 2>/dev/null || echo NOT_FOUND
  fi
}

create_vm() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  say "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_WHERE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
}

delete_vm() {
  say "deleting $TPU_NAME"
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_WHERE[@]}" --quiet
}

# Bring the VM to READY: reuse it, create it, or replace a preempted one.
ensure_vm() {
  local state
  while true; do
    state="$(tpu_state)"
    case "$state" in
      READY) say "$TPU_NAME is READY"; return 0 ;;
      NOT_FOUND|"") create_vm ;;
      PREEMPTED|TERMINATED|STOPPED) say "$TPU_NAME is $state"; delete_vm; create_vm ;;
      *) say "$TPU_NAME is $state; waiting ${POLL_SECONDS}s" ;;
    esac
    if is_dry_run; then return 0; fi
    sleep "$POLL_SECONDS"
  done
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_WHERE[@]}" --worker=all --command "$1"
}

# Copy this project's tree to every worker and install it with jax[tpu].
install_project() {
  say "installing the project with jax[tpu]==$JAX_VERSION on every worker"
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  run tar -czf "$ARCHIVE" -C "$root" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude=demo_out .
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:" "${GCLOUD_WHERE[@]}" --worker=all
  # torch from PyTorch's CPU index: the default wheel pulls gigabytes of CUDA.
  on_all_workers "$(and_then \
    "python3 -m venv ~/entityclip-venv" \
    ". ~/entityclip-venv/bin/activate" \
    "pip install -q --upgrade pip" \
    "rm -rf ~/entityclip-jax" "mkdir ~/entityclip-jax" \
    "tar -xzf ~/$(basename "$ARCHIVE") -C ~/entityclip-jax" \
    "cd ~/entityclip-jax" \
    "pip install -q --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt" \
    "pip install -q --no-deps -e ." \
    "pip install -q 'jax[tpu]==$JAX_VERSION'" \
    "python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'")"
}

# The same command on every worker: on TPU, jax.distributed.initialize() finds
# the other hosts by itself, and the training loop restores the latest
# checkpoint in WORKDIR when there is one.
train_on_all_workers() {
  say "training: workdir $WORKDIR"
  # pipefail: the exit status is training's, not tee's
  on_all_workers "$(and_then \
    "set -o pipefail" \
    ". ~/entityclip-venv/bin/activate" \
    "cd ~/entityclip-jax" \
    "entityclip train --config $CONFIG --workdir $WORKDIR --config.data.dir=$DATA${TRAIN_ARGS:+ $TRAIN_ARGS} 2>&1 | tee -a ~/train.log")"
}

# Before renting: the training step compiled here for ACCELERATOR_TYPE (no TPU needed). Exit 3 means
# it does not fit; the plan's own lines say what dominates and what to try. The data directory is
# left out: the records' context length only refines the plan, and reading gs:// here needs credentials.
plan_first() {
  if [[ "$PLAN" != 1 ]]; then say "PLAN=$PLAN: not planning"; return 0; fi
  local cmd=("$ENTITYCLIP" plan --config "$CONFIG" --accelerator "$ACCELERATOR_TYPE")
  # shellcheck disable=SC2206  # TRAIN_ARGS is split into words, as in the train command
  [[ -n "$TRAIN_ARGS" ]] && cmd+=($TRAIN_ARGS)
  if is_dry_run; then echo "+ $(quote "${cmd[@]}")" >&3; return 0; fi
  command -v "$ENTITYCLIP" >/dev/null || die "planning needs entityclip installed here ('make venv', or set ENTITYCLIP); PLAN=0 skips the plan"
  say "planning $CONFIG on $ACCELERATOR_TYPE before creating anything (PLAN=0 skips this)"
  local status=0
  (cd "$ROOT" && "${cmd[@]}") || status=$?
  case "$status" in
    0) ;;
    3) die "the run does not fit on $ACCELERATOR_TYPE (see the plan above); nothing was created" ;;
    *) die "entityclip plan failed (exit $status, see above); nothing was created; PLAN=0 skips the plan" ;;
  esac
}

restarts=0
plan_first
ensure_vm
install_project
until train_on_all_workers; do
  state="$(tpu_state)"
  if [[ "$state" == READY ]]; then
    die "training failed on a healthy VM (state READY), so this is not a preemption; read ~/train.log on the workers: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -50 ~/train.log'"
  fi
  restarts=$((restarts + 1))
  (( restarts <= MAX_RESTARTS )) || die "gave up after $MAX_RESTARTS re-creations; the checkpoints are in $WORKDIR"
  say "training stopped with the VM in state $state: re-creating it (restart $restarts of $MAX_RESTARTS)"
  ensure_vm
  install_project
done
say "training finished; checkpoints in $WORKDIR"
if [[ "$DELETE_WHEN_DONE" == 1 ]]; then delete_vm; fi
