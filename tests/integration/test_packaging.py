"""What `pip install .` installs: the package `slimserve` alone, with its data, importable by namespace."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A copy of the sources (links kept as links), so the in-tree build leaves the checkout alone.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("slimserve", "models", "searcher", "server", "loadtest"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        ".",
    ]
    subprocess.run(command, cwd=source, check=True, capture_output=True)
    (built,) = out.glob("slimserve-*.whl")
    return built


def test_the_wheel_holds_only_the_slimserve_package_and_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"slimserve", "slimserve-0.1.0.dist-info"}
    assert {"slimserve/models/demo/weights.safetensors", "slimserve/loadtest/traces/azure_functions_like.csv"} <= set(
        names
    )
    assert "slimserve/server/app.py" in names and "slimserve/cli.py" in names


def test_the_parts_import_by_namespace_and_not_by_bare_name(wheel: Path, tmp_path: Path) -> None:
    # -I: nothing from the checkout or the environment's editable install, only the wheel on the path
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import slimserve.server, slimserve.models, slimserve.loadtest\n"
        "import importlib.util as u; print([n for n in ('models', 'server', 'searcher', 'loadtest') if u.find_spec(n)])"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code, str(wheel)], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
