"""OpenAI's TorchScript checkpoints: tensors read without running the archive's code."""
import numpy as np
import pytest
import torch

from entityclip_jax.cli import main as cli_main
from entityclip_jax.weights.openai import openai_to_flax, read_openai_checkpoint
from entityclip_jax.errors import EntityClipError
from tests.test_convert import openai_state_dict_from_hf, tiny_openai_model


def _module_tree(state_dict):
    """An nn.Module whose parameters carry the dotted names of state_dict (as OpenAI's model does)."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        node = root
        for name in path:
            if not hasattr(node, name):
                node.add_module(name, torch.nn.Module())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(np.array(value)).half()))
    root.attn_mask = torch.full((3, 3), float("-inf"))  # an attribute, not a parameter: not read
    return root


def test_torchscript_archive_is_read_without_torch_jit(tmp_path, monkeypatch):
    state = openai_state_dict_from_hf(tiny_openai_model())
    torch.jit.save(torch.jit.script(_module_tree(state)), tmp_path / "ViT-tiny.pt")
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran the archive"))
    tensors = read_openai_checkpoint(str(tmp_path / "ViT-tiny.pt"))
    assert tensors.keys() == state.keys()
    for key, value in state.items():  # fp16 in the archive, as OpenAI's are
        np.testing.assert_array_equal(tensors[key], np.asarray(value).astype(np.float16).astype(np.float32))
    config, _ = openai_to_flax(tensors)
    assert config.projection_dim == 24


@torch.library.custom_op("entityclip_test::touch", mutates_args=())
def _touch(path: str) -> torch.Tensor:
    with open(path, "w") as f:
        f.write("code from the checkpoint ran")
    return torch.zeros(1)


class _Trap(torch.nn.Module):
    """Its __setstate__ writes a file: what torch.jit.load runs when it loads the archive."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]):
        self.path, self.training = state[0], state[2]
        self.weight = state[1] + torch.ops.entityclip_test.touch(self.path)  # used, so never optimised away


def test_torchscript_code_never_runs_without_the_trust_flag(tmp_path, capsys):
    written = tmp_path / "pwned.txt"
    torch.jit.save(torch.jit.script(_Trap(str(written))), tmp_path / "trap.pt")
    with pytest.raises(EntityClipError, match="cannot be read without running its code.*Hugging Face.*"
                                              "--trust-torchscript"):
        read_openai_checkpoint(str(tmp_path / "trap.pt"))
    assert cli_main(["import-openai", str(tmp_path / "trap.pt"), str(tmp_path / "out")]) == 2
    assert "--trust-torchscript" in capsys.readouterr().err
    assert not written.exists()
    # The flag does run it (which is why it is a flag): the trap is real.
    read_openai_checkpoint(str(tmp_path / "trap.pt"), trust_torchscript=True)
    assert written.exists()


def test_a_tensor_reaching_outside_its_storage_is_refused(tmp_path):
    """as_strided would read past the buffer: a crafted archive must not leak or crash."""
    import zipfile
    torch.jit.save(torch.jit.script(torch.nn.Linear(64, 64)), tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as src, zipfile.ZipFile(tmp_path / "short.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "/data/" in item.filename and len(data) > 64 * 4:
                data = data[:16]  # the weight's storage, cut to 4 floats
            dst.writestr(item, data)
    with pytest.raises(EntityClipError, match="reaches outside its storage"):
        read_openai_checkpoint(str(tmp_path / "short.pt"))
