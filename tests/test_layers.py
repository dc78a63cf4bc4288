"""Layers point one way: models/ (architecture, math) imports nothing from the layers above it.

Read from the source with `ast`, so a lazy import inside a function counts too."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[1] / "entityclip_jax"
# What sits above models/: storage, checkpoints and configs, then the pipeline stages and the CLI.
ABOVE_MODELS = ("convert", "train", "data", "eval", "explain", "storage", "checkpoints", "hub", "config",
                "cli", "demo")


def imported_modules(source):
    """Every module an import statement in `source` names (relative imports resolved to entityclip_jax.models)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..train import y, inside entityclip_jax/models
                base = ".".join(["entityclip_jax", "models"][:2 - (node.level - 1)] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def upward(module):
    parts = module.split(".")
    return parts[0] == "entityclip_jax" and len(parts) > 1 and parts[1] in ABOVE_MODELS


def test_models_import_nothing_from_the_layers_above():
    files = sorted(PACKAGE.joinpath("models").rglob("*.py"))
    assert len(files) >= 6  # clip, clip_config, clip_pixels, entityclip, gi_itm, heads, mmae
    found = [f"{path.name}: {module}" for path in files for module in imported_modules(path.read_text())
             if upward(module)]
    assert not found, "models/ must hold architecture and math only; it imports " + ", ".join(sorted(set(found)))


@pytest.mark.parametrize("source, bad", [
    ("from entityclip_jax.convert.hf import load_hf_checkpoint", True),
    ("def f():\n    from entityclip_jax.train import checkpoint", True),  # lazy imports count too
    ("import entityclip_jax.data.preprocess as p", True),
    ("from entityclip_jax import storage", True),
    ("from ..eval import encode", True),
    ("from entityclip_jax.models.clip import CLIPModel", False),
    ("from entityclip_jax.errors import EntityClipError", False),
    ("from . import clip_config", False),
])
def test_the_check_sees_upward_imports(source, bad):
    assert any(upward(m) for m in imported_modules(source)) == bad
