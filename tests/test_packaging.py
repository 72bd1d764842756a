"""The wheel: built from a copy of the sources, its contents, its metadata, and what it runs.

One wheel is built per session (``python -m build --wheel --no-isolation``: offline, with the
pinned setuptools of the development environment), from a copy of ``pyproject.toml``,
``README.md``, ``LICENSE`` and ``src/`` in a temporary folder, so the checkout gets no ``build/``
or ``*.egg-info`` and nothing outside those files can slip into the wheel.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "varlin"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # With it set, setuptools prints "byte-compiling is disabled" warnings of its own.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """``(wheel path, build output)``."""
    pytest.importorskip("build")
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "src" / "varlin", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=src,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    (wheel,) = dist.glob("varlin-*.whl")
    yield wheel, output


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_build_prints_no_warning(built: tuple[Path, str]) -> None:
    _, output = built
    flagged = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not flagged, "\n".join(flagged)


def test_wheel_holds_the_package_and_its_data_only(built: tuple[Path, str]) -> None:
    wheel, _ = built
    names = _names(wheel)
    shipped = {n for n in names if not n.startswith("varlin-")}
    # every file of the package on disk, data files included, and nothing else
    expected = {
        "varlin/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert shipped == expected
    assert {"varlin/py.typed", "varlin/__main__.py", "varlin/sklearn.py"} <= shipped
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/", "examples/"))]
    assert not [n for n in names if n.endswith((".png", ".md")) or "results" in n]
    dist_info = {n.split("/", 1)[1] for n in names if n.startswith("varlin-")}
    assert {"METADATA", "WHEEL", "RECORD", "entry_points.txt", "licenses/LICENSE"} <= dist_info


def test_wheel_metadata(built: tuple[Path, str]) -> None:
    wheel, _ = built
    meta = _metadata(wheel)
    assert meta["Name"] == "varlin"
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "MIT"
    assert meta.get("License") is None  # the deprecated free-text field
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"plots", "bench", "sklearn", "docs", "dev"} <= extras
    requires = meta.get_all("Requires-Dist") or []
    core = sorted(r.split(">")[0] for r in requires if "extra ==" not in r)
    assert core == ["numpy", "torch", "tqdm"]
    assert any(r.startswith("scikit-learn") and 'extra == "sklearn"' in r for r in requires)
    assert any(r.startswith("matplotlib") and 'extra == "plots"' in r for r in requires)
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read("varlin-0.1.0.dist-info/entry_points.txt").decode()
    assert "[console_scripts]" in entry_points
    assert "varlin = varlin.cli:main" in entry_points


@pytest.fixture(scope="module")
def installed(built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (without dependencies: torch and friends come from this venv)."""
    wheel, _ = built
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(target), str(wheel)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def _run_installed(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**_env(), "PYTHONPATH": str(target)}
    return subprocess.run(
        [sys.executable, *args], cwd=target.parent, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_installed_wheel_runs_python_m_varlin(installed: Path) -> None:
    where = _run_installed(installed, "-c", "import varlin; print(varlin.__file__)")
    assert where.stdout.strip() == str(installed / "varlin" / "__init__.py")  # not the checkout
    assert (installed / "varlin" / "py.typed").is_file()
    result = _run_installed(installed, "-m", "varlin", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: varlin")
    for command in ("demo", "fit", "predict", "uci", "bench"):
        assert command in result.stdout


def test_installed_wheel_bench_says_where_the_benchmark_is(installed: Path) -> None:
    result = _run_installed(installed, "-m", "varlin", "bench", "--quick")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("varlin: error: the speed benchmark is not part of the installed")
    assert "make bench" in lines[0] and "Traceback" not in result.stderr
