"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest

from raytorch.cluster.session import apply_env_defaults


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray with 2 CPUs shared by every test that needs Ray.

    2 CPUs matches the CI machine, so the tests see the same scheduling limits users of a small
    machine see (Ray Data needs a CPU beside the workers).
    """
    apply_env_defaults()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An MLflow file store of this test's own (MLFLOW_TRACKING_URI points at it); its client."""
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)
