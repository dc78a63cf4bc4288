#!/usr/bin/env bash
# Evaluate a checkpoint on one GPU: Recall@1/5/10/50/100, median and mean rank,
# both directions, written as JSON, a Markdown table and a PNG plot under OUT.
#
# Usage: CHECKPOINT=... DATA=... [OUT=...] launch/gpu_eval.sh [--dry-run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: CHECKPOINT=... DATA=... [VAR=value ...] launch/gpu_eval.sh [--dry-run]

Settings (environment variables, defaults in brackets):
  CHECKPOINT   training workdir, towers directory, Hugging Face CLIPModel
               directory or OpenAI-layout .pt file (required)
  DATA         TFRecord directory written by `entityclip write-records` (required)
  SPLIT        split of DATA to evaluate [test]
  OUT          directory for the reports [eval_out]
  EVAL_ARGS    extra arguments for entityclip eval
  VENV         virtual environment to create or use [.venv-gpu]
  INSTALL      0: skip installing, use VENV as it is [1]
  JAX_CUDA     jax extra for the CUDA version of the machine [cuda12]
  JAX_VERSION  jax version [0.10.2]
  DRY_RUN      1: print the commands instead of running them (same as --dry-run)
USAGE
}

parse_flags "$@"

CHECKPOINT="${CHECKPOINT:-}"
DATA="${DATA:-}"
SPLIT="${SPLIT:-test}"
OUT="${OUT:-eval_out}"
EVAL_ARGS="${EVAL_ARGS:-}"
VENV="${VENV:-.venv-gpu}"
JAX_CUDA="${JAX_CUDA:-cuda12}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
[[ -n "$CHECKPOINT" ]] || die "set CHECKPOINT to the checkpoint to evaluate (see --help)"
[[ -n "$DATA" ]] || die "set DATA to the TFRecord directory to evaluate on (see --help)"

install_gpu_venv "$VENV"
read -r -a extra <<< "$EVAL_ARGS"
run "$VENV/bin/entityclip" eval --checkpoint "$CHECKPOINT" --data "$DATA" --split "$SPLIT" --out "$OUT" "${extra[@]}"
say "reports in $OUT"
