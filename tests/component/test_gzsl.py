"""Generalised zero-shot (GZSL, issue #20 §4): the metric maths, the gtest/g_label loader, the generated task's GZSL
set, the tiny-model scoring path, `service.final`'s seed statistics and the report's GZSL cell (a sqlite MLflow
store). `service.run tdsm` logging the GZSL metrics end to end: tests/integration/test_gzsl_cli.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_feature_folder, write_gtest

from trainers.configs import DataConfig
from trainers.data import GZSL_HELD_OUT_DIVISOR, generate_synthetic_task, load_feature_task
from trainers.errors import InputError
from trainers.tdsm_fit import build_model, evaluate_gzsl_split
from trainers.text import TextFeatures
from trainers.zsl import gzsl_from_errors, harmonic_mean

NUM_CLASSES = 12
UNSEEN = [2, 7]
SEEN = [c for c in range(NUM_CLASSES) if c not in UNSEEN]


# ----------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------

def test_harmonic_mean():
    assert harmonic_mean(60.0, 40.0) == pytest.approx(48.0)
    assert harmonic_mean(50.0, 50.0) == pytest.approx(50.0)
    assert harmonic_mean(100.0, 0.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0


def errors_for(predictions: list[list[int]], classes: list[int]) -> torch.Tensor:
    """(K, N, C) errors whose argmin over the candidates is predictions[k][n] (a class id)."""
    K, N = len(predictions), len(predictions[0])
    errors = torch.ones(K, N, len(classes))
    for k, row in enumerate(predictions):
        for n, c in enumerate(row):
            errors[k, n, classes.index(c)] = 0.0
    return errors


def test_seen_and_unseen_accuracy_over_all_candidates():
    classes, seen = [0, 1, 5, 9], [0, 1]           # 5 and 9 unseen; every class a candidate
    labels = torch.tensor([0, 1, 1, 5, 9])
    # draw 0: seen samples 2/3 right, unseen 1/2 (9 is taken for the seen class 0: a seen-unseen confusion counts);
    # draw 1: seen 3/3, unseen 0/2 (both unseen samples go to seen classes, the bias GZSL measures)
    errors = errors_for([[0, 1, 5, 5, 0], [0, 1, 1, 1, 0]], classes)
    m = gzsl_from_errors(errors, labels, classes, seen, t_test=25)
    assert m.seen_draws == pytest.approx([200 / 3, 100.0]) and m.unseen_draws == pytest.approx([50.0, 0.0])
    assert m.seen == pytest.approx(250 / 3) and m.unseen == pytest.approx(25.0)
    assert m.h == pytest.approx(harmonic_mean(250 / 3, 25.0))     # H of the two reported means
    assert m.t_test == 25


def test_h_is_zero_when_every_sample_goes_to_a_seen_class():
    classes, seen = [0, 1, 2], [0, 1]
    labels = torch.tensor([0, 1, 2, 2])
    m = gzsl_from_errors(errors_for([[0, 1, 0, 1]], classes), labels, classes, seen, 0)
    assert m.seen == 100.0 and m.unseen == 0.0 and m.h == 0.0


def test_gzsl_needs_both_sides():
    classes = [0, 1, 2]
    with pytest.raises(ValueError, match="both seen and unseen"):
        gzsl_from_errors(errors_for([[0, 1]], classes), torch.tensor([0, 1]), classes, [0, 1], 0)


# ----------------------------------------------------------------------------------------------
# The loader: gtest.npy + g_label.npy, optional
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path) -> Path:
    return write_feature_folder(tmp_path / "shift_toy_2_r", num_classes=NUM_CLASSES, unseen=UNSEEN)


def load(folder: Path):
    return load_feature_task(DataConfig(source="features", features_dir=folder, val_unseen=2), NUM_CLASSES)


def load_error(folder: Path) -> str:
    with pytest.raises(InputError) as err:
        load(folder)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_gtest_present_gives_a_gzsl_split(folder):
    task = load(write_gtest(folder))
    gtest, classes, seen = task.gzsl_split()
    assert len(gtest) == 3 * NUM_CLASSES and gtest.features.dtype == torch.float32
    assert classes == list(range(NUM_CLASSES)) and seen == SEEN        # every seen and unseen class a candidate


def test_gtest_absent_is_no_gzsl_and_no_error(folder):
    task = load(folder)
    assert task.gtest is None and task.gzsl_split() is None


@pytest.mark.parametrize("case, fragment", [
    ("one_dim", "gtest.npy: expected a 2-D array (N x D features), got shape (36,)"),
    ("width", "gtest.npy: feature width 8 differs from train.npy's 16"),
    ("rows", "g_label.npy: 35 labels for 36 rows of gtest.npy"),
    ("no_labels", "g_label.npy: missing (the GZSL pair gtest.npy + g_label.npy needs both"),
    ("no_features", "gtest.npy: missing (the GZSL pair gtest.npy + g_label.npy needs both"),
    ("only_seen", "g_label.npy: no samples of the unseen classes"),
    ("outside", "g_label.npy: labels outside the class list (0..11)"),
    ("stray", "g_label.npy: labels [3] are neither seen nor unseen classes"),
])
def test_bad_gtest_is_a_one_line_error_naming_the_file(folder, tmp_path, case, fragment):
    write_gtest(folder)
    x, y = np.load(folder / "gtest.npy"), np.load(folder / "g_label.npy")
    if case == "one_dim":
        np.save(folder / "gtest.npy", x[:, 0])
    elif case == "width":
        np.save(folder / "gtest.npy", x[:, :8])
    elif case == "rows":
        np.save(folder / "g_label.npy", y[:-1])
    elif case == "no_labels":
        (folder / "g_label.npy").unlink()
    elif case == "no_features":
        (folder / "gtest.npy").unlink()
    elif case == "only_seen":
        keep = ~np.isin(y, UNSEEN)
        np.save(folder / "gtest.npy", x[keep])
        np.save(folder / "g_label.npy", y[keep])
    elif case == "outside":
        np.save(folder / "g_label.npy", np.where(y == 0, 12, y))
    elif case == "stray":
        # Class 3 without training samples: the default seen set is the classes with samples, so 3 is neither.
        tx, ty = np.load(folder / "train.npy"), np.load(folder / "train_label.npy")
        np.save(folder / "train.npy", tx[ty != 3])
        np.save(folder / "train_label.npy", ty[ty != 3])
    assert str(folder / fragment.split(":")[0]) + ":" + fragment.split(":", 1)[1] in load_error(folder)


# ----------------------------------------------------------------------------------------------
# The generated feature task
# ----------------------------------------------------------------------------------------------

SMALL = {"samples_per_class": 10, "feature_dim": 16, "text_components": 4}


def small_task():
    text = torch.randn(NUM_CLASSES, 24, generator=torch.Generator().manual_seed(5))
    return generate_synthetic_task(DataConfig(unseen=UNSEEN, val_unseen=2, synthetic=SMALL), text)


def test_generated_task_has_a_gzsl_set_of_fresh_seen_and_the_unseen_test_samples():
    task = small_task()
    gtest, classes, seen = task.gzsl_split()
    per_seen = SMALL["samples_per_class"] // GZSL_HELD_OUT_DIVISOR
    assert classes == list(range(NUM_CLASSES)) and seen == SEEN
    held = gtest.select(SEEN)
    assert len(held) == per_seen * len(SEEN) and sorted(set(held.labels.tolist())) == SEEN
    assert torch.equal(gtest.select(UNSEEN).features, task.test.features)    # the unseen part is the ZSL test set
    assert torch.cdist(held.features, task.train.features).min() > 1e-3      # no training row among the seen part


def test_generated_task_tensors_are_those_of_before_gzsl():
    """The GZSL rows come from their own generator: train and test are the tensors the task had before (values
    printed by the code before the GZSL set was added; sums to 1e-6 relative, element values to fp32 rounding)."""
    task = small_task()
    assert float(task.train.features.double().abs().sum()) == pytest.approx(1633.649372914806, rel=1e-6)
    assert float(task.test.features.double().abs().sum()) == pytest.approx(269.9399659708142, rel=1e-6)
    torch.testing.assert_close(task.train.features[3, :3], torch.tensor([0.4938201904296875, -0.3614277243614197,
                                                                        -1.29819655418396]))
    torch.testing.assert_close(task.test.features[5, :3], torch.tensor([0.7702091336250305, -0.43851736187934875,
                                                                       2.452284336090088]))


# ----------------------------------------------------------------------------------------------
# Scoring with a (untrained) tiny denoiser: the trainers path the services call
# ----------------------------------------------------------------------------------------------

def test_evaluate_gzsl_split_scores_every_class_and_is_empty_without_gtest():
    task = small_task()
    g = torch.Generator().manual_seed(0)
    text = TextFeatures(torch.randn(NUM_CLASSES, 12, generator=g), torch.randn(NUM_CLASSES, 4, 10, generator=g))
    cfg = tiny_config(**{"eval.noise_draws": 2, "train.threads": 1})
    torch.manual_seed(0)
    model = build_model(cfg, task.feature_dim, text).eval()
    metrics = evaluate_gzsl_split(cfg, model, task, text)
    assert set(metrics) == {"test/gzsl_seen", "test/gzsl_unseen", "test/gzsl_h"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert metrics["test/gzsl_h"] == pytest.approx(harmonic_mean(metrics["test/gzsl_seen"],
                                                                 metrics["test/gzsl_unseen"]))
    assert evaluate_gzsl_split(cfg, model, task, text) == metrics                 # seeded: the same numbers again
    task.gtest = None
    assert evaluate_gzsl_split(cfg, model, task, text) == {}


# ----------------------------------------------------------------------------------------------
# service.final's statistics and the report
# ----------------------------------------------------------------------------------------------

def test_final_seed_stats_and_table_carry_the_gzsl_means():
    from service.methods.tdsm import markdown_table, seed_stats

    per_seed = [{"test/zsl_top1": 50.0, "test/gzsl_seen": 80.0, "test/gzsl_unseen": 10.0, "test/gzsl_h": 17.0},
                {"test/zsl_top1": 60.0, "test/gzsl_seen": 90.0, "test/gzsl_unseen": 30.0, "test/gzsl_h": 45.0}]
    stats = seed_stats(per_seed, [[50.0], [60.0]])
    assert stats["test/gzsl_seen_mean"] == 85.0 and stats["test/gzsl_unseen_mean"] == 20.0
    assert stats["test/gzsl_h_mean"] == 31.0 and stats["test/gzsl_h_std_seeds"] == 14.0   # mean of each seed's H
    row = {"split": "s", "seen": 10, "unseen": 2, "t_test": 25, "T": 50, "seeds": 2, "draws": 1, **stats}
    assert "| 85.00 / 20.00 / 31.00 |" in markdown_table([row])
    without = seed_stats([{"test/zsl_top1": 50.0}], [[50.0]])
    assert not [k for k in without if "gzsl" in k]
    plain = {k: v for k, v in row.items() if "gzsl" not in k}
    assert "| – | 25 |" in markdown_table([{**plain, **without}])


def test_report_has_a_gzsl_cell(tmp_path, capsys):
    import csv

    from service.report import main as report_main
    from service.tracking.store import MLflowReporter, standard_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    splits = tmp_path / "splits.yaml"
    splits.write_text("a:\n  data.source: synthetic\nb:\n  data.source: synthetic\n")
    for split, gzsl in (("a", [(80.0, 10.0, 17.0), (90.0, 30.0, 45.0)]), ("b", [None])):
        parent = MLflowReporter.start(uri, f"tdsm-{split}", f"final-{split}",
                                      tags=standard_tags(split=split, phase="final", method="tdsm"))
        for i, g in enumerate(gzsl):
            child = MLflowReporter.start(uri, f"tdsm-{split}", f"final-{split}-seed{i}", parent_run_id=parent.run_id,
                                         tags=standard_tags(split=split, phase="final", seed=i))
            extra = dict(zip(("test/gzsl_seen", "test/gzsl_unseen", "test/gzsl_h"), g)) if g else {}
            child.log_metrics({"test/zsl_top1": 50.0, "test/zsl_top1_ensemble": 51.0, **extra}, 1)
            child.finish()
        parent.finish()
    assert report_main(["--splits", "a", "b", "--splits-file", str(splits), "--tracking-uri", uri,
                        "--out", str(tmp_path / "out"), "--no-log"]) == 0
    lines = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ")}
    assert "ours GZSL seen / unseen / H %" in lines["split"]
    assert "| 85.00 / 20.00 / 31.00 |" in lines["a"] and "| – / – | – |" in lines["b"]
    table = {r["split"]: r for r in csv.DictReader((tmp_path / "out" / "paper_table.csv").open())}
    assert float(table["a"]["ours_gzsl_h_mean"]) == 31.0 and float(table["a"]["ours_gzsl_h_std_seeds"]) == 14.0
    assert table["b"]["ours_gzsl_h_mean"] == ""
