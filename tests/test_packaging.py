"""An installed rankkit carries its base weights: a wheel runs the built-in tasks anywhere."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from rankkit.tasks import data_dir, read_manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_the_package_list_names_every_subpackage_and_maps_data():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "rankkit").rglob("__init__.py")
    }
    missing = sorted(on_disk - set(setuptools["packages"]))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert setuptools["package-dir"] == {"rankkit.data": "data"}


def test_a_source_checkout_reads_the_top_level_data_folder(monkeypatch):
    monkeypatch.delenv("RANKKIT_DATA_DIR", raising=False)
    import rankkit

    if not Path(rankkit.__file__).resolve().is_relative_to(REPO):
        pytest.skip("rankkit is imported from an install, not this checkout")
    assert data_dir() == REPO / "data"
    monkeypatch.setenv("RANKKIT_DATA_DIR", "/somewhere/else")
    assert data_dir() == Path("/somewhere/else")


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_a_wheel_installed_without_the_source_tree_runs_the_default_sweep(tmp_path):
    # Build from a copy, so that the build leaves nothing in the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("rankkit", "data"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # Offline with this environment's setuptools if it is new enough for pyproject.toml's
    # [build-system]; else pip fetches one, as for 'pip install -e .'.
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 77 else []
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", str(src), "--no-deps", *isolation, "-w", str(tmp_path / "dist")])
    (wheel,) = (tmp_path / "dist").glob("rankkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    manifest = read_manifest(REPO / "data")
    assert {"digits", "topics"} <= set(manifest)
    files = [entry["file"] for entry in manifest.values() if "file" in entry]
    assert "topics-data.json.gz" in files  # the frozen data travels with the weights
    for file in files:
        assert f"rankkit/data/{file}" in names
    assert "rankkit/data/manifest.json" in names

    # Install it alone (its dependencies are this environment's) and use it from
    # another directory: nothing may come from the checkout.
    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RANKKIT_DATA_DIR"}
    env.update(PYTHONPATH=str(site), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    check = (
        "import rankkit, rankkit.tasks as t; print(rankkit.__file__); print(t.data_dir()); "
        "[t.get_task(name).build_model(pretrained=True) for name in t.read_manifest() "
        "if name in t.TASKS]; assert len(t.get_task('topics').splits()['test']) == 260"
    )
    where, data = _run([sys.executable, "-c", check], cwd=elsewhere, env=env).split()
    assert Path(where) == site / "rankkit" / "__init__.py"
    assert Path(data) == site / "rankkit" / "data"
    # The installed copy is read, never rewritten in place.
    refused = subprocess.run(
        [sys.executable, "-m", "rankkit", "pretrain", "digits", "--quiet"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0 and "RANKKIT_DATA_DIR" in refused.stderr
    assert "Traceback" not in refused.stderr
    override = _run(
        [sys.executable, "-c", "import rankkit.tasks as t; print(t.data_dir())"],
        cwd=elsewhere, env={**env, "RANKKIT_DATA_DIR": str(tmp_path)},
    )  # fmt: skip
    assert Path(override.strip()) == tmp_path

    # The default sweep (every run of it, at one epoch to keep CI short).
    out = _run([sys.executable, "-m", "rankkit", "sweep", "--epochs", "1", "--quiet"],
               cwd=elsewhere, env=env)  # fmt: skip
    results = pd.read_csv(elsewhere / "runs" / "digits-sweep" / "results.csv")
    assert len(results) == 24 and (results["status"] == "ok").all(), out
    assert (elsewhere / "runs" / "digits-sweep" / "rank_vs_quality.png").exists()
