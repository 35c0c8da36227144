"""The architecture contract (pyproject.toml [tool.importlinter]) holds: the
layers of jmoe only import downwards, the planner never builds the model,
and start-up code knows nothing of layers or meshes."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint(cwd: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable),
                                                       "lint-imports")
    env = dict(os.environ, PYTHONPATH=cwd)
    return subprocess.run([exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_imports_point_down():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " 0 broken" in res.stdout, res.stdout[-3000:]


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract is live: a copy of the package where the core imports the
    layer module above it fails the check."""
    shutil.copytree(os.path.join(ROOT, "jmoe"), tmp_path / "jmoe")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    layer = tmp_path / "jmoe" / "layer.py"
    layer.write_text(layer.read_text() + "\nfrom jmoe import moe  # an upward import\n")
    res = _lint(str(tmp_path))
    assert res.returncode != 0
    assert "jmoe.layer -> jmoe.moe" in res.stdout, res.stdout[-3000:]
