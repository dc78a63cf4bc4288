#!/usr/bin/env bash
# Train EntityCLIP on a multi-host TPU pod slice (v4-32, v5litepod-32, v6e-64, ...).
#
# A pod slice is several TPU VM hosts ("workers") behind one name. The recipe is
# the single-VM one (tpu_vm.sh) with pod defaults, because nothing else changes:
#  - the SAME `entityclip train` runs on every worker at once (--worker=all);
#  - on TPU, jax.distributed.initialize() discovers the other hosts by itself;
#  - each host reads its own share of the TFRecord shards (data on GCS);
#  - the global batch is sharded over every chip of the slice inside jit;
#  - every host writes its part of each Orbax checkpoint to the gs:// workdir,
#    and after a preemption the whole slice is re-created and resumes from it;
#  - before anything is created, `entityclip plan` compiles the step for the
#    slice here and stops the launch when it would not fit (PLAN=0 skips it).
#
# Usage: BUCKET=gs://my-bucket [ACCELERATOR_TYPE=v4-32] [VAR=value ...] launch/tpu_pod.sh [--dry-run]
# Every setting of tpu_vm.sh applies (launch/tpu_vm.sh --help).
set -euo pipefail

export ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
export TPU_NAME="${TPU_NAME:-entityclip-pod}"
export RUN_NAME="${RUN_NAME:-entityclip-pod}"

echo "note: $ACCELERATOR_TYPE: every worker runs the same command (tpu_vm.sh with pod defaults)" >&2

exec "$(dirname "${BASH_SOURCE[0]}")/tpu_vm.sh" "$@"
