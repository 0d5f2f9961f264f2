"""The package layout pyproject.toml declares: every package under server/ is listed, and kernels/
installs as the namespace package `pagedserve_kernels`, never claiming the import name `kernels`
(Hugging Face's kernels library, a dependency of transformers; docs/cpu-kernels.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_server_package_is_listed():
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "server").rglob("__init__.py")}
    listed = set(_setuptools_config()["packages"])
    assert found - listed == set(), "packages missing from pyproject.toml [tool.setuptools]"
    assert listed - found == {"pagedserve_kernels"}


def test_kernels_directory_is_the_namespace_package():
    config = _setuptools_config()
    assert config["package-dir"] == {"pagedserve_kernels": "kernels"}
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert "pagedserve_kernels" in config["package-data"]


def test_a_regular_kernels_package_wins_over_the_source_tree(tmp_path):
    """The working directory first on sys.path (python -m, pytest) must not shadow another
    `kernels` package, and pagedserve_kernels still imports."""
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'the other kernels'\n")
    code = ("import kernels, pagedserve_kernels.ops as ops; "
            "print(kernels.WHO); print(ops.BACKENDS)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == "the other kernels"
    assert "cpu" in out[1]
