"""The benchmarks run where TensorFlow is not installed (the GPU machine) and print
one JSON line per figure."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"
BLOCK_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None\n"   # any import of it now fails


def import_statements(script):
    """Every import statement of a script, at the top or inside a function, as source lines."""
    return [ast.unparse(node) for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def run_python(code, *args):
    env = dict(os.environ, PYTHONPATH=str(BENCHMARKS.parent), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=BENCHMARKS.parent, timeout=600)


@pytest.mark.slow  # three fresh processes importing JAX
@pytest.mark.parametrize("name", ["bench_train_step.py", "bench_encode.py", "bench_retrieval.py"])
def test_benchmark_imports_nothing_that_needs_tensorflow(name):
    statements = import_statements(BENCHMARKS / name)
    assert any("entityclip_jax" in line for line in statements)
    done = run_python(BLOCK_TENSORFLOW + "sys.path.insert(0, 'benchmarks')\n" + "\n".join(statements))
    assert done.returncode == 0, done.stderr[-2000:]


def test_blocking_tensorflow_makes_an_import_of_it_fail():
    done = run_python(BLOCK_TENSORFLOW + "import tensorflow")
    assert done.returncode != 0 and "import of tensorflow halted" in done.stderr


@pytest.mark.slow  # runs two benchmarks
def test_encode_and_retrieval_benchmarks_print_one_json_line_per_figure():
    run = BLOCK_TENSORFLOW + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    done = run_python(run, "benchmarks/bench_encode.py", "--preset", "tiny", "--batch", "2", "--rounds", "2",
                      "--calls", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    figures = [json.loads(line) for line in done.stdout.splitlines()]
    assert [f["figure"] for f in figures] == ["encode_image", "encode_text"]
    for figure in figures:
        speedup = figure["jax_speedup_over_torch"]
        assert 0 < speedup["min"] <= speedup["median"] <= speedup["max"] and figure["rounds"] == 2

    done = run_python(run, "benchmarks/bench_retrieval.py", "--sizes", "300", "--dim", "16", "--chunk-size", "64",
                      "--rounds", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    (figure,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert figure["n"] == 300 and figure["metrics_over_floor"]["min"] > 0 and figure["rounds"] == 3
