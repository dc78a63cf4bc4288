"""`export-hf --overwrite` replaces only an earlier export of ours; exports are readable like save_pretrained's."""
import os
import stat

import pytest

from entityclip_jax.cli import main as cli_main
from entityclip_jax.weights.hf import EXPORT_MARKER, load_hf_checkpoint, save_hf_checkpoint


@pytest.fixture
def towers(tiny_hf_dir, tmp_path):
    assert cli_main(["import-hf", tiny_hf_dir, str(tmp_path / "run" / "towers")]) == 0
    return tmp_path / "run" / "towers"


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _export(source, dest):
    return cli_main(["export-hf", str(source), str(dest), "--overwrite", "--no-verify"])


def test_overwrite_refuses_an_unrelated_directory(towers, tmp_path, capsys):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    assert _export(towers, user) == 2
    assert "not an earlier `entityclip export-hf` directory" in capsys.readouterr().err
    assert (user / "holiday.jpg").read_bytes() == b"precious" and _files(user) == ["holiday.jpg"]


@pytest.mark.parametrize("dest", ["towers", "run", "inner"])
def test_overwrite_refuses_the_source_and_what_holds_it(towers, tmp_path, capsys, dest):
    before = _files(tmp_path / "run")
    target = {"towers": towers, "run": tmp_path / "run", "inner": towers / "params"}[dest]
    (target / EXPORT_MARKER).write_text('{"files": []}')  # even a forged marker does not help
    before = _files(tmp_path / "run")
    assert _export(towers, target) == 2
    assert "being exported" in capsys.readouterr().err
    assert _files(tmp_path / "run") == before


# "config.json~": an editor's backup, a name etils.epath's local listing hides
@pytest.mark.parametrize("user_file", ["notes.txt", "config.json~"])
def test_overwrite_replaces_an_earlier_export_but_not_one_with_user_files(towers, tmp_path, capsys, user_file):
    out = tmp_path / "export"
    assert _export(towers, out) == 0
    (out / "model.safetensors").write_bytes(b"stale")
    assert _export(towers, out) == 0  # an earlier export of ours: replaced
    load_hf_checkpoint(str(out))
    (out / user_file).write_text("mine")
    assert _export(towers, out) == 2
    assert user_file in capsys.readouterr().err and (out / user_file).read_text() == "mine"


def test_export_modes_follow_the_umask(tiny_hf_dir, tmp_path):
    config, params = load_hf_checkpoint(tiny_hf_dir)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")  # a copied side file does not keep its private mode
    os.chmod(tmp_path / "tok" / "vocab.json", 0o600)
    old = os.umask(0o022)
    try:
        out = save_hf_checkpoint(params, config, tmp_path / "export", source_dir=str(tmp_path / "tok"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    names = os.listdir(out)
    assert "vocab.json" in names and "model.safetensors" in names
    for name in names:
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name


@pytest.mark.parametrize("dest", ["run", "parent", "checkpoints"])
def test_overwrite_refuses_the_training_run_before_reading_it(tmp_path, capsys, dest):
    run = tmp_path / "runs" / "run1"
    (run / "checkpoints" / "100").mkdir(parents=True)
    (run / "checkpoints" / "100" / "state").write_bytes(b"weeks of training")
    (run / "train_config.json").write_text("{}")
    before = _files(tmp_path)
    target = {"run": run, "parent": tmp_path / "runs", "checkpoints": run / "checkpoints"}[dest]
    assert _export(run, target) == 2  # refused before the (here unreadable) run is read
    assert "being exported" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_a_rerun_removes_what_a_killed_export_left_and_nothing_else(towers, tmp_path, caplog):
    """A killed export leaves its hidden build directory beside the destination; the rerun removes
    those it can tell are ours and abandoned (our marker for this destination, its process gone;
    or empty under our naming), and keeps a live export's, another destination's and anything else."""
    import json
    import subprocess
    import sys
    from entityclip_jax.weights.hf import PARTIAL_MARKER
    dest = tmp_path / "exported"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)

    def leftover(name, pid=None, destination=dest, files=()):
        directory = tmp_path / name
        directory.mkdir()
        if pid is not None:
            (directory / PARTIAL_MARKER).write_text(json.dumps({"destination": str(destination), "pid": pid,
                                                                "host": os.uname().nodename}))
        for file in files:
            (directory / file).write_bytes(b"x")
        return directory
    killed = leftover(".exported.export-0123456789ab", dead_pid, files=["config.json"])
    empty_old = leftover(".export-aaaaaaaaaaaa")               # the case: an empty folder, old naming
    live = leftover(".exported.export-bbbbbbbbbbbb", os.getpid(), files=["config.json"])
    other = leftover(".elsewhere.export-cccccccccccc", dead_pid, tmp_path / "elsewhere", files=["config.json"])
    foreign = leftover(".exported.export-dddddddddddd", files=["notes.txt"])   # no marker: not ours
    mine = leftover(".export-notours", files=[])                              # not our naming
    assert cli_main(["export-hf", str(towers), str(dest), "--no-verify"]) == 0
    assert not killed.exists() and not empty_old.exists()
    assert all(d.exists() for d in (live, other, foreign, mine))
    assert sum("removed" in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")) == [
        ".exported.export-bbbbbbbbbbbb", ".exported.export-dddddddddddd"]  # the export's own is gone
