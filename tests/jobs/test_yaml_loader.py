"""Job files are read with limits, and numbers as YAML 1.2 reads them."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytorch.core.errors import JobFileError
from raytorch.jobs.files import load_job, parse_overrides
from raytorch.jobs.yaml_loader import MAX_VALUES, load_yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("lr: 1e-3", 0.001),
        ("lr: 5E+2", 500.0),
        ("lr: -2.5e-4", -0.00025),
        ("lr: 0.003", 0.003),
        ("lr: 10", 10),
        ("lr: '1e-3'", "1e-3"),  # quoted: the user asked for text
        ("lr: 1_000", 1000),
    ],
)
def test_numbers_read_as_yaml_1_2_reads_them(text, value):
    assert load_yaml(text, "t.yaml") == {"lr": value}
    key, _, raw = text.partition(": ")
    assert parse_overrides([f"trainer.{key}={raw}"]) == [(f"trainer.{key}", value)]


def _bomb(levels: int = 9) -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(levels):
        prev, name = chr(97 + i), chr(98 + i)
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_a_file_of_nested_aliases_is_refused_before_anything_walks_it(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())  # under 1 KB, ten billion values once expanded
    assert bomb.stat().st_size < 1024
    started = time.monotonic()
    with pytest.raises(JobFileError, match=rf"expands to more than {MAX_VALUES:,} values"):
        load_job(bomb)
    assert time.monotonic() - started < 2
    # A few aliases are fine.
    assert load_yaml("a: &a [1, 2]\nb: *a\n", "ok.yaml") == {"a": [1, 2], "b": [1, 2]}


def test_raytorch_check_of_a_hostile_file_exits_2_in_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())

    def cap() -> None:  # 2 GiB of address space: the file expanded would need far more
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    done = subprocess.run(
        [str(Path(sys.executable).with_name("raytorch")), "check", str(bomb)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=cap,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "expands to more than" in done.stderr and "Traceback" not in done.stderr


def test_an_oversized_file_is_refused_naming_it(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(JobFileError, match=r"(?s)big\.yaml: .*over 1024 KiB"):
        load_job(big)


def test_check_builds_the_optimizer_and_schedule_naming_the_field(tmp_path, capsys):
    from raytorch.jobs.cli import main

    job = str(ROOT / "jobs" / "train_digits.yaml")
    assert main(["check", job, "trainer.optimizer_kwargs.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "trainer.optimizer_kwargs: AdamW({'lr': -1}) refuses them" in err
    assert "Invalid learning rate" in err
    assert main(["check", job, "trainer.optimizer_kwargs={lr: 'fast'}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.optimizer_kwargs.lr: 'fast' is a str, but AdamW takes a number" in err
    assert main(["check", job, "trainer.warmup_iterations=900"]) == 2
    err = capsys.readouterr().err
    assert "warmup_iterations: 900 is not shorter than max_iterations=600" in err


def test_check_reads_the_footers_of_local_inputs_against_the_key(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytorch.jobs.cli import main

    pq.write_table(pa.table({"pixels": [[1.0]], "y": [1]}), tmp_path / "train.parquet")
    job = str(ROOT / "jobs" / "train_digits.yaml")
    code = main(["check", job, f"data.train={tmp_path / 'train.parquet'}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.train.path has no column 'x' (from key)" in err
