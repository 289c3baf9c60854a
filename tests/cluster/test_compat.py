"""Ray's own noise kept out of a healthy run's output, and only that."""

from __future__ import annotations

import logging
import os

import pytest

from raytorch.cluster.compat import drop_stderr_lines, quiet_ray_loggers


def test_only_the_named_lines_are_dropped_from_fd_2_and_fd_2_is_restored(capfd):
    with drop_stderr_lines(b"NOISE"):
        os.write(2, b"keep one\n[core_worker.cc] NOISE from C++\nkeep two\n")
        os.write(2, b"a line in two ")
        os.write(2, b"writes\nlast line without newline")
    os.write(2, b"\nafter the block NOISE\n")  # restored: nothing is filtered any more
    err = capfd.readouterr().err
    assert err == (
        "keep one\nkeep two\na line in two writes\nlast line without newline\n"
        "after the block NOISE\n"
    )


def test_at_debug_nothing_is_dropped(capfd):
    raytorch_logger = logging.getLogger("raytorch")
    level = raytorch_logger.level
    raytorch_logger.setLevel(logging.DEBUG)
    try:
        with drop_stderr_lines(b"NOISE"):
            os.write(2, b"NOISE shown at debug\n")
    finally:
        raytorch_logger.setLevel(level)
    assert capfd.readouterr().err == "NOISE shown at debug\n"


def test_the_worker_hook_silences_the_progress_notice_and_the_deprecation(caplog, recwarn):
    import warnings

    with warnings.catch_warnings():
        quiet_ray_loggers()  # what every Ray worker of raytorch's runs at start
        warnings.warn(
            "`ExecutionOptions.exclude_resources` is deprecated", DeprecationWarning, stacklevel=1
        )
        warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)
    notices = logging.getLogger("ray.data._internal.progress")
    with caplog.at_level(logging.WARNING, logger="ray.data._internal.progress"):
        notices.warning("Progress bars disabled. To enable, set ...")
        notices.warning("a real problem")
    assert [str(w.message) for w in recwarn] == ["something else is deprecated"]
    assert caplog.messages == ["a real problem"]


_LISTING_TRACEBACK = [
    "Exception in thread pool-18/completion-signaler:",
    "Traceback (most recent call last):",
    '  File ".../ray/data/_internal/dynamic_work_queue.py", line 180, in _signal_completion',
    "    pool.work_queue.put(SENTINEL)",
    "InterruptedError",
]


def test_a_healthy_runs_ray_noise_is_dropped_from_the_driver_and_nothing_else():
    from raytorch.cluster.compat import _QuietLogs

    shown: list[dict] = []
    quiet = _QuietLogs(shown.append)
    kill = (
        "[2026-12-06 13:18:28,744 E 25181 25181] (gcs_server) gcs_actor_scheduler.cc:538: Failed "
        "to kill actor cb80, return status: Invalid: KillActor RPC failed for actor cb80: "
        "RpcError: RPC error: Socket closed rpc_code: 14"
    )
    quiet({"pid": "gcs_server", "is_err": True, "lines": [kill]})
    quiet({"pid": 29711, "is_err": True, "lines": ["before", *_LISTING_TRACEBACK, "after"]})
    # The same lines from another process, another error of that thread, a real GCS error.
    other_error = [*_LISTING_TRACEBACK[:-1], "OSError: [Errno 28] No space left on device"]
    quiet({"pid": 7, "is_err": True, "lines": [kill]})
    quiet({"pid": 29711, "is_err": True, "lines": other_error})
    quiet({"pid": "gcs_server", "is_err": True, "lines": ["Failed to kill actor x: Timeout"]})
    quiet({"pid": 8, "is_err": False, "lines": _LISTING_TRACEBACK[:2]})  # cut: shown
    assert [d["lines"] for d in shown] == [
        ["before", "after"],
        [kill],
        other_error,
        ["Failed to kill actor x: Timeout"],
        _LISTING_TRACEBACK[:2],
    ]
    assert shown[0]["pid"] == 29711 and shown[0]["is_err"]


def test_the_driver_log_filter_wraps_rays_printer_once(ray_local):
    from raytorch.cluster.compat import _private_log_dispatcher, _QuietLogs, quiet_driver_logs

    dispatcher = _private_log_dispatcher()
    quiet_driver_logs()
    quiet_driver_logs()
    printers = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
    assert len(printers) == 1 and isinstance(printers[0], _QuietLogs)
    assert not isinstance(printers[0].handler, _QuietLogs)


def test_every_private_ray_api_is_still_where_raytorch_looks(monkeypatch):
    """A Ray upgrade that moves one fails here, while users run on its fallback."""
    from raytorch.cluster.compat import private_apis, train_start_timeout

    assert all(private_apis().values()), private_apis()
    name, seconds = train_start_timeout()
    assert name == "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" and seconds > 0
    monkeypatch.setenv(name, "7.5")
    assert train_start_timeout() == (name, 7.5)
    monkeypatch.setenv(name, "soon")  # not a number: the default (only a message uses it)
    assert train_start_timeout()[1] == seconds


