"""No user path outside entityclip_jax/storage.py goes through the standard library's file
system calls: every one goes through storage (etils.epath), which knows gs:// as well as a
local disk. A site that is not a user path (a temporary directory the code made itself,
package data inside a wheel) carries a `# not a user path: <why>` comment on its line."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[1] / "entityclip_jax"
MARKER = "# not a user path:"
# attribute calls that name a file system path (module.attr or module.sub.attr)
FORBIDDEN_CALLS = {
    "os.path.abspath", "os.path.exists", "os.path.lexists", "os.path.isfile", "os.path.isdir",
    "os.path.join", "os.path.realpath", "os.path.getsize", "os.makedirs", "os.mkdir", "os.listdir",
    "os.scandir", "os.walk", "os.rename", "os.replace", "os.remove", "os.unlink", "os.rmdir",
    "io.open", "gzip.open", "glob.glob",
}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def violations(source, name="<source>"):
    """(line, what) for every file system call on a path in source that lacks the marker."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, name)):
        what = None
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "pathlib" for a in node.names):
            what = "import pathlib"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pathlib", "shutil"):
            what = f"from {node.module} import"
        elif isinstance(node, ast.Call):
            dotted = _dotted(node.func)
            if dotted == "open":
                what = "open("
            elif dotted in FORBIDDEN_CALLS or (dotted or "").startswith("shutil."):
                what = dotted
        if what and not any(MARKER in lines[i - 1] for i in range(node.lineno, node.end_lineno + 1)):
            found.append((node.lineno, what))
    return sorted(found)


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "storage.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_user_path_outside_storage(module):
    relative = str(module.relative_to(PACKAGE))
    found = violations(module.read_text(encoding="utf-8"), relative)
    assert not found, f"{relative}: " + ", ".join(f"line {line}: {what}" for line, what in found) + \
        f" (route the path through entityclip_jax.storage, or mark the line '{MARKER} <why>')"


def test_the_scan_sees_each_kind_of_call():
    source = ("import os, shutil, pathlib\nfrom pathlib import Path\nopen('a')\nos.path.abspath(p)\n"
              "os.makedirs(d)\nshutil.rmtree(d)\nos.path.join(tmp, 'x')  # not a user path: a tempdir\n"
              "storage.open(p)\nf.open()\n")
    assert violations(source) == [(1, "import pathlib"), (2, "from pathlib import"), (3, "open("),
                                  (4, "os.path.abspath"), (5, "os.makedirs"), (6, "shutil.rmtree")]
