"""Layers point one way: every package of entityclip_jax imports only the layers below it.

Read from the source with `ast`, so a lazy import inside a function counts too. The
table is the house's layering (README, Architecture); units on one row may not import
each other."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[1] / "entityclip_jax"
# Bottom first.
LAYERS = (
    ("errors",),
    ("storage",),
    ("hub",),
    ("models",),
    ("data", "weights"),
    ("objective", "parallel"),
    ("config",),
    ("checkpoints",),
    ("eval", "explain"),
    ("train",),               # may use eval's metrics, as big_vision's trainers use its evaluators
    ("plan",),                # compiles train's step for accelerators this machine does not have
    ("commands",),
    ("cli",),
    ("demo",),
)
RANK = {unit: rank for rank, row in enumerate(LAYERS) for unit in row}


def unit_of(path):
    """The package (or top-level module) of entityclip_jax a source file belongs to."""
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def imported_units(source, importer):
    """The entityclip_jax units an import statement in `source` names (relative imports resolved
    against the importing file's unit)."""
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..train import y: only within a package here
                names = [f"entityclip_jax.{importer}" if node.level == 1 else f"entityclip_jax.{node.module or ''}"]
            else:
                base = node.module or ""
                names = [base] if base != "entityclip_jax" else [f"{base}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "entityclip_jax" and len(parts) > 1 and parts[1]:
                yield parts[1]


def violations(source, importer):
    """'importer -> unit' for each import that does not point down (or stays in its own unit)."""
    return sorted({f"{importer} -> {unit}" for unit in imported_units(source, importer)
                   if unit != importer and RANK.get(unit, -1) >= RANK[importer]})


def package_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_unit_has_a_layer():
    units = {unit_of(path) for path in package_files()}
    assert units == set(RANK), f"place {sorted(units - set(RANK))} in LAYERS; drop {sorted(set(RANK) - units)}"


def test_every_import_points_down():
    found = [f"{path.relative_to(PACKAGE)}: {v}" for path in package_files()
             for v in violations(path.read_text(), unit_of(path))]
    assert not found, "imports that point up or sideways:\n" + "\n".join(found)


@pytest.mark.parametrize("source, importer, bad", [
    ("from entityclip_jax.weights.hf import load_hf_checkpoint", "models", True),
    ("def f():\n    from entityclip_jax.train import loop", "eval", True),  # lazy imports count too
    ("import entityclip_jax.data.preprocess as p", "models", True),
    ("from entityclip_jax import storage", "models", False),
    ("from entityclip_jax import checkpoints", "config", True),
    ("from entityclip_jax.explain import cache", "data", True),            # the old data <-> explain tie
    ("from entityclip_jax.objective.losses import entityclip_loss", "models", True),  # models <-> losses
    ("from entityclip_jax.data.pipeline import make_dataset", "weights", True),  # same row: sideways
    ("from entityclip_jax.eval.encode import clip_encoders", "train", False),
    ("from entityclip_jax.checkpoints.towers import load_towers", "eval", False),
    ("from . import clip_config", "models", False),
    ("from entityclip_jax.models.clip import CLIPModel", "models", False),
])
def test_the_check_sees_imports_that_do_not_point_down(source, importer, bad):
    assert bool(violations(source, importer)) == bad