def _run(code: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_raytorch_the_worker_hook_and_a_quiet_block_import_neither_torch_nor_ray():
    """The hook runs in every worker process of a Ray that raytorch starts, Ray Train's
    controller and helper actors included; a fit with data in memory needs no Ray Data."""
    code = (
        "import sys, raytorch\n"
        "from raytorch.cluster.compat import quiet_ray_data, quiet_ray_loggers\n"
        "quiet_ray_loggers()\n"
        "with quiet_ray_data():\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules))\n"
    )
    assert _run(code) == "[]"


def test_a_local_ray_raytorch_starts_runs_its_hook_without_a_runtime_env():
    """The setup hook runs in every worker (Ray Train's loggers quieted) and the job's env vars
    are set there, yet the job has no runtime env: with one, Ray's own idle workers (started
    with the node, for jobs without one) could not take its tasks, and every worker process
    would start through an extra interpreter.

    In the same Ray (one start, to spare seconds): a predict over parquet runs on raytorch's own
    pool, and the driver never imports Ray Data (0.5 s) for it."""
    code = (
        "import os, sys, time, ray\n"
        "def started(pid):  # the process's start, from /proc (Linux)\n"
        "    ticks = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[19])\n"
        "    boot = next(int(x.split()[1]) for x in open('/proc/stat') if x[:5] == 'btime')\n"
        "    return boot + ticks / os.sysconf('SC_CLK_TCK')\n"
        "from raytorch.cluster.session import ensure_ray\n"
        "os.environ['RAY_ADDRESS'] = 'local'\n"
        "ensure_ray(num_cpus=2, runtime_env={'env_vars': {'RT_JOB_VAR': 'seen'}})\n"
        "time.sleep(3)\n"
        "@ray.remote(num_cpus=1)\n"
        "def where():\n"
        "    import logging\n"
        "    env = dict(ray.get_runtime_context().runtime_env)\n"
        "    quiet = logging.getLogger('ray.train').level == logging.WARNING\n"
        "    return os.getpid(), 'torch' in sys.modules, env, quiet, os.environ['RT_JOB_VAR']\n"
        "submitted = time.time()\n"
        "pid, torch_loaded, env, quiet, var = ray.get(where.remote())\n"
        "import pyarrow as pa, pyarrow.parquet as pq, tempfile, torch, raytorch\n"
        "model = raytorch.TorchModel('m', object=torch.nn.Linear(2, 1))\n"
        "tmp = tempfile.mkdtemp()\n"
        "pq.write_table(pa.table({'x': [[1.0, 2.0], [3.0, 4.0]]}), tmp + '/in.parquet')\n"
        "s = raytorch.predict(model, tmp + '/in.parquet', tmp + '/out', key='x', concurrency=1)\n"
        "data = 'ray.data' in sys.modules\n"
        "print(started(pid) < submitted - 1, torch_loaded, env, var, quiet, s.rows_written, data)\n"
    )
    # A job's env vars (a job file's PYTHONPATH) reach the workers through their environment.
    assert _run(code) == "True False {} seen True 2 False"


def test_a_users_dataset_runs_quiet_in_raytorch_and_keeps_its_own_settings(ray_local):
    """A Dataset runs by the DataContext it was made under: made with progress bars on (outside
    raytorch), it put Ray Data's bars, or its 'tqdm is not installed' warning, into a fit."""
    import ray.data

    from raytorch.cluster.compat import quiet_dataset
    from raytorch.cluster.sources import quiet_input

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = True
    try:
        users = ray.data.range(10).map_batches(lambda b: {"id": b["id"] * 2})
    finally:
        ctx.enable_progress_bars = saved
    ours = quiet_input(users)
    assert ours is not users and not ours.context.enable_progress_bars
    assert not quiet_dataset(users).context.print_on_execution_start
    assert users.context.enable_progress_bars  # the user's object is untouched
    assert sorted(r["id"] for r in ours.take_all()) == list(range(0, 20, 2))


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 15.0), ("4.5", 4.5), ("abc", 15.0), ("0", 15.0)]
)
def test_how_long_a_silent_cluster_is_waited_for(monkeypatch, caplog, raw, expected):
    from raytorch.cluster.session import lost_after_s

    if raw is None:
        monkeypatch.delenv("RAYTORCH_CLUSTER_LOST_AFTER_S", raising=False)
    else:
        monkeypatch.setenv("RAYTORCH_CLUSTER_LOST_AFTER_S", raw)
    with caplog.at_level("WARNING", logger="raytorch"):
        assert lost_after_s() == expected
    refused = raw in ("abc", "0")
    assert refused == any("is not a number of seconds" in r.getMessage() for r in caplog.records)
