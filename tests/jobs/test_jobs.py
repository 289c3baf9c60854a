"""Job files: overrides, validation with every problem at once, resources, modules on workers."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from raytorch.core.errors import JobFileError
from raytorch.core.predict_config import PredictConfig
from raytorch.engine.model import TorchModel
from raytorch.jobs.files import (
    DataSource,
    PredictJob,
    TrainJob,
    apply_overrides,
    job_from_dict,
    load_job,
    parse_overrides,
)
from raytorch.jobs.run import build_model, check_resources, ship_job_modules, write_resolved

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"


def _train_config(**changes: object) -> dict:
    config = {
        "name": "t",
        "python_path": [str(JOBS)],
        "model": {"class": "digits:MLP", "kwargs": {"hidden": 8}},
        "data": {"train": "digits:load_split", "valid": "digits:load_split"},
        "trainer": {"key": ["x", "y"], "objective": "cross_entropy", "max_iterations": 5},
    }
    config["data"] = {
        "train": {"function": "digits:load_split", "kwargs": {"split": "train"}},
        "valid": {"function": "digits:load_split", "kwargs": {"split": "valid"}},
    }
    config.update(changes)
    return config


def _predict_config(**predict: object) -> dict:
    return {
        "name": "p",
        "python_path": [str(JOBS)],
        "model": {"class": "digits:MLP"},
        "data": "data/features.parquet",
        "predict": {"key": "x", **predict},
    }


# -- overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("trainer.max_iterations=100", ("trainer.max_iterations", 100)),
        ("trainer.optimizer_kwargs.lr=1e-3", ("trainer.optimizer_kwargs.lr", 0.001)),
        ("trainer.optimizer_kwargs.lr=3.0e-4", ("trainer.optimizer_kwargs.lr", 0.0003)),
        ("model.args=[64, 10]", ("model.args", [64, 10])),
        ("model={path: runs/x/best}", ("model", {"path": "runs/x/best"})),
        ("trainer.run_name=null", ("trainer.run_name", None)),
        ("name=digits", ("name", "digits")),
        ("name=", ("name", "")),
        ("flag=true", ("flag", True)),
        ("expr=a: b: c", ("expr", "a: b: c")),  # not YAML: kept as text
    ],
)
def test_parse_overrides(item: str, expected: tuple) -> None:
    assert parse_overrides([item]) == [expected]


def test_parse_overrides_lists_every_bad_item() -> None:
    with pytest.raises(JobFileError) as info:
        parse_overrides(["novalue", "=1", "a..b=2", "ok=1"])
    assert len(info.value.problems) == 3
    assert "dotted.key=value" in str(info.value)


def test_apply_overrides_sets_creates_and_indexes_without_mutating() -> None:
    config = {"trainer": {"max_iterations": 5}, "model": {"args": [1, 2]}}
    out = apply_overrides(
        config,
        [
            ("trainer.max_iterations", 7),
            ("trainer.loader_kwargs.batch_size", 8),
            ("model.args.1", 3),
        ],
    )
    assert out == {
        "trainer": {"max_iterations": 7, "loader_kwargs": {"batch_size": 8}},
        "model": {"args": [1, 3]},
    }
    assert config["trainer"] == {"max_iterations": 5}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("trainer.max_iterations.x", 1), "trainer.max_iterations is 5, not a mapping"),
        (("model.args.5", 1), "model.args.5 is not an index of a 2-list"),
    ],
)
def test_apply_overrides_errors(override: tuple, message: str) -> None:
    with pytest.raises(JobFileError, match=message):
        apply_overrides({"trainer": {"max_iterations": 5}, "model": {"args": [1, 2]}}, [override])


# -- validation ------------------------------------------------------------------------------


def test_every_problem_is_listed_with_its_path_and_the_file(tmp_path: Path) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text(
        textwrap.dedent(
            f"""\
            python_path: [{JOBS}]
            modle: 1
            model: {{class: "digitz:MLP"}}
            data:
              train: {{function: "digits:load_split", kwargs: {{splt: train}}}}
              valid: data/valid.parquet
            trainer:
              key: [x, y]
              objective: cross_entropyy
              optimizer_cls: Adamm
              max_iterations: many
              compute_kwargs: {{num_workers: 2, num_cpu: 1}}
            """
        )
    )
    with pytest.raises(JobFileError) as info:
        load_job(job, ["trainer.listen=valid/acc"])
    message = str(info.value)
    assert message.startswith(f"{job}: 8 problems:")
    expected = [
        "modle: unknown key (did you mean 'model'?)",
        "model.class: cannot import module 'digitz'",
        "data.train.kwargs: digits:load_split got an unexpected keyword argument 'splt'",
        "trainer.compute_kwargs.num_cpu: unknown key (did you mean 'num_cpus'?)",
        "trainer.max_iterations: Input should be a valid integer",
        # Hidden by the field errors above in plain pydantic; found by a second pass.
        "trainer.objective: 'cross_entropyy' is not a callable; did you mean 'cross_entropy'?",
        "trainer.optimizer_cls: 'Adamm' is not an optimizer in torch.optim; did you mean 'Adam'",
        "trainer.listen: 'valid/acc' is not a computed metric",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in info.value.problems), (line, info.value.problems)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [unclosed", "not valid YAML"),
        ("- a list", "a job file is a mapping of sections, not a list"),
        ("kind: eval\nmodel: {}", "kind: 'eval' is not a job kind"),
    ],
)
def test_unreadable_job_files(tmp_path: Path, text: str, message: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(JobFileError, match=message) as info:
        load_job(job)
    assert str(job) in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="cannot read the job file"):
        load_job(tmp_path / "nope.yaml")


def test_kind_is_inferred_and_checked() -> None:
    assert isinstance(job_from_dict(_train_config()), TrainJob)
    assert isinstance(job_from_dict(_predict_config()), PredictJob)
    with pytest.raises(JobFileError, match="run it with `raytorch train`"):
        job_from_dict(_train_config(), kind="predict")


@pytest.mark.parametrize(
    ("value", "path", "function"),
    [
        ("digits:load_split", None, "digits:load_split"),
        ("data/x.parquet", "data/x.parquet", None),
        ("s3://bucket/x/", "s3://bucket/x/", None),
    ],
)
def test_data_shorthand(value: str, path: str | None, function: str | None) -> None:
    sys.path.insert(0, str(JOBS))
    try:
        source = DataSource.model_validate(value)
    finally:
        sys.path.remove(str(JOBS))
    assert (source.path, source.function) == (path, function)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"class": "digits:MLP", "path": "runs/x"}, "give exactly one of 'class'"),
        ({}, "give exactly one of 'class'"),
        ({"path": "runs/x", "seed": 1}, "drop them with 'path'"),
        ({"class": "digits:FEATURES"}, "is a int, not a class or function"),
    ],
)
def test_model_section_errors(model: dict, message: str) -> None:
    with pytest.raises(JobFileError, match=message):
        job_from_dict(_train_config(model=model))


def test_data_rows_reaches_each_split_and_the_function() -> None:
    config = _train_config()
    config["data"]["rows"] = 7
    config["data"]["valid"]["rows"] = 3
    job = job_from_dict(config)
    assert isinstance(job, TrainJob)
    assert len(job.data.train.load()) == 7
    assert job.data.valid is not None and len(job.data.valid.load()) == 3


def test_a_function_without_rows_is_refused_when_rows_is_set() -> None:
    config = _train_config()
    config["data"]["train"] = {"function": "digits:MLP", "rows": 5}
    with pytest.raises(JobFileError, match=r"data\.train\.kwargs: .*'rows' comes from data"):
        job_from_dict(config)


def test_predict_options_mirror_raytorch_predict() -> None:
    # Every option a predict job accepts is a keyword of raytorch.predict itself.
    import inspect

    from raytorch.cluster.inference import predict

    parameters = inspect.signature(predict).parameters
    assert set(PredictConfig.model_fields) <= set(parameters)


def test_resolved_job_file_reruns_the_same_job(tmp_path: Path) -> None:
    source = tmp_path / "t.yaml"
    config = _train_config()
    config.pop("python_path")
    source.write_text(yaml.safe_dump(config))
    (tmp_path / "digits.py").write_text((JOBS / "digits.py").read_text())
    job = load_job(source, ["trainer.max_iterations=9", "data.rows=4"])
    written = write_resolved(job, tmp_path / "run")
    assert written.read_text().startswith(f"# raytorch train {written}")
    again = load_job(written)
    assert isinstance(again, TrainJob) and again.trainer.max_iterations == 9
    assert again.data.rows == 4 and again.python_path == [str(tmp_path)]


# -- models ----------------------------------------------------------------------------------


def test_build_model_from_each_kind_of_class() -> None:
    job = job_from_dict(_train_config())
    built = build_model(job.model.model_copy(update={"seed": 0}), "t")
    again = build_model(job.model.model_copy(update={"seed": 0}), "t")
    assert isinstance(built, TorchModel) and built.identifier == "t"
    assert built.factory is not None and built.factory.kwargs == {"hidden": 8}
    for a, b in zip(built.object.parameters(), again.object.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded: the same random weights
    plain = job.model.model_copy(update={"class_": "torch.nn:Linear", "kwargs": {}, "args": [4, 2]})
    assert isinstance(build_model(plain, "lin").object, torch.nn.Linear)
    wrong = job.model.model_copy(
        update={"class_": "digits:load_split", "args": ["train"], "kwargs": {}}
    )
    with pytest.raises(TypeError, match="returned a list; it must build a TorchModel"):
        build_model(wrong, "t")


# -- resources -------------------------------------------------------------------------------

_TWO_CPUS = [{"CPU": 2.0, "memory": 8e9}]


@pytest.mark.parametrize(
    ("compute", "problem"),
    [
        ({"num_workers": 2, "num_cpus": 0.5}, None),
        ({"num_workers": 1, "num_gpus": 1}, "trainer.compute_kwargs asks for CPU=1, GPU=1"),
        ({"num_workers": 4, "num_cpus": 1}, "hold only 2 such worker"),
    ],
)
def test_check_resources_of_training(compute: dict, problem: str | None) -> None:
    config = _train_config()
    config["trainer"]["compute_kwargs"] = compute
    problems, notes = check_resources(job_from_dict(config), _TWO_CPUS)
    if problem is None:
        assert problems == [] and "2 worker(s)" in notes[0]
    else:
        assert len(problems) == 1 and problem in problems[0]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"concurrency": 2, "compute_kwargs": {"num_cpus": 0.5}}, None),
        ({"concurrency": 2, "compute_kwargs": {"num_cpus": 1}}, "predict.compute_kwargs.num_cpus"),
        ({"compute_kwargs": {"num_gpus": 1}}, "predict.compute_kwargs.num_gpus=1"),
    ],
)
def test_check_resources_of_inference(options: dict, problem: str | None) -> None:
    problems, notes = check_resources(job_from_dict(_predict_config(**options)), _TWO_CPUS)
    if problem is None:
        assert problems == [] and "left for reading/writing" in notes[0]
    else:
        assert len(problems) == 1 and problems[0].startswith(problem)


# -- modules next to the job file reach Ray workers -----------------------------------------


def test_job_modules_reach_workers_by_value(tmp_path: Path, ray_local) -> None:
    import importlib.util

    from ray import cloudpickle

    name = f"jobmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def rows(n=2, rows=None):\n    return [{'v': i} for i in range(rows or n)]\n"
    )
    job = job_from_dict(
        {
            **_predict_config(),
            "data": {"function": f"{name}:rows"},
            "python_path": [".", str(JOBS)],
        },
        base_dir=tmp_path,
    )
    try:
        assert name in ship_job_modules(job)
        module = sys.modules[name]
        find = ray_local.remote(importlib.util.find_spec)
        assert ray_local.get(find.remote(name)) is None  # workers cannot import it by name...
        remote_rows = ray_local.remote(module.rows)
        assert ray_local.get(remote_rows.remote(3)) == [
            {"v": 0},
            {"v": 1},
            {"v": 2},
        ]  # ...yet run it
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[name])
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


def test_two_job_directories_with_a_module_of_the_same_name_each_get_their_own(tmp_path):
    import importlib

    from raytorch.jobs.files import python_path

    for value in (1, 2):
        (tmp_path / f"job{value}").mkdir()
        (tmp_path / f"job{value}" / "shared_name_mod.py").write_text(f"number = {value}\n")
    try:
        for value in (1, 2, 1):
            with python_path(tmp_path / f"job{value}", ["."]):
                module = importlib.import_module("shared_name_mod")
                assert module.number == value
    finally:
        sys.modules.pop("shared_name_mod", None)


_THREE_NODES = [{"CPU": 0.0}, {"CPU": 4.0, "fast": 1.0}, {"CPU": 4.0}]  # a CPU-less head


@pytest.mark.parametrize(
    ("trainer", "problem"),
    [
        # A local directory is a different one on each node: refused, naming the ways out.
        ({}, "trainer.storage_path='runs/' is a local directory, and this cluster has 3 nodes"),
        ({"storage_path": "s3://bucket/runs"}, None),
        ({"storage_shared": True}, None),
        (
            {"compute_kwargs": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"}},
            "trainer.storage_path",  # the storage problem comes first
        ),
        (
            {
                "storage_shared": True,
                "compute_kwargs": {"num_workers": 3, "placement_strategy": "STRICT_SPREAD"},
            },
            "trainer.compute_kwargs.placement_strategy=STRICT_SPREAD puts each of the 3 workers "
            "on a node of its own, but only 2 node(s)",
        ),
        (
            {
                "storage_shared": True,
                "compute_kwargs": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
            },
            None,
        ),
        (
            {
                "storage_shared": True,
                "compute_kwargs": {"num_workers": 6, "placement_strategy": "STRICT_PACK"},
            },
            "no node of this cluster can hold more than 4",
        ),
        (
            {
                "storage_shared": True,
                "compute_kwargs": {"num_workers": 2, "resources": {"fast": 1}},
            },
            "hold only 1 such worker",  # custom resources: one node has one "fast"
        ),
    ],
)
def test_a_cluster_of_several_nodes_needs_shared_storage_and_a_placement_it_can_hold(
    trainer: dict, problem: str | None
) -> None:
    config = _train_config()
    config["trainer"].update(trainer)
    problems, _ = check_resources(job_from_dict(config), _THREE_NODES)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems
        assert "storage_shared: true" in problems[0] or "storage_path" not in problem
