"""The API reference builds from the docstrings (``make docs``), so it cannot rot unseen."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_reference_builds_without_warnings_and_covers_the_public_api(tmp_path):
    pytest.importorskip("pdoc")
    make = (ROOT / "Makefile").read_text()
    (command,) = re.findall(r"^\t\$\(VENV\)/bin/pdoc (.+)$", make, flags=re.M)
    args = command.replace("docs/api", str(tmp_path)).split()
    done = subprocess.run(
        [sys.executable, "-m", "pdoc", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Warn" not in done.stderr, done.stderr  # a docstring naming what is gone
    page = (tmp_path / "raytorch.html").read_text()
    for name in (
        "TorchTrainer.fit",
        "TorchModel.load",
        "Callback.on_validation",
        "RunHandle.request_stop",
        "RunLogger.log_metrics",
        "WandbLogger",
        "predict",
    ):
        assert f'id="{name}"' in page, name
    errors = (tmp_path / "raytorch" / "core" / "errors.html").read_text()
    assert 'id="ConfigError"' in errors and 'id="DataError"' in errors
