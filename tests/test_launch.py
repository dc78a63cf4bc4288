"""launch/ scripts: bash -n, dry runs with overridden settings, and the preemption
loop against a fake gcloud (no real gcloud, no GPU)."""
import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ["tpu_vm.sh", "tpu_pod.sh", "gpu_eval.sh", "gpu_train.sh"]


def launch(script, *args, env=None, path=None):
    environment = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": path or "/usr/bin:/bin"}
    environment.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=environment,
                          capture_output=True, text=True, timeout=60)


def commands(result):
    """The dry-run lines, each split into its words."""
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_executable_and_documented(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.access(LAUNCH / script, os.X_OK)
    assert script in (LAUNCH / "README.md").read_text()
    result = launch(script, "--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and not commands(result)


TPU_ENV = {"BUCKET": "gs://test-bucket", "PROJECT": "test-project", "ZONE": "europe-west4-a",
           "TPU_NAME": "my-tpu", "ACCELERATOR_TYPE": "v5litepod-8", "CONFIG": "configs/custom.py",
           "RUN_NAME": "run7", "TRAIN_ARGS": "--config.data.dir=gs://test-bucket/records", "SPOT": "1"}


def test_tpu_vm_dry_run_creates_installs_and_trains_on_all_workers():
    result = launch("tpu_vm.sh", "--dry-run", env=TPU_ENV)
    assert result.returncode == 0, result.stderr
    plan, *lines = commands(result)
    # first, before anything exists: the step planned here for the accelerator, with the train overrides
    assert os.path.basename(plan[0]) == "entityclip" and plan[1:] == [
        "plan", "--config", "configs/custom.py", "--accelerator", "v5litepod-8",
        "--config.data.dir=gs://test-bucket/records"]
    where = ["--zone=europe-west4-a", "--project=test-project"]
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    create = next(line for line in lines if line[4:5] == ["create"])
    assert create[5] == "my-tpu" and set(where) <= set(create) and "--spot" in create
    assert "--accelerator-type=v5litepod-8" in create and "--version=v2-alpha-tpuv5-lite" in create
    assert not any(line[4:5] == ["delete"] for line in lines)
    ssh = [line for line in lines if line[4:5] == ["ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in line and set(where) <= set(line) for line in ssh)
    install, train = (line[line.index("--command") + 1] for line in ssh)
    assert "pip install -q 'jax[tpu]==0.10.2'" in install and "pip install -q --no-deps -e ." in install
    assert ("entityclip train --config configs/custom.py --workdir gs://test-bucket/run7 "
            "--config.data.dir=gs://test-bucket/records") in train
    assert any(line[4:5] == ["scp"] and "--worker=all" in line for line in lines)


@pytest.mark.parametrize("state, recreated", [("READY", False), ("PREEMPTED", True)])
def test_tpu_vm_dry_run_reuses_a_ready_vm_and_replaces_a_preempted_one(state, recreated):
    result = launch("tpu_vm.sh", env={**TPU_ENV, "DRY_RUN": "1", "DRY_RUN_STATE": state})
    assert result.returncode == 0, result.stderr
    verbs = [line[4] for line in commands(result) if line[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    assert verbs[0] == "describe"
    assert (["delete", "create"] == verbs[1:3]) if recreated else ("create" not in verbs and "delete" not in verbs)


def test_tpu_vm_refuses_a_local_workdir():
    assert "BUCKET must be a gs:// bucket" in launch("tpu_vm.sh", "--dry-run").stderr
    result = launch("tpu_vm.sh", "--dry-run", env={"BUCKET": "gs://b", "WORKDIR": "/tmp/run"})
    assert result.returncode != 0 and "WORKDIR must be on GCS" in result.stderr
    assert launch("tpu_vm.sh", "--bogus", env={"BUCKET": "gs://b"}).returncode == 2


def test_tpu_pod_dry_run_uses_pod_defaults_and_overrides():
    result = launch("tpu_pod.sh", "--dry-run", env={"BUCKET": "gs://pods", "ZONE": "us-central2-b"})
    assert result.returncode == 0, result.stderr
    lines = commands(result)
    assert lines[0][1:] == ["plan", "--config", "configs/n24news.py", "--accelerator", "v4-32"]
    create = next(line for line in lines if line[4:5] == ["create"])
    assert create[5] == "entityclip-pod" and "--accelerator-type=v4-32" in create
    assert "--version=tpu-ubuntu2204-base" in create
    train = [line for line in lines if line[4:5] == ["ssh"]][-1]
    assert "--worker=all" in train and "--workdir gs://pods/entityclip-pod" in train[-1]
    result = launch("tpu_pod.sh", "--dry-run", env={"BUCKET": "gs://pods", "ACCELERATOR_TYPE": "v6e-64"})
    assert any("--accelerator-type=v6e-64" in line and "--version=v2-alpha-tpuv6e" in line
               for line in commands(result))


def test_gpu_eval_dry_run():
    env = {"CHECKPOINT": "runs/ck", "DATA": "/data/records", "SPLIT": "dev", "OUT": "reports", "VENV": "/opt/venv",
           "JAX_CUDA": "cuda13", "EVAL_ARGS": "--batch-size 256"}
    result = launch("gpu_eval.sh", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    lines = commands(result)
    assert ["/opt/venv/bin/pip", "install", "-q", "jax[cuda13]==0.10.2"] in lines
    assert lines[-1] == ["/opt/venv/bin/entityclip", "eval", "--checkpoint", "runs/ck", "--data", "/data/records",
                         "--split", "dev", "--out", "reports", "--batch-size", "256"]
    result = launch("gpu_eval.sh", "--dry-run", env={"DATA": "d"})
    assert result.returncode != 0 and "set CHECKPOINT" in result.stderr


def test_gpu_train_dry_run_without_install():
    env = {"INSTALL": "0", "CONFIG": "configs/x.py", "WORKDIR": "gs://b/run", "VENV": "v"}
    lines = commands(launch("gpu_train.sh", "--dry-run", env=env))
    assert lines == [["v/bin/entityclip", "train", "--config", "configs/x.py", "--workdir", "gs://b/run"]]


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records every call; the VM's state lives in a file. The first training run is
# "preempted": it fails and leaves the VM PREEMPTED. Later ones succeed. With
# FAKE_STOPS_EARLY=1 the first one instead exits 75 (stopped early and saved) on a READY VM.
echo "$*" >> "$FAKE_DIR/calls"
state_file="$FAKE_DIR/state"
case "$4" in
  describe) if [[ -f "$state_file" ]]; then cat "$state_file"; else exit 1; fi ;;
  create) echo READY > "$state_file" ;;
  delete) rm -f "$state_file" ;;
  scp) ;;
  ssh)
    if [[ "$*" == *"entityclip train"* ]]; then
      if [[ "${FAKE_STOPS_EARLY:-0}" == 1 && ! -f "$FAKE_DIR/stopped_once" ]]; then
        touch "$FAKE_DIR/stopped_once" "$FAKE_DIR/preempted_once"; exit 75
      fi
      if [[ ! -f "$FAKE_DIR/preempted_once" ]]; then
        touch "$FAKE_DIR/preempted_once"; echo PREEMPTED > "$state_file"; exit 255
      fi
      [[ "${FAKE_TRAIN_FAILS:-0}" == 1 ]] && exit 1
    fi ;;
esac
exit 0
"""


# `entityclip plan` as the launch scripts see it: its lines on stdout, exit 0 (fits) or 3 (does not fit).
FAKE_ENTITYCLIP = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/plans"
echo "train step, batch 192 (24 per chip): ${FAKE_PLAN_SAYS:-fits: peak 3.18 GiB of 16.00 GiB per chip}"
exit "${FAKE_PLAN_EXIT:-0}"
"""


def fake_gcloud(tmp_path):
    """PATH with a fake gcloud, and a fake entityclip for ENTITYCLIP (the tests' env sets it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("entityclip", FAKE_ENTITYCLIP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def fake_env(tmp_path, **extra):
    return {**TPU_ENV, "FAKE_DIR": str(tmp_path), "TMPDIR": str(tmp_path), "POLL_SECONDS": "0",
            "ENTITYCLIP": str(tmp_path / "bin" / "entityclip"), **extra}


def test_tpu_vm_plans_first_and_creates_nothing_when_the_run_does_not_fit(tmp_path):
    path = fake_gcloud(tmp_path)
    says = "does not fit: the compiler needs 29.83 GiB per chip, 15.75 GiB available; try --config.model.remat=True"
    result = launch("tpu_vm.sh", env=fake_env(tmp_path, FAKE_PLAN_EXIT="3", FAKE_PLAN_SAYS=says), path=path)
    assert result.returncode == 1 and says in result.stdout
    assert "the run does not fit on v5litepod-8 (see the plan above); nothing was created" in result.stderr
    assert not (tmp_path / "calls").exists()  # gcloud never called
    assert (tmp_path / "plans").read_text().split() == [
        "plan", "--config", "configs/custom.py", "--accelerator", "v5litepod-8", "--config.data.dir=gs://test-bucket/records"]
    result = launch("tpu_vm.sh", env=fake_env(tmp_path, FAKE_PLAN_EXIT="2"), path=path)
    assert result.returncode == 1 and "entityclip plan failed (exit 2" in result.stderr
    assert not (tmp_path / "calls").exists()
    result = launch("tpu_vm.sh", env=fake_env(tmp_path, ENTITYCLIP=str(tmp_path / "nowhere")), path=path)
    assert result.returncode == 1 and "planning needs entityclip installed here" in result.stderr


def test_plan_0_skips_the_plan(tmp_path):
    path = fake_gcloud(tmp_path)
    result = launch("tpu_pod.sh", env=fake_env(tmp_path, PLAN="0", FAKE_PLAN_EXIT="3"), path=path)
    assert result.returncode == 0, result.stderr
    assert "PLAN=0: not planning" in result.stderr and not (tmp_path / "plans").exists()
    dry = launch("tpu_vm.sh", "--dry-run", env={**TPU_ENV, "PLAN": "0"})
    assert dry.returncode == 0 and not any(line[1:2] == ["plan"] for line in commands(dry))


def test_tpu_vm_recreates_after_preemption_and_resumes(tmp_path):
    env = fake_env(tmp_path)
    result = launch("tpu_vm.sh", env=env, path=fake_gcloud(tmp_path))
    assert result.returncode == 0, result.stderr
    calls = [line.split()[3] + (" train" if "entityclip train" in line else "")
             for line in (tmp_path / "calls").read_text().splitlines()]
    assert calls == ["describe", "create", "describe", "scp", "ssh", "ssh train",  # first attempt: preempted
                     "describe",                                                 # why training stopped
                     "describe", "delete", "create", "describe",                 # replaced
                     "scp", "ssh", "ssh train"]                                  # resumed, same workdir
    trains = [line for line in (tmp_path / "calls").read_text().splitlines() if "entityclip train" in line]
    assert len({t for t in trains}) == 1 and "--workdir gs://test-bucket/run7" in trains[0]
    assert len((tmp_path / "plans").read_text().splitlines()) == 1  # planned once, before the first VM


def test_tpu_vm_stops_when_training_fails_on_a_healthy_vm(tmp_path):
    (tmp_path / "preempted_once").touch()
    env = fake_env(tmp_path, FAKE_TRAIN_FAILS="1")
    result = launch("tpu_vm.sh", env=env, path=fake_gcloud(tmp_path))
    assert result.returncode == 1 and "not a preemption" in result.stderr
    assert "delete" not in (tmp_path / "calls").read_text()


def test_tpu_vm_resumes_on_the_same_vm_after_exit_status_75(tmp_path):
    """75: the run was stopped early and saved everything (SIGTERM on a VM that stays READY): run it again."""
    result = launch("tpu_vm.sh", env=fake_env(tmp_path, FAKE_STOPS_EARLY="1"), path=fake_gcloud(tmp_path))
    assert result.returncode == 0, result.stderr
    calls = [line.split()[3] + (" train" if "entityclip train" in line else "")
             for line in (tmp_path / "calls").read_text().splitlines()]
    assert calls == ["describe", "create", "describe", "scp", "ssh", "ssh train",  # stopped early (75)
                     "describe",                                                 # still READY
                     "ssh train"]                                                # resumed, nothing re-created
    assert "stopped early and saved (exit status 75): resuming on the same VM" in result.stderr


@pytest.mark.parametrize("status, says", [(0, "training finished"), (75, "rerun this script to resume"),
                                          (2, "training failed (exit status 2)")])
def test_gpu_train_passes_on_the_exit_status_of_training(tmp_path, status, says):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "entityclip").write_text(f"#!/usr/bin/env bash\nexit {status}\n")
    (venv / "bin" / "entityclip").chmod(0o755)
    result = launch("gpu_train.sh", env={"INSTALL": "0", "VENV": str(venv), "WORKDIR": str(tmp_path / "run")})
    assert result.returncode == status and says in result.stderr, result.stderr
