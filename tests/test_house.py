"""The house rules as checks: layers, one edge for private Ray APIs, one exception tree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import raytorch
from raytorch.core import batching, errors

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (make setup)")
    tree = tmp_path_factory.mktemp("house")
    shutil.copytree(
        ROOT / "raytorch", tree / "raytorch", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    (tree / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "house_rules.py", tree / "tests" / "house_rules.py")
    return tree


def test_the_layers_contract_holds() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("core/batching.py", "import raytorch.engine.model"),
        ("engine/train/loop.py", "import raytorch.cluster.session"),
        ("cluster/session.py", "import raytorch.jobs.cli"),
        ("core/stopping.py", "import ray"),
    ],
)
def test_a_lower_layer_importing_a_higher_one_fails_lint(
    tree_copy: Path, module: str, upward: str
) -> None:
    path = tree_copy / "raytorch" / module
    original = path.read_text()
    path.write_text(original + f"\n{upward}  # an upward import, on purpose\n")
    try:
        result = _lint(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout or "broken" in result.stdout.lower()


@pytest.mark.parametrize(
    ("module", "line", "named"),
    [
        # An underscore name of another package.
        (
            "cluster/trainer.py",
            "from raytorch.engine.tracking.directory import _write_history",
            "_write_history",
        ),
        # A public name that the package's face does not declare.
        ("cluster/launcher.py", "from raytorch.engine.train.loop import Loop", "'Loop'"),
        ("jobs/run.py", "from raytorch.cluster.worker import RayContext", "'RayContext'"),
    ],
)  # fmt: skip
def test_a_name_crossing_a_package_boundary_outside_its_face_fails_lint(
    tree_copy: Path, module: str, line: str, named: str
) -> None:
    path = tree_copy / "raytorch" / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # across a boundary, on purpose\n")
    try:
        result = _lint(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert "faces" in result.stdout and "BROKEN" in result.stdout
    assert named in result.stdout and module.replace("/", ".").removesuffix(".py") in result.stdout


def test_every_face_declares_names_its_package_defines() -> None:
    """A face's names resolve, to the objects their modules define."""
    import importlib

    for package in ("core", "engine.io", "engine.model", "engine.train", "engine.tracking",
                    "engine.infer", "cluster", "jobs"):  # fmt: skip
        face = importlib.import_module(f"raytorch.{package}")
        missing = [name for name in face.__all__ if getattr(face, name, None) is None]
        assert missing == [], (package, missing)


def test_private_ray_apis_are_used_only_in_compat() -> None:
    pattern = re.compile(r"ray\._private|_internal")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "raytorch").rglob("*.py")
        if path.name != "compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_code_comments_name_concepts_not_our_documents() -> None:
    pattern = re.compile(r"\bseed 00\d|\bDESIGN\b|BENCHMARKS\.md|\bseeds?/")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "raytorch").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def _error_classes() -> list[type[errors.RaytorchError]]:
    found = []
    todo: list[type] = [errors.RaytorchError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted(set(found), key=lambda c: c.__name__)


def test_every_raytorch_error_is_a_user_error_or_a_run_failure() -> None:
    for cls in _error_classes():
        if cls in (errors.RaytorchError, errors.UserError, errors.RunError):
            continue
        assert issubclass(cls, (errors.UserError, errors.RunError)), cls


def test_every_exception_class_of_the_package_is_in_the_tree() -> None:
    """No module defines an exception class of its own outside raytorch.core.errors."""
    import importlib
    import inspect
    import pkgutil

    offenders = []
    for info in pkgutil.walk_packages(raytorch.__path__, "raytorch."):
        if info.name == "raytorch.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and info.name != "raytorch.core.errors"
            ):
                offenders.append(f"{info.name}.{name}")
    assert offenders == []


def test_the_public_api_exports_the_tree() -> None:
    assert raytorch.UserError is errors.UserError
    assert raytorch.RunError is errors.RunError
    assert set(raytorch.__all__) <= set(dir(raytorch))
    # Every name resolves (most are imported lazily, on first use).
    assert all(getattr(raytorch, name) is not None for name in raytorch.__all__)
    assert raytorch.create_batch is batching.create_batch


def test_the_pure_layer_loads_without_ray_or_pyarrow() -> None:
    code = (
        "import pkgutil, importlib, sys, raytorch.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__):\n"
        "    importlib.import_module('raytorch.core.' + m.name)\n"
        "print(sorted(n for n in ('ray', 'pyarrow') if n in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
