# Helpers shared by the launch scripts (sourced, not run).
#
# Dry run (--dry-run or DRY_RUN=1): every command that would change something
# is printed, one line each starting with "+ ", and nothing is executed. Lines
# go to the terminal even from inside $(...), through file descriptor 3.

DRY_RUN="${DRY_RUN:-0}"
exec 3>&1

# parse_flags "$@": accepts --dry-run and --help (the script defines usage()).
parse_flags() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      *) echo "unknown argument: $arg (settings are environment variables; see --help)" >&2; exit 2 ;;
    esac
  done
}

is_dry_run() { [[ "$DRY_RUN" == 1 ]]; }

# quote ARGS: the command as a shell line, quoting only what needs it.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  echo "${out[*]}"
}

# run CMD ARGS...: run it, or in a dry run print it.
run() {
  if is_dry_run; then
    echo "+ $(quote "$@")" >&3
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

say() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

die() { echo "error: $*" >&2; exit 1; }

# and_then STEP...: one shell line running the steps in order, stopping at the first failure.
and_then() {
  local line="$1" step
  shift
  for step in "$@"; do line+=" && $step"; done
  echo "$line"
}

# install_gpu_venv VENV: a virtual environment with this project and jax[$JAX_CUDA]
# (skipped when INSTALL=0). torch from PyTorch's CPU index: the project only
# uses it for checkpoint conversion, and the default wheel pulls gigabytes of CUDA.
install_gpu_venv() {
  local venv="$1" root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ "${INSTALL:-1}" != 1 ]]; then say "INSTALL=0: using $venv as it is"; return 0; fi
  say "installing the project with jax[$JAX_CUDA]==$JAX_VERSION into $venv"
  run python3 -m venv "$venv"
  run "$venv/bin/pip" install -q --upgrade pip
  run "$venv/bin/pip" install -q --extra-index-url https://download.pytorch.org/whl/cpu -r "$root/requirements.txt"
  run "$venv/bin/pip" install -q --no-deps -e "$root"
  run "$venv/bin/pip" install -q "jax[$JAX_CUDA]==$JAX_VERSION"
  # Fail early, before loading data, when jax sees no GPU (driver or CUDA mismatch).
  run "$venv/bin/python" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
}
