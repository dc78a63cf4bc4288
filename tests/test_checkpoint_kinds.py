"""checkpoints.towers.checkpoint_kind: the one decision of what a path holds, told from its files alone
(the loaders behind each kind are tested in test_run_checkpoints, test_hub, test_release_import,
test_convert and test_demo)."""
import pytest

from entityclip_jax.checkpoints import towers as checkpoints
from entityclip_jax.errors import EntityClipError


@pytest.fixture
def kinds(tmp_path):
    """One skeleton per kind: only the files that tell them apart."""
    (tmp_path / "run" / "checkpoints" / "3" / "state").mkdir(parents=True)
    (tmp_path / "run" / "towers_config.json").write_text("{}")
    (tmp_path / "towers" / "params").mkdir(parents=True)
    (tmp_path / "towers" / "towers_config.json").write_text("{}")
    (tmp_path / "old_towers" / "params").mkdir(parents=True)  # written before 0.2: the file's old name
    (tmp_path / "old_towers" / "clip_config.json").write_text("{}")
    for name in ("hf", "export"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    (tmp_path / "export" / "entityclip_heads.safetensors").write_bytes(b"")
    (tmp_path / "ViT-B-32.pt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_each_kind_is_told_apart(kinds):
    found = {name: checkpoints.checkpoint_kind(str(kinds / name))
             for name in ("run", "run/checkpoints/3", "towers", "old_towers", "hf", "export", "ViT-B-32.pt")}
    assert found == {"run": checkpoints.TRAINING_RUN, "run/checkpoints/3": checkpoints.CHECKPOINT_STEP,
                     "towers": checkpoints.TOWERS, "old_towers": checkpoints.TOWERS, "hf": checkpoints.HF,
                     "export": checkpoints.HF_EXPORT, "ViT-B-32.pt": checkpoints.STATE_DICT_FILE}
    assert len(set(found.values())) == 6


def test_anything_else_is_refused_with_what_to_pass(kinds):
    with pytest.raises(EntityClipError, match=r"empty holds none of their files; pass a training workdir"):
        checkpoints.checkpoint_kind(str(kinds / "empty"))
    with pytest.raises(EntityClipError, match=r"missing does not exist; pass a training workdir"):
        checkpoints.load_towers(str(kinds / "missing"))


def test_run_files_belong_to_the_run_a_step_is_part_of(kinds):
    assert checkpoints.run_directory(str(kinds / "run" / "checkpoints" / "3")) == str(kinds / "run")
    assert checkpoints.run_directory(str(kinds / "run")) == str(kinds / "run")
    assert checkpoints.run_directory(str(kinds / "export")) == str(kinds / "export")  # carries a copy
    assert checkpoints.run_directory(str(kinds / "ViT-B-32.pt")) is None
