"""The bad-input matrix: each bad input fails fast with a message naming what and where, never
hangs, and leaves no output that looks complete.

Driver-side cases fail before any worker starts (milliseconds to a second each on the shared
Ray); in-worker cases run the loop in process. The forward-raises case through Ray is in
tests/test_resume.py (its failed run is then resumed).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytorch.cluster.trainer import TorchTrainer
from raytorch.core.config import TrainerConfig
from raytorch.core.errors import ConfigError, DataError, ResourceError, TrainingError
from raytorch.engine.train import InProcessContext, run_loop
from tests._flaky import flaky_model


def _trainer(tmp_path: Path, **over) -> TorchTrainer:
    base = {
        "identifier": "bad",
        "key": ("x", "y"),
        "objective": "cross_entropy",
        "loader_kwargs": {"batch_size": 8},
        "max_iterations": 4,
        "seed": 0,
        "storage_path": str(tmp_path / "runs"),
    }
    return TorchTrainer.model_validate({**base, **over})


def _rows(n: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"x": rng.random(64, dtype=np.float32), "y": int(i % 10)} for i in range(n)]


def _corrupt_parquet(tmp_path: Path) -> str:
    good = tmp_path / "data"
    good.mkdir()
    pq.write_table(pa.table({"x": [1.0], "y": [1]}), good / "part-0.parquet")
    (good / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    return str(good)


def _with(rows: list[dict], index: int, **values) -> list[dict]:
    out = [dict(r) for r in rows]
    out[index].update(values)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "over", "error", "match"),
    [
        ("string column", {}, DataError, r"column 'x' has type string, not numbers"),
        ("ragged column", {}, DataError, r"column 'x' holds arrays of different shapes"),
        ("nan feature", {}, DataError, r"column 'x' has NaN or inf in 1 row\(s\), first at row 7"),
        ("inf target", {}, DataError, r"column 'y' has NaN or inf in 1 row\(s\), first at row 3"),
        ("empty", {}, DataError, r"train_data is an empty list"),
        ("empty shard", {"compute_kwargs": {"num_workers": 2, "num_cpus": 0.5}}, DataError,
         r"some worker's shard would be empty"),
        ("big batch", {"loader_kwargs": {"batch_size": 64}}, DataError,
         r"batch_size=64 is larger than the training data \(40 rows"),
        ("missing key", {"key": ("pixels", "y")}, DataError, r"no column 'pixels'"),
        ("corrupt parquet", {}, DataError, r"part-1\.parquet is not a readable parquet file"),
        ("resources", {"compute_kwargs": {"num_gpus": 1}}, ResourceError,
         r"asks for CPU=1, GPU=1 per task, but no node"),
        ("bad resume", {"resume_from": "nowhere"}, Exception, r"no complete checkpoint"),
    ],
)  # fmt: skip
def test_bad_data_and_resources_fail_on_the_driver(ray_local, tmp_path, case, over, error, match):
    rows = _rows()
    train: object = rows
    if case == "string column":
        train = [{"x": "abc", "y": 1}] * 40
    elif case == "ragged column":
        train = _with(rows, 5, x=np.zeros(3, dtype=np.float32))
    elif case == "nan feature":
        x = rows[7]["x"].copy()
        x[2] = np.nan
        train = _with(rows, 7, x=x)
    elif case == "inf target":
        train = [{"x": r["x"], "y": float(r["y"])} for r in rows]
        train[3]["y"] = math.inf
    elif case == "empty":
        train = []
    elif case == "empty shard":
        train = rows[:1]
    elif case == "corrupt parquet":
        train = _corrupt_parquet(tmp_path)
    with pytest.raises(error, match=match):
        _trainer(tmp_path, **over).fit(flaky_model(), train, rows[:16])
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # nothing written for a refused run


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"learning_rate": 0.1}, r"learning_rate\s+Extra inputs are not permitted"),
        ({"max_iterations": "many"}, r"max_iterations\s+Input should be a valid integer"),
        ({"batch_size": 4, "epochs": 0}, r"batch_size: put it in loader_kwargs"),
        ({"optimizer_cls": "Adamm", "epochs": 0}, r"optimizer_cls='Adamm'"),
    ],
)
def test_bad_config_lists_the_field_and_the_fix(config, match):
    base = {"identifier": "c", "key": ["x", "y"], "objective": "mse", "max_iterations": 3}
    with pytest.raises(ValueError, match=match):
        TorchTrainer.model_validate({**base, **config})


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        TrainerConfig.model_validate(
            {"identifier": "c", "key": ["x", "y"], "objective": "nope", "epochs": 0}
        )
    text = str(info.value)
    assert "epochs=0 must be >= 1" in text and "objective='nope'" in text


# ---------------------------------------------------------------------------------------------
# In the worker's loop (in process: the same code as on Ray, without the start-up)


def _loop_cfg(**over) -> TrainerConfig:
    base = {
        "identifier": "l",
        "key": ["x", "y"],
        "objective": "cross_entropy",
        "max_iterations": 6,
        "validation_interval": 2,
        "seed": 0,
    }
    return TrainerConfig.model_validate({**base, **over})


def _batches(n: int = 4, targets_nan: bool = False):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(8, 64, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        out.append((x, y))
    if targets_nan:
        out = [(x, torch.full((8, 10), math.nan)) for x, _ in out]
    return out


def test_forward_that_raises_names_rank_and_iteration_and_chains_the_error(tmp_path):
    model = flaky_model(str(tmp_path / "marker"), fail_at=3)
    ctx = InProcessContext(_batches(), _batches(2), rank=0, world_size=1)
    with pytest.raises(TrainingError) as info:
        run_loop(model, _loop_cfg(), ctx, seed=0)
    assert re.search(
        r"rank 0 of 1 failed at iteration 3 \(training step\), epoch 0: "
        r"ValueError: boom in forward",
        str(info.value),
    )
    assert isinstance(info.value.__cause__, ValueError)


def test_objective_returning_a_non_scalar_is_named():
    cfg = _loop_cfg(objective="torch.nn.functional:l1_loss")  # placeholder, replaced below
    cfg = cfg.model_copy(update={"objective": lambda out, y: (out - out).sum(dim=1)})
    ctx = InProcessContext(_batches(), _batches(2))
    # Bad input found inside the worker is the user's to fix: a ConfigError (exit 2).
    with pytest.raises(ConfigError, match=r"iteration 0 \(validation\).*the objective returned "
                       r"a tensor of shape \[8\], not a scalar tensor"):  # fmt: skip
        run_loop(flaky_model(), cfg, ctx, seed=0)


def test_nan_targets_inside_the_worker_stop_the_run_with_a_message():
    # Data streamed to workers is not checked on the driver: the loop's finite check stops it.
    cfg = _loop_cfg(objective="mse")
    valid = [(x, torch.zeros(8, 10)) for x, _ in _batches(2)]
    ctx = InProcessContext(_batches(targets_nan=True), valid)
    result = run_loop(flaky_model(), cfg, ctx, seed=0)
    assert result.stop_reason.value == "non_finite"
    assert "is nan at iteration 2" in result.stop_message  # the weights went NaN
    assert result.stopped_iteration == 2  # stopped at the first validation after a step


# ---------------------------------------------------------------------------------------------
# Safety: nothing loads pickles or evaluates strings from files


def test_package_never_evaluates_or_unpickles_untrusted_input():
    root = Path(__file__).resolve().parents[1] / "raytorch"
    pattern = re.compile(r"(?<![.\w])(eval|exec)\(|pickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load")
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(root.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
    loads = [
        f"{path.name}:{n}"
        for path in sorted(root.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "torch.load(" in line and "weights_only=True" not in line
    ]
    assert loads == []


def test_job_file_with_a_python_object_tag_is_refused(tmp_path):
    jobs = pytest.importorskip("raytorch.jobs.files")
    path = tmp_path / "job.yaml"
    path.write_text("kind: train\nname: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(jobs.JobFileError, match="not valid YAML"):
        jobs.read_job_file(path)
    assert not (tmp_path / "pwned").exists()
