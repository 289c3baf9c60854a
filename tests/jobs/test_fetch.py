"""``raytorch submit --fetch``'s two halves without a cluster: the pack job's log format, and the
checks on what comes back (size and SHA-256, member names, an existing destination)."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest

from raytorch.core.errors import CheckpointError, UploadError
from raytorch.jobs.fetch import END, _unpack, destination, main, pack, read_pack


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "cluster" / "digits-1"
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"status": "completed"}))
    (run / "checkpoints" / "best" / "weights.pt").write_bytes(bytes(range(256)) * 40)
    return run


def test_a_packed_run_directory_comes_back_whole(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main([str(run)]) == 0
    logs = "some job output\n" + capsys.readouterr().out
    data = read_pack(logs, str(run))
    staged = tmp_path / "back"
    _unpack(data, staged)
    for path in run.rglob("*"):
        if path.is_file():
            assert (staged / path.relative_to(run)).read_bytes() == path.read_bytes()


def test_a_damaged_or_missing_archive_is_refused(tmp_path, capsys):
    run = _run_dir(tmp_path)
    main([str(run)])
    lines = capsys.readouterr().out.splitlines()
    body = lines[1]
    lines[1] = ("A" if body[0] != "A" else "B") + body[1:]  # one character changed in transit
    with pytest.raises(UploadError, match="is damaged"):
        read_pack("\n".join(lines), str(run))
    with pytest.raises(UploadError, match="holds no archive"):
        read_pack("\n".join(lines[: lines.index(END)]), str(run))  # cut before the end marker


def test_unsafe_members_and_existing_destinations_are_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(UploadError, match=r"holds '../escape.txt'; refused"):
        _unpack(buffer.getvalue(), tmp_path / "staged")
    assert not (tmp_path / "escape.txt").exists()

    (tmp_path / "dest" / "digits-1").mkdir(parents=True)
    with pytest.raises(UploadError, match="exists; choose another destination"):
        destination(tmp_path / "dest", "/cluster/runs/digits-1")
    assert destination(tmp_path / "dest", "s3://b/runs/digits-2/") == tmp_path / "dest/digits-2"


def test_what_is_not_a_run_directory_or_too_large_is_not_packed(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="is not a run directory here"):
        pack(tmp_path)
    run = _run_dir(tmp_path)
    with pytest.raises(CheckpointError, match=r"put trainer\.storage_path on object storage"):
        pack(run, max_mib=0.001)
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory here" in capsys.readouterr().err
    assert base64.b64decode(base64.b64encode(pack(run)))  # a plain run packs
