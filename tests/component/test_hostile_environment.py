"""Catalogue of faults of the environment (issue 22 §4): a full disk under the run dir or the text cache, a split
with too few seen classes, two `service.prepare` into one `--out`. Each is one `error:` line and exit code 2, or a
warning that lets the run go on.

The full disk is a real 64 KiB tmpfs where this process may mount one (root); elsewhere torch.save is made to fail
as it does on a full disk (OSError ENOSPC through its file object), which is the fallback, not the goal.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_feature_folder

from service.cli.prepare import main as prepare_main
from service.cli.run import main as run_main
from trainers import io as trainers_io
from trainers.configs import DataConfig
from trainers.data import resolve_split
from trainers.errors import InputError
from trainers.text import _write_cache

TINY = ["--set", "model.preset=tiny", "--set", "train.steps=4", "--set", "train.eval_every=2",
        "--set", "train.checkpoint_every=2", "--set", "optim.batch_size=8", "--set", "optim.warmup_steps=1",
        "--set", "eval.noise_draws=1", "--set", "eval.t_test_grid=[10, 25]", "--set", "train.threads=1",
        "--no-progress"]


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a filesystem with almost no room: a real 64 KiB tmpfs, or (without mount rights) a torch.save
    that fails as on a full disk."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        def no_space(obj, f, *a, **kw):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(trainers_io.torch, "save", no_space)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_checkpoint_on_a_full_disk_is_an_oserror_naming_the_file(full_disk):
    """torch.save to a path raised RuntimeError('unexpected pos ...'): a traceback, the path never named."""
    target = full_disk / "last.pt"
    with pytest.raises(OSError) as info:
        trainers_io.atomic_torch_save({"w": torch.zeros(200_000)}, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert not list(full_disk.iterdir())                               # no partial or temporary file left


def test_a_run_dir_on_a_full_disk_is_one_line(full_disk, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_feature_folder(tmp_path / "feats", num_classes=12, unseen=(2, 7))
    (tmp_path / "names.txt").write_text("\n".join(f"action number {i}" for i in range(12)) + "\n")
    code = run_main(["tdsm", "--features", str(tmp_path / "feats"), "--class-names", str(tmp_path / "names.txt"),
                     "--val-unseen", "2", "--run-dir", str(full_disk / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert str(full_disk / "run") in line and "No space left on device" in line, line


def test_a_full_text_cache_warns_and_goes_on(full_disk, capsys):
    path = full_disk / "text-0123456789abcdef.pt"
    _write_cache(path, {"global_feats": torch.zeros(100_000)})          # no exception: caching is optional
    err = capsys.readouterr().err
    assert f"warning: text-feature cache {full_disk}: could not write {path.name}" in err
    assert "No space left on device" in err and not list(full_disk.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# A split too small to train or validate on (ran > 5 min with no output)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seen, val, expected", [
    ([0, 1, 2], [1, 2], "leaves 1 of 3 seen classes to train on; the triplet loss needs at least 2"),
    ([0, 1, 2, 3], [3], "1 validation class; zero-shot validation needs at least 2"),
])
def test_too_few_seen_classes_are_refused_in_one_line(seen, val, expected):
    with pytest.raises(InputError) as info:
        resolve_split(DataConfig(seen=seen, unseen=[9], val_unseen=val), 10, [9])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_run_cli_refuses_a_val_unseen_leaving_one_seen_class(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_feature_folder(tmp_path / "feats", num_classes=12, unseen=(2, 7))
    (tmp_path / "names.txt").write_text("\n".join(f"action number {i}" for i in range(12)) + "\n")
    start = time.monotonic()
    code = run_main(["tdsm", "--features", str(tmp_path / "feats"), "--class-names", str(tmp_path / "names.txt"),
                     "--val-unseen", "9", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 30, err[-2000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "leaves 1 of 10 seen classes to train on" in line


# ---------------------------------------------------------------------------------------------------------------
# Two prepares into one --out
# ---------------------------------------------------------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_prepare_into_the_same_out_is_refused(tmp_path, capsys):
    """It used to run beside the first and end in a traceback (the first one's data stayed intact)."""
    out = tmp_path / "prepared"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = prepare_main(["synthetic", "--out", str(out), "--classes", "4", "--per-class", "2", "--no-progress"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"error: {out} is in use by pid {holder.pid} (another prepare into the same --out); wait for it, "
                   "stop it, or pass another --out")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]          # nothing generated or written
