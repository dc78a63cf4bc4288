#!/usr/bin/env bash
# Train EntityCLIP on one GPU. Rerunning the same command after an interruption
# resumes from the latest checkpoint in WORKDIR. Exits with training's status:
# 0 done, 75 stopped early and saved (SIGTERM, Ctrl-C: rerun to resume, e.g. a
# scheduler's requeue), anything else an error.
#
# Usage: [CONFIG=...] [WORKDIR=...] launch/gpu_train.sh [--dry-run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: [VAR=value ...] launch/gpu_train.sh [--dry-run]

Settings (environment variables, defaults in brackets):
  CONFIG       training config [configs/n24news.py]
  WORKDIR      checkpoint and log directory, local or gs:// [runs/entityclip]
  TRAIN_ARGS   extra arguments for entityclip train, e.g. --config.data.dir=...
  VENV         virtual environment to create or use [.venv-gpu]
  INSTALL      0: skip installing, use VENV as it is [1]
  JAX_CUDA     jax extra for the CUDA version of the machine [cuda12]
  JAX_VERSION  jax version [0.10.2]
  DRY_RUN      1: print the commands instead of running them (same as --dry-run)
USAGE
}

parse_flags "$@"

CONFIG="${CONFIG:-configs/n24news.py}"
WORKDIR="${WORKDIR:-runs/entityclip}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
VENV="${VENV:-.venv-gpu}"
JAX_CUDA="${JAX_CUDA:-cuda12}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"

install_gpu_venv "$VENV"
read -r -a extra <<< "$TRAIN_ARGS"
STOPPED_EARLY=75  # entityclip's "stopped early, everything saved: rerun to resume" (README, "Exit statuses")
status=0
run "$VENV/bin/entityclip" train --config "$CONFIG" --workdir "$WORKDIR" "${extra[@]}" || status=$?
case "$status" in
  0) say "training finished; checkpoints in $WORKDIR" ;;
  "$STOPPED_EARLY") say "training stopped early and saved in $WORKDIR (exit status $STOPPED_EARLY): rerun this script to resume" ;;
  *) say "training failed (exit status $status); its message is above" ;;
esac
exit "$status"
