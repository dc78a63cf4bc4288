"""The TPU launch scripts keep data and workdir on gs:// (dry runs: no gcloud needed)."""
import pathlib
import shlex
import subprocess

ROOT = pathlib.Path(__file__).parents[1]


def dry_run(**env):
    return subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--dry-run"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **env}, timeout=60)


def test_the_pod_trains_from_gcs_records_into_a_gcs_workdir():
    result = dry_run(BUCKET="gs://pods")
    assert result.returncode == 0, result.stderr
    train = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")][-1][-1]
    assert "--workdir gs://pods/entityclip-pod --config.data.dir=gs://pods/records" in train
    result = dry_run(BUCKET="gs://pods", DATA="gs://other/records")
    assert "--config.data.dir=gs://other/records" in result.stdout


def test_the_pod_refuses_local_records():
    result = dry_run(BUCKET="gs://pods", DATA="/data/records")
    assert result.returncode != 0 and "DATA must be on GCS" in result.stderr
