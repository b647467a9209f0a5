"""The CPU thread policy: auto thread counts from cores, quota, $OMP_NUM_THREADS and model width; passive OpenMP
waits set before torch loads (CLIs) and forwarded to Ray workers; train.threads / --threads; the contended bench's
arms and table (its real run: tests/integration/test_threads_cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from service.benchmarks.contended import contended_arms, format_contended_report, summarise_contended
from service.cli.options import add_config_args, resolve_config, shortcut_overrides
from service.methods import METHODS
from trainers import runtime
from trainers.config import build_config
from trainers.configs import TDSMConfig
from trainers.errors import InputError
from trainers.runtime import (
    ThreadGovernor,
    apply_thread_policy,
    available_cpus,
    cgroup_cpu_limit,
    machine_cpu_ticks,
    resolve_threads,
)

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# resolve_threads / available_cpus
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, hidden, cpus, env, expected", [
    (3, 64, 2, {}, 3),                              # an explicit train.threads is taken as is
    (0, 768, 8, {}, 8),                             # paper width: every available core
    (0, 256, 2, {}, 2),                             # small preset: wide enough to split
    (0, 64, 8, {}, 1),                              # tiny preset: one thread whatever the cores
    (0, None, 4, {}, 4),                            # no model (a CLI's start): the cores
    (0, 768, 8, {"OMP_NUM_THREADS": "2"}, 2),       # the user's (or Ray's per-worker) OpenMP budget caps it
    (0, 768, 2, {"OMP_NUM_THREADS": "16"}, 2),      # ... but never raises it above the cores
    (0, 768, 8, {"OMP_NUM_THREADS": "3,2"}, 3),     # nested-level list: the outer level counts
    (0, 768, 4, {"OMP_NUM_THREADS": "lots"}, 4),    # not a count: ignored
    (0, 768, 4, {"OMP_NUM_THREADS": "0"}, 4),
])
def test_resolve_threads(requested, hidden, cpus, env, expected):
    assert resolve_threads(requested, hidden, cpus=cpus, environ=env) == expected


def test_resolve_threads_defaults_to_available_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 6)
    assert resolve_threads(0, 768, environ={}) == 6


@pytest.mark.parametrize("text, expected", [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1),
                                            ("max 100000\n", None), ("garbage\n", None)])
def test_cgroup_cpu_limit(tmp_path, text, expected):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert cgroup_cpu_limit(str(path)) == expected


def test_cgroup_cpu_limit_missing_file(tmp_path):
    assert cgroup_cpu_limit(str(tmp_path / "absent")) is None


def test_available_cpus_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 2)
    assert available_cpus() == 2
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 4


def test_apply_thread_policy_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert apply_thread_policy(1, 768) == 1 and torch.get_num_threads() == 1
        assert apply_thread_policy(0, 32) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# ThreadGovernor: threads that follow the machine's load (the chain's in-process encoder)
# ----------------------------------------------------------------------------------------------

def _stat(path: Path, busy: int, idle: int) -> Path:
    """A /proc/stat first line: user nice system idle iowait irq softirq steal."""
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    return path


def test_machine_cpu_ticks_reads_busy_and_total(tmp_path):
    assert machine_cpu_ticks(_stat(tmp_path / "stat", 30, 70)) == (30, 100)
    assert machine_cpu_ticks(tmp_path / "absent") is None
    (tmp_path / "bad").write_text("cpu  x y\n")
    assert machine_cpu_ticks(tmp_path / "bad") is None


@pytest.mark.parametrize("busy_share, own_cores, expected", [
    (0.05, 0.05, 2),      # idle machine: every core
    (0.5, 1.0, 2),        # only this process is busy (one core): both cores are free for it
    (1.0, 0.66, 1),       # two busy processes beside one thread of ours: one thread
    (0.5, 0.0, 1),        # one busy process, ours idle (the probe before the first step): one core left
    (0.6, 1.0, 2),        # a little load from others (0.2 cores): 1.8 free cores run 2 threads
    (0.6, 0.5, 1),        # others on 0.7 cores: 1.3 free run 1
])
def test_governor_runs_on_the_cores_the_others_leave(tmp_path, busy_share, own_cores, expected):
    before = torch.get_num_threads()
    try:
        gov = ThreadGovernor(2, interval_s=60, probe_s=0, stat=_stat(tmp_path / "stat", 0, 1), machine_cpus=2)
        assert gov.threads == 2 and torch.get_num_threads() == 2
        wall, ticks = 2.0, 1000
        gov._mark = (time.monotonic(), 0.0, (0, 0))
        gov._sample = lambda: (gov._mark[0] + wall, own_cores * wall, (int(busy_share * ticks), ticks))
        assert gov.update() == 2                          # within the interval: nothing measured
        assert gov.decide() == expected and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_governor_probes_the_load_before_the_first_step(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    stat = _stat(tmp_path / "stat", 0, 0)
    try:
        assert ThreadGovernor(2, probe_s=0.01, stat=stat, machine_cpus=2).threads == 2   # no ticks passed: kept
        samples = iter([(0, 10), (10, 20)])                                   # all busy while this process slept
        monkeypatch.setattr(runtime, "machine_cpu_ticks", lambda _stat: next(samples))
        assert ThreadGovernor(2, probe_s=0.01, stat=stat, machine_cpus=2).threads == 1
    finally:
        torch.set_num_threads(before)


def test_governor_without_proc_stat_keeps_its_count(tmp_path):
    before = torch.get_num_threads()
    try:
        gov = ThreadGovernor(2, interval_s=0, probe_s=0, stat=tmp_path / "absent", machine_cpus=2)
        assert [gov.update() for _ in range(3)] == [2, 2, 2]
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Wait policy: CLI processes and Ray workers
# ----------------------------------------------------------------------------------------------

def _python(code: str, env_update: dict[str, str | None]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in env_update}
    env.update({k: v for k, v in env_update.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_service_package_sets_passive_wait_only_when_unset_and_before_torch():
    code = "import os, sys, service; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    assert _python(code, {"OMP_WAIT_POLICY": None}) == "PASSIVE False"   # torch not loaded yet: libgomp will see it
    assert _python(code, {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE False"


def _connect_ray_env(monkeypatch, job_env: dict | None) -> dict[str, str]:
    import ray

    from service.orchestration import cluster as sweep

    for key in ("RAY_ADDRESS", "OMP_WAIT_POLICY", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.setenv(key, "x")       # registered, so the test restores whatever was there
        monkeypatch.delenv(key)
    if job_env is not None:
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": job_env}}))
    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(sweep, "install_sigterm_handler", lambda: None)
    sweep.connect_ray(None)
    return seen["runtime_env"]["env_vars"]


def test_ray_workers_get_the_passive_wait_policy(monkeypatch):
    # A Train worker imports torch (ray.train.torch) before any service module: only its env can set the policy.
    assert _connect_ray_env(monkeypatch, None)["OMP_WAIT_POLICY"] == "PASSIVE"


def test_ray_job_wait_policy_is_not_overridden(monkeypatch):
    assert "OMP_WAIT_POLICY" not in _connect_ray_env(monkeypatch, {"OMP_WAIT_POLICY": "ACTIVE"})


# ----------------------------------------------------------------------------------------------
# train.threads and --threads
# ----------------------------------------------------------------------------------------------

def test_train_threads_validation():
    assert build_config(TDSMConfig, {}, {}).train.threads == 0            # auto by default
    assert build_config(TDSMConfig, {}, {"train.threads": 2}).train.threads == 2
    with pytest.raises(InputError, match="train.threads"):
        build_config(TDSMConfig, {}, {"train.threads": -1})


def test_threads_flag_is_a_train_threads_shortcut():
    p = argparse.ArgumentParser()
    add_config_args(p)
    args = p.parse_args(["--threads", "3"])
    assert shortcut_overrides(args) == {"train.threads": 3}
    assert resolve_config(METHODS["tdsm"], args).train.threads == 3
    assert resolve_config(METHODS["cocodiff"], args).train.threads == 3
    assert "train.threads" not in shortcut_overrides(p.parse_args([]))
    with pytest.raises(InputError, match="train.threads"):
        resolve_config(METHODS["tdsm"], p.parse_args(["--threads", "-2"]))


# ----------------------------------------------------------------------------------------------
# The contended benchmark (its table; the real run: tests/integration/test_threads_cli.py)
# ----------------------------------------------------------------------------------------------

def _run(size, n, arm, ms, threads=1, policy="PASSIVE"):
    return {"size": size, "competitors": n, "arm": arm, "round": 0, "threads": threads, "wait_policy": policy,
            "median_s": ms / 1e3, "cpu_share": 0.5, "times_s": [ms / 1e3]}


def test_contended_summary_ratios_and_goal():
    runs = [_run("tiny", 0, "torch default", 300, 2, None), _run("tiny", 0, "auto", 100),
            _run("tiny", 1, "torch default", 2000, 2, None), _run("tiny", 1, "auto", 150),
            _run("tiny", 1, "auto", 130), _run("tiny", 1, "1 thread", 110), {"error": "exit 1"}]
    rows = {(r["competitors"], r["arm"]): r for r in summarise_contended(runs)}
    auto = rows[(1, "auto")]
    assert auto["median_s"] == pytest.approx(0.140) and auto["rounds"] == 2      # median over rounds
    assert auto["vs_best"] == pytest.approx(140 / 110)
    assert auto["vs_alone"] == pytest.approx(140 / 100)
    assert rows[(1, "1 thread")]["vs_alone"] is None                                 # never run alone
    report = {"machine": {"cpu_model": "X", "cpu_cores_usable": 2, "torch": "2", "cpu_busy_before": 0.1},
              "settings": {"sizes": ["tiny"], "competitors": [0, 1], "rounds": 2, "iters": 3, "batch": 32},
              "rows": list(rows.values())}
    text = format_contended_report(report)
    assert "goal (tiny, 1 competitor): auto at 1.27x the best setting (<= 1.5x): met" in text
    assert "(libgomp)" in text


def test_contended_arms_cover_default_one_all_passive_and_auto():
    arms = contended_arms(2)
    assert [(a.name, a.threads, a.torch_first) for a in arms] == [
        ("torch default", 2, True), ("1 thread", 1, False), ("2 passive", 2, False), ("auto", 0, False)]
