"""Hostile and damaged state files: every checkpoint kind refuses a pickle that would run code (and never runs
it), a truncated or foreign file is a one-line error, and prepare rebuilds a corrupt `.parts` shard or a
truncated / overwritten data.npy instead of trusting it.

Catalogue (loader exercised; "CLI" = the command's `main` or a subprocess, exit code 2):
  encoder.pt                 service.encoder extract --encoder (subprocess once, in-process main otherwise)
  encoder runs/<id>/last.pt  trainers.encoder_fit._resume
  tdsm runs/<id>/last.pt     trainers.tdsm_fit.fit_tdsm (the resume of service.run / a Tune trial)
  tdsm best.pt               trainers.tdsm_fit.load_best (service.run after training) and the resume check
  cocodiff last.pt           trainers.cocodiff_fit._resume
  cocodiff best.pt           load_classifier, CoCoDiff.trial_artifacts (a trial's last artifacts)
  registry bundles           service.tracking.registry ZeroShotTDSM / SkeletonClassifierModel .load_context,
                             trainers.zero_shot.load_chain (the served chain)
  text-feature cache         trainers.text._load_cached: ignored with a warning and recomputed (never run)
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config

from trainers import cocodiff_classifier, cocodiff_fit, encoder_fit, tdsm_fit
from trainers.data import FeatureSplit
from trainers.errors import InputError
from trainers.io import REFUSED, load_checkpoint
from trainers.text import TextFeatures
from trainers.tracking import ListReporter

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # torch on a protocol-5 pickle


class Payload:
    """Unpickling this calls Path.touch(marker): the stand-in for any code a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def write_hostile(path: Path, marker: Path, form: str) -> Path:
    """A checkpoint-shaped dict whose weights are the payload: torch.save's zip format or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": Payload(marker), "classifier": Payload(marker), "config": {}, "step": 1}
    if form == "torch":
        torch.save(blob, path)
    else:
        path.write_bytes(pickle.dumps(blob, protocol=2))          # torch's legacy (non-zip) format is a bare pickle
    return path


FORMS = ["torch", "pickle"]


def test_a_newer_protocol_pickle_is_refused_unread(tmp_path, marker):
    """Protocol 4+ framing is itself outside the weights-only unpickler: refused before any global is read."""
    path = tmp_path / "last.pt"
    path.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(InputError, match="refused unread") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def assert_refused(err: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message and REFUSED in message
    assert not marker.exists(), "the payload ran"


def test_the_payload_is_live(tmp_path, marker):
    """The same file loaded the old way (weights_only=False) runs the payload: the refusals below are real."""
    path = write_hostile(tmp_path / "x.pt", marker, "torch")
    torch.load(path, weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------------------------
# Every checkpoint kind
# ----------------------------------------------------------------------------------------------

def test_encoder_pt_through_the_cli_exits_2_without_running_it(tmp_path, marker):
    enc = write_hostile(tmp_path / "encoder.pt", marker, "torch")
    data = tmp_path / "prepared"
    data.mkdir()
    np.save(data / "label.npy", np.arange(4))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "service.encoder", "extract", "--data", str(data), "--unseen", "1",
                          "--encoder", str(enc), "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert str(enc) in line and REFUSED in line and "Traceback" not in res.stderr
    assert not marker.exists()


@pytest.mark.parametrize("form", FORMS)
def test_encoder_pt_in_process_cli(tmp_path, marker, form, capsys):
    from service.encoder import main

    enc = write_hostile(tmp_path / "encoder.pt", marker, form)
    data = tmp_path / "prepared"
    data.mkdir()
    np.save(data / "label.npy", np.arange(4))
    code = main(["extract", "--data", str(data), "--unseen", "1", "--encoder", str(enc), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and REFUSED in err and not marker.exists()


@pytest.mark.parametrize("form", FORMS)
def test_encoder_last_pt(tmp_path, marker, form):
    path = write_hostile(tmp_path / "run" / "last.pt", marker, form)
    with pytest.raises(InputError) as err:
        encoder_fit._resume(path, "fp", None, None, 10)
    assert_refused(err, path, marker)


@pytest.mark.parametrize("form", FORMS)
def test_tdsm_last_pt_on_resume(tmp_path, marker, form):
    run_dir = tmp_path / "runs" / "x"
    path = write_hostile(run_dir / tdsm_fit.LAST, marker, form)
    g = torch.Generator().manual_seed(0)
    train = FeatureSplit(torch.randn(8, 16, generator=g), torch.arange(2).repeat(4))
    text = TextFeatures(torch.randn(2, 12, generator=g), torch.randn(2, 4, 10, generator=g))
    reporter = ListReporter()
    with pytest.raises(InputError) as err:
        tdsm_fit.fit_tdsm(tiny_config(**{"train.steps": 2}), train, [0, 1], None, [], text, reporter, run_dir,
                          progress=False)
    assert_refused(err, path, marker)
    assert not reporter.metrics                                    # refused before any training step


@pytest.mark.parametrize("form", FORMS)
def test_tdsm_best_pt(tmp_path, marker, form):
    path = write_hostile(tmp_path / tdsm_fit.BEST, marker, form)
    with pytest.raises(InputError) as err:
        tdsm_fit.load_best(tmp_path, torch.nn.Linear(1, 1))
    assert_refused(err, path, marker)
    with pytest.raises(InputError):
        tdsm_fit.load_best_weights(torch.nn.Linear(1, 1), tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("form", FORMS)
def test_cocodiff_last_pt(tmp_path, marker, form):
    path = write_hostile(tmp_path / cocodiff_fit.LAST, marker, form)
    with pytest.raises(InputError) as err:
        cocodiff_fit._resume(tmp_path, "fp", None, None, None, 10, 2)
    assert_refused(err, path, marker)


@pytest.mark.parametrize("form", FORMS)
def test_cocodiff_best_pt(tmp_path, marker, form):
    path = write_hostile(tmp_path / cocodiff_fit.BEST, marker, form)
    with pytest.raises(InputError) as err:
        cocodiff_classifier.load_classifier(path)
    assert_refused(err, path, marker)


def test_cocodiff_best_pt_in_a_trial(tmp_path, marker):
    pytest.importorskip("ray")
    from service.methods.cocodiff import CoCoDiff

    path = write_hostile(tmp_path / cocodiff_fit.BEST, marker, "torch")
    with pytest.raises(InputError) as err:
        CoCoDiff().trial_artifacts(None, {}, tmp_path, (None, []))
    assert_refused(err, path, marker)


@pytest.mark.parametrize("kind", ["tdsm", "cocodiff"])
def test_registry_bundles(tmp_path, marker, kind):
    pytest.importorskip("mlflow")
    from service.tracking.registry import SkeletonClassifierModel, ZeroShotTDSM

    path = write_hostile(tmp_path / "bundle.pt", marker, "torch")
    model = ZeroShotTDSM() if kind == "tdsm" else SkeletonClassifierModel()
    with pytest.raises(InputError) as err:
        model.load_context(SimpleNamespace(artifacts={"bundle": str(path)}))
    assert_refused(err, path, marker)


def test_zero_shot_chain_bundle(tmp_path, marker):
    from trainers.zero_shot import load_chain

    path = write_hostile(tmp_path / "tdsm_chain.pt", marker, "torch")
    with pytest.raises(InputError) as err:
        load_chain(path)
    assert_refused(err, path, marker)


def test_text_cache_is_ignored_and_recomputed(tmp_path, marker):
    from trainers.text import _load_cached

    path = write_hostile(tmp_path / "text-0123456789abcdef.pt", marker, "torch")
    assert _load_cached(path, "k", num_prompts=2, max_tokens=4) is None
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Truncated, foreign and incomplete files
# ----------------------------------------------------------------------------------------------

def good_checkpoint(path: Path) -> Path:
    torch.save({"model": {"w": torch.ones(256, 256)}, "step": 3, "metrics": {"val/zsl_top1": 1.0}}, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "tensor", "no keys"])
def test_damaged_checkpoints_are_one_line_errors(tmp_path, damage):
    path = good_checkpoint(tmp_path / "best.pt")
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("not a checkpoint\n")
    elif damage == "tensor":
        torch.save(torch.ones(3), path)
    else:
        torch.save({"other": 1}, path)
    with pytest.raises(InputError) as err:
        load_checkpoint(path, keys=("model", "metrics"))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def tiny_fit_inputs() -> tuple[FeatureSplit, FeatureSplit, TextFeatures]:
    """Two training classes, two evaluation classes, text for four: the smallest fit_tdsm that checkpoints."""
    g = torch.Generator().manual_seed(0)
    train = FeatureSplit(torch.randn(8, 16, generator=g), torch.arange(2).repeat(4))
    val = FeatureSplit(torch.randn(4, 16, generator=g), torch.tensor([2, 3, 2, 3]))
    text = TextFeatures(torch.randn(4, 12, generator=g), torch.randn(4, 4, 10, generator=g))
    return train, val, text


def test_checkpoints_hold_plain_data_only(tmp_path):
    """What the fit loops save loads with weights_only=True (a model's state and RNG states as tensors)."""
    train, val, text = tiny_fit_inputs()
    cfg = tiny_config(**{"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2})
    tdsm_fit.fit_tdsm(cfg, train, [0, 1], val, [2, 3], text, ListReporter(), tmp_path, progress=False)
    for name in (tdsm_fit.LAST, tdsm_fit.BEST):
        assert isinstance(torch.load(tmp_path / name, weights_only=True), dict)


def test_a_truncated_best_pt_fails_the_resume_before_training(tmp_path):
    """service.run read best.pt after a whole resumed run had trained; now the resume refuses it first."""
    train, val, text = tiny_fit_inputs()
    cfg = tiny_config(**{"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2})
    tdsm_fit.fit_tdsm(cfg, train, [0, 1], val, [2, 3], text, ListReporter(), tmp_path, progress=False)
    best = tmp_path / tdsm_fit.BEST
    best.write_bytes(best.read_bytes()[:100])
    reporter = ListReporter()
    with pytest.raises(InputError, match="best.pt"):
        tdsm_fit.fit_tdsm(cfg, train, [0, 1], val, [2, 3], text, reporter, tmp_path, progress=False)
    assert not reporter.metrics


# ----------------------------------------------------------------------------------------------
# Prepared data: .parts shards and data.npy
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_raw(tmp_path_factory) -> Path:
    from trainers.skeleton.synthetic import write_synthetic_dataset

    raw = tmp_path_factory.mktemp("hostile-raw") / "raw"
    write_synthetic_dataset(raw, 3, 2, 1)
    return raw


def run_prepare(raw: Path, out: Path, **kw) -> tuple[dict, list[str]]:
    from trainers.skeleton.prepare import prepare

    logs: list[str] = []
    summary = prepare("synthetic", raw, out, frames=8, chunk_size=2, progress=False, log=logs.append, **kw)
    return summary, logs


def test_a_truncated_shard_is_parsed_again(synthetic_raw, tmp_path):
    out = tmp_path / "out"
    first, _ = run_prepare(synthetic_raw, out, keep_parts=True)
    reference = np.load(out / "data.npy")
    shards = sorted((out / ".parts").glob("*.npz"))
    (out / "prepare.json").unlink()                                # as if it crashed before finishing
    shards[1].write_bytes(shards[1].read_bytes()[:200])            # ... while a shard was half copied
    again, logs = run_prepare(synthetic_raw, out)
    assert any("discarding corrupt shard" in ln for ln in logs) and any("2 cached, 1 to parse" in ln for ln in logs)
    np.testing.assert_array_equal(np.load(out / "data.npy"), reference)
    assert again["samples"] == first["samples"]


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_a_damaged_data_npy_is_never_up_to_date(synthetic_raw, tmp_path, damage):
    from trainers.skeleton.prepared import read_prepared

    out = tmp_path / "out"
    first, _ = run_prepare(synthetic_raw, out)
    assert set(first["files"]) == {"data.npy", "label.npy", "index.tsv"}
    reference = np.load(out / "data.npy")
    if damage == "truncated":
        raw = (out / "data.npy").read_bytes()
        (out / "data.npy").write_bytes(raw[: len(raw) - 1000])
    else:
        data = np.load(out / "data.npy", mmap_mode="r+")
        data[0] = np.nan                                           # same size, other content
        data.flush()
        del data
    with pytest.raises(InputError) as err:                        # a trainer reading it is refused
        read_prepared(out)
    assert "\n" not in str(err.value) and "data.npy" in str(err.value)
    again, logs = run_prepare(synthetic_raw, out)
    assert not again.get("up_to_date") and any("re-preparing" in ln for ln in logs)
    np.testing.assert_array_equal(np.load(out / "data.npy"), reference)
    assert read_prepared(out).data.shape == reference.shape
    assert run_prepare(synthetic_raw, out)[0]["up_to_date"] is True


def test_a_damaged_data_npy_without_its_raw_input_is_one_line(synthetic_raw, tmp_path):
    out = tmp_path / "out"
    run_prepare(synthetic_raw, out)
    np.save(out / "data.npy", np.full((6, 3, 8, 25, 2), np.nan, np.float32))
    with pytest.raises(InputError) as err:
        run_prepare(tmp_path / "gone", out)
    assert "\n" not in str(err.value) and "gone" in str(err.value)
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["files"]["data.npy"]["sha256"]
