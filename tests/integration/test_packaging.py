"""The distribution ships exactly the three import packages, and installs into a clean virtualenv."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build/ directory could carry stale modules into the wheel.
    source = tmp_path_factory.mktemp("source") / "kafka-saga"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv*", ".mypy_cache"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (built,) = out.glob("kafka_saga-*.whl")
    return built


def test_wheel_holds_only_saga_broker_storage(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top_level if t.endswith(".dist-info")}
    assert top_level - dist_info == {"saga", "broker", "storage"}
    for package in ("saga", "broker", "storage"):
        assert f"{package}/py.typed" in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    # Alembic's migrations ship with the storage package, so `kafka-saga db upgrade` works installed.
    assert "storage/migrations/env.py" in names
    assert any(n.startswith("storage/migrations/versions/") and n.endswith(".py") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kafka-saga = saga.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_into_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    """`pip install` into a fresh virtualenv, then the three packages import and the CLI answers.

    The new venv finds the dependencies in the site-packages of the interpreter running the tests (no
    network needed) through a ``.pth`` file: that is the virtualenv's own site-packages when the tests
    run from one, which ``system_site_packages`` would miss (it sees the base interpreter's). Paths a
    ``.pth`` file adds come after the venv's own site-packages and their own ``.pth`` files are not
    run, so the project itself (an editable install of the repository, say) only comes from the wheel;
    it runs from a directory outside the repository.
    """
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    new_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys(
        [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    (Path(new_site) / "kafka_saga_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--quiet", str(wheel)],
        check=True,
        timeout=300,
    )
    probe = (
        "import saga, broker, storage, pathlib; "
        "print(*(pathlib.Path(m.__file__).parent.parent.name for m in (saga, broker, storage)))"
    )
    out = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == ["site-packages"] * 3, out
    help_text = subprocess.run(
        [str(env_dir / "bin" / "kafka-saga"), "--help"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "worker" in help_text and "demo" in help_text
