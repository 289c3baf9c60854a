"""cluster.yaml passes Ray's own cluster-config validator and keeps the dashboard private."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_validates_with_rays_schema(cluster: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cluster)  # as written
    validate_config(prepare_config(copy.deepcopy(cluster)))  # as `ray up` fills it out


def test_validator_rejects_a_misspelt_key(cluster: dict) -> None:
    # Proves the check above has teeth: the schema forbids unknown keys.
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(broken)


def test_head_cpu_and_gpu_node_types(cluster: dict) -> None:
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    assert any(i.startswith("g") for i in instance.values()), "no GPU worker type"
    assert any(i.startswith(("m", "c")) for n, i in instance.items() if n != "head")


def test_dashboard_is_not_exposed(cluster: dict) -> None:
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_setup_installs_pinned_torch_before_raytorch(cluster: dict) -> None:
    commands = cluster["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if re.search(r"torch==\d", c))
    raytorch_at = next(i for i, c in enumerate(commands) if "raytorch" in c and "install" in c)
    assert torch_at < raytorch_at
    mounted = set(cluster["file_mounts"])
    assert any(m in commands[raytorch_at] for m in mounted), "raytorch not from file_mounts"
