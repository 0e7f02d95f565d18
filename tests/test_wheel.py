"""The built wheel puts one name on the import path, `loraplan`, and carries every module and table of the tree.

A top-level `tables` would overwrite PyTables (pandas' HDF5 support), and `planner` / `executor` are names other
packages use too: they live inside loraplan/.
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loraplan"
DATA_SUFFIXES = (".yaml", ".json", ".jsonl", ".md")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    # a copy of the tree, so that setuptools' build/ folder (which keeps files deleted since) never leaks into the
    # wheel, and the checkout stays as it was
    src = tmp_path_factory.mktemp("src") / "loraplan"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", "out", "runs"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--disable-pip-version-check", "-w", str(out), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("loraplan-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        return zf.namelist() + ["ENTRY_POINTS=" + zf.read(entry_points).decode()]


def test_only_loraplan_is_a_top_level_name(wheel_names):
    top = {name.split("/", 1)[0] for name in wheel_names if not name.startswith("ENTRY_POINTS=")}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == {"loraplan"}


def test_every_module_and_table_of_the_tree_is_in_the_wheel(wheel_names):
    """A module in a folder without __init__.py, or a table missing from package-data, fails here by name."""
    names = set(wheel_names)
    for path in PACKAGE.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" in rel or path.is_dir():
            continue
        if path.suffix == ".py" or (path.suffix in DATA_SUFFIXES and "/tables/" in f"/{rel}"):
            assert rel in names, f"{rel} is not in the wheel"
    assert "loraplan/executor/data/demo.jsonl" in names
    assert "loraplan/tables/gpus.yaml" in names


def test_the_installed_entry_point_is_unchanged(wheel_names):
    (entry_points,) = [n.removeprefix("ENTRY_POINTS=") for n in wheel_names if n.startswith("ENTRY_POINTS=")]
    assert "loraplan = loraplan.cli:main" in entry_points
