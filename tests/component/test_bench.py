"""`python -m service.bench tdsm` on the tiny size: the report's shape, scoring agreement, the memory probe.

Timings are never asserted. Tests pin torch to one thread: on a shared, oversubscribed CPU two OpenMP threads
can make tiny ops 100x slower, and the numbers here only need to exist.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from service.benchmarks.common import PeakMemory, memory_method
from service.benchmarks.tdsm import (
    bench_config,
    build_denoiser,
    compare_scores,
    contention_warning,
    make_scoring_inputs,
    open_gates,
    time_scoring,
)
from service.cli.bench import BENCHMARKS, main
from trainers.tdsm_fit import build_schedule

CPU = torch.device("cpu")
TINY_ARGS = ["--sizes", "tiny", "--batch", "4", "--iters", "1", "--warmup", "0", "--candidates", "3",
             "--score-samples", "4", "--draws", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    """One CLI run on the tiny size (its size runs in a fresh subprocess): the JSON report and the table."""
    out, table = tmp_path_factory.mktemp("bench") / "bench.json", io.StringIO()
    before = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(table):
            assert main(["tdsm", *TINY_ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return json.loads(out.read_text()), table.getvalue()


def test_registry_has_every_benchmark():
    assert {"tdsm", "cocodiff", "prepare", "encoder"} <= set(BENCHMARKS)
    assert all(callable(b.run) for b in BENCHMARKS.values())


def test_tdsm_report_has_every_measurement(tiny_run):
    report, table = tiny_run
    assert report["benchmark"] == "tdsm" and report["isolation"] == "one subprocess per size"
    for key in ("cpu_model", "cpu_cores_usable", "torch", "torch_threads", "cpu_fast_bf16", "device",
                "cpu_busy_before", "load_average"):
        assert key in report["machine"]
    assert report["machine"]["torch_threads"] == 1
    tiny = report["sizes"]["tiny"]
    assert tiny["model"]["parameters"] > 0 and tiny["model"]["text_tokens"] == 35
    train = tiny["train"]
    assert train["rows"] == 2 * train["batch"] == 8
    for precision in ("fp32", "bf16"):
        assert train[precision]["median_s"] > 0 and train[precision]["samples_per_s"] > 0
        assert train[precision]["peak_mib"] >= 0 and train[precision]["loss_finite"]
        assert train[precision]["cpu_share"] > 0
    assert train["bf16_speedup"] > 0
    (row,) = tiny["score"]
    assert (row["candidates"], row["samples"], row["draws"]) == (3, 4, 2)
    for key in ("batched_bf16", "loop_bf16", "batched_fp32"):
        assert row[key]["pairs_per_s"] > 0 and row[key]["rows_per_s"] == pytest.approx(2 * row[key]["pairs_per_s"])
        assert row[key]["peak_mib"] >= 0
    assert row["batched_over_loop"] > 0 and row["bf16_over_fp32"] > 0
    assert 0 <= row["agreement_bf16_batched_vs_loop"]["argmin_agreement"] <= 1
    assert "training step" in table and "zero-shot scoring" in table and "tiny" in table


def starved_copy(report: dict, share: float, busy: float) -> dict:
    """The report with every cpu_share and the machine's busy fractions replaced."""
    report = json.loads(json.dumps(report))
    report["machine"].update(cpu_busy_before=busy, cpu_busy_after=busy)
    for r in report["sizes"].values():
        timings = [r["train"]["fp32"], r["train"]["bf16"]]
        timings += [row[k] for row in r["score"] for k in ("batched_bf16", "loop_bf16", "batched_fp32")]
        for t in timings:
            t["cpu_share"] = share
    return report


def test_contention_is_flagged(tiny_run):
    report, _ = tiny_run
    assert contention_warning(starved_copy(report, share=1.0, busy=0.0)) is None
    assert "tiny" in contention_warning(starved_copy(report, share=0.2, busy=0.0))
    assert "90% busy" in contention_warning(starved_copy(report, share=1.0, busy=0.9))


def test_batched_and_loop_scoring_agree_in_fp32(one_thread):
    cfg = bench_config("tiny")
    model = open_gates(build_denoiser(cfg, 0, CPU), torch.Generator().manual_seed(0)).eval()
    inputs = make_scoring_inputs(samples=5, draws=2, candidates=4, seed=0, device=CPU)
    timed = {mode: time_scoring(model, build_schedule(cfg), inputs, 25, mode, "fp32", CPU, 0, 1, mode)
             for mode in ("batched", "loop")}
    batched, loop = timed["batched"][1], timed["loop"][1]
    assert batched.shape == (2, 5, 4)
    assert batched.std(-1).min() > 0          # open gates: candidates do not tie
    # fp32 GEMMs of different shapes: the scores agree to a few ulps of their magnitude, not bit for bit.
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-6)
    agreement = compare_scores(batched, loop)
    assert agreement["argmin_agreement"] == 1.0
    assert agreement["max_abs_diff"] <= 1e-4 * loop.abs().max().item() + 1e-6


def test_peak_memory_sees_a_freed_allocation():
    if not memory_method(CPU).startswith("CPU: process RSS high-water mark"):
        pytest.skip("no resettable RSS high-water mark on this OS")
    with PeakMemory(CPU) as mem:
        x = torch.ones(32 * 2**20 // 4)       # 32 MiB, touched
        del x
    assert mem.peak_mib > 24


def test_bad_counts_are_input_errors(tmp_path, capsys):
    assert main(["tdsm", "--iters", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--iters must be >= 1" in capsys.readouterr().err


def test_encoder_bench_reports_training_and_extraction_for_both_precisions(tmp_path, one_thread, capsys):
    out = tmp_path / "enc.json"
    assert main(["encoder", "--sizes", "chain", "--batch", "2", "--extract-batch", "3", "--frames", "8",
                 "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    chain = report["sizes"]["chain"]
    assert chain["parameters"] > 0
    for precision in ("fp32", "bf16"):
        assert chain[precision]["train_samples_per_s"] > 0 and chain[precision]["extract_samples_per_s"] > 0
    assert "chain" in capsys.readouterr().out


def test_prepare_bench_times_every_worker_count(tmp_path, capsys):
    out = tmp_path / "prep.json"
    assert main(["prepare", "--files", "3", "--workers", "1", "2", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["workers"] for r in runs] == [1, 2] and all(r["ok"] == 3 for r in runs)
    assert main(["prepare", "--files", "0", "--out", str(out)]) == 2


@pytest.mark.parametrize("fmt", ["kinetics", "pku"])
def test_prepare_bench_reads_the_other_formats(tmp_path, fmt):
    out = tmp_path / "prep.json"
    assert main(["prepare", "--format", fmt, "--files", "6", "--workers", "1", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["format"] == fmt and run["ok"] == run["samples"] >= 6 and run["samples_per_s"] > 0
    if fmt == "kinetics":
        assert run["files"] == 6                       # one clip a sample
    else:
        assert run["files"] <= run["samples"]          # sequences of one or more labelled samples


def test_serve_bench_times_cold_and_warm_texts_per_candidate_count(tmp_path, one_thread, capsys):
    out = tmp_path / "serve.json"
    assert main(["serve", "--classes", "2", "3", "--batch", "2", "--iters", "1", "--noise-draws", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["classes"]) == {"2", "3"} and report["noise_draws"] == 1
    for timings in report["classes"].values():
        assert set(timings) == {"1 cold", "1 warm", "batch cold", "batch warm"}
        assert all(t["median_s"] > 0 for t in timings.values())
    assert "1 seq cold" in capsys.readouterr().out
