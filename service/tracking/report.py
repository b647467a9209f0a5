"""The paper's table across splits: `python -m service.report --splits A B ... [--tracking-uri URI] [--out DIR]`.

One row per named split, read from MLflow (MlflowClient only: any tracking URI, local or a remote server).
Sweep side: the sweep the split's final run was started from (its tag source_sweep_run_id), else the newest
finished TDSM sweep parent run of the split (`service.sweep`, tags phase=sweep, sweep=<name>): its best trial's
validation objective (param sweep.objective, e.g. `val/zsl_top1_max`; never test) and the chosen T,
τ (loss.margin), λ (loss.triplet_weight), lr and t_test.
Final side: the latest finished TDSM final run (`service.final`, tags phase=final, method=tdsm) and two numbers of
ours, each mean ± std over the seed child runs, beside the paper's top-1 from the split's `reference:` block
(search_spaces/tdsm_splits.yaml):
- `test/zsl_top1`: each seed's accuracy averaged over its K evaluation noise draws (the paper's protocol);
- `test/zsl_top1_ensemble`: each seed's accuracy of the argmin of the error summed over the K draws (the metric of
  the official code, which sums the errors of 3 fixed noises).
A third cell, where the split's features have a GZSL test set (gtest.npy), gives generalised zero-shot accuracy on
the seen-class and unseen-class samples with every class a candidate, and their harmonic mean (`test/gzsl_seen`,
`test/gzsl_unseen`, `test/gzsl_h`), each the mean over seeds; uncalibrated.
Splits whose `reference.group` is shared (SMIE's three random splits) also get a row with the mean over the group,
which is what the paper reports. Cells are empty ("–") where a split has no sweep or no final yet. Writes
paper_table.md and paper_table.csv under --out (default $SKELDIFF_RESULTS/report), prints the markdown, and logs
both (artifacts report/paper_table.{md,csv}) on every final parent run it read and on one run of the experiment
`skeldiff-report`. `service.final` calls `write_report` itself at the end of a TDSM final.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from service.storage import Storage
from service.tracking.store import MLflowReporter, experiment_ids, search_pages, standard_tags
from trainers.errors import InputError

TOP1, ENSEMBLE = "test/zsl_top1", "test/zsl_top1_ensemble"
# (metric of a seed run, row name) of the generalised zero-shot metrics (SynSE / SA-DVAE's seen, unseen, H)
GZSL = (("test/gzsl_seen", "ours_gzsl_seen"), ("test/gzsl_unseen", "ours_gzsl_unseen"), ("test/gzsl_h", "ours_gzsl_h"))
ARTIFACT_DIR = "report"
REPORT_EXPERIMENT = "skeldiff-report"
# (column suffix, dotted config key) of the sweep's chosen hyper-parameters, read from its best trial's params
SWEEP_PARAMS = (("T", "diffusion.num_train_timesteps"), ("tau", "loss.margin"), ("lambda", "loss.triplet_weight"),
                ("lr", "optim.lr"))
CSV_FIELDS = ("split", "protocol", "paper_top1", "ours_top1_mean", "ours_top1_std_seeds", "ours_ensemble_mean",
              "ours_ensemble_std_seeds", "delta_top1", "ours_gzsl_seen_mean", "ours_gzsl_seen_std_seeds",
              "ours_gzsl_unseen_mean", "ours_gzsl_unseen_std_seeds", "ours_gzsl_h_mean", "ours_gzsl_h_std_seeds",
              "seeds", "draws", "t_test", "T", "run_id",
              "sweep_metric", "sweep_best_val", "sweep_T", "sweep_tau", "sweep_lambda", "sweep_lr", "sweep_t_test",
              "sweep_trials", "sweep_name", "sweep_run_id", "sweep_best_run_id", "paper_source")


def newest_parent_run(client, filter_string: str):
    """The newest run matching `filter_string` that is no child run (trials and seeds carry the same tags)."""
    ids = experiment_ids(client)
    if not ids:
        return None
    runs = search_pages(client, ids, filter_string, ["attributes.start_time DESC"])
    return next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None)


def _check_split(split: str) -> None:
    if "'" in split:
        raise InputError(f"--splits {split!r}: split names cannot contain quotes")


def latest_final_run(client, split: str):
    """The newest finished TDSM final parent run of `split` in any experiment, or None."""
    _check_split(split)
    return newest_parent_run(client, f"tags.phase = 'final' AND tags.split = '{split}' AND tags.method = 'tdsm' "
                                     "AND attributes.status = 'FINISHED'")


def latest_sweep_run(client, split: str):
    """The newest finished TDSM sweep parent run of `split` in any experiment, or None."""
    _check_split(split)
    # tags.sweep (the sweep's name) is on the parent only: the server skips the trial runs
    return newest_parent_run(client, f"tags.phase = 'sweep' AND tags.split = '{split}' AND tags.method = 'tdsm' "
                                     "AND tags.sweep LIKE '%' AND attributes.status = 'FINISHED'")


def sweep_for(client, split: str, final_run):
    """The sweep a final run was started from (its tag source_sweep_run_id, when that sweep was on this split and
    finished), else the newest finished sweep of the split."""
    source = final_run.data.tags.get("source_sweep_run_id") if final_run is not None else None
    if source:
        try:
            run = client.get_run(source)
        except MlflowException:   # deleted since
            run = None
        if run is not None and run.data.tags.get("split") == split and run.info.status == "FINISHED":
            return run
    return latest_sweep_run(client, split)


def sweep_result(client, run) -> dict[str, Any]:
    """The sweep side of a row: its best trial's validation objective and chosen hyper-parameters."""
    tags, params = run.data.tags, run.data.params
    metric = params.get("sweep.metric", "val/zsl_top1")
    objective = params.get("sweep.objective") or f"{metric}_max"       # older sweeps logged no sweep.objective
    out: dict[str, Any] = {"sweep_run_id": run.info.run_id, "sweep_name": tags.get("sweep") or run.info.run_name,
                           "sweep_metric": objective, "sweep_trials": params.get("sweep.num_samples")}
    value = next((run.data.metrics[k] for k in (f"sweep/best_{objective.replace('/', '_')}",
                                                 f"sweep/best_{metric.replace('/', '_')}") if k in run.data.metrics),
                 None)                                                # logged by the driver at the end
    best = None
    if tags.get("best_run_id"):
        try:
            best = client.get_run(tags["best_run_id"])
        except MlflowException:   # the trial run was deleted: the parent's own figure stays
            best = None
    if best is not None:
        value = best.data.metrics.get(objective, value)
        out["sweep_best_run_id"] = best.info.run_id
        out.update({f"sweep_{name}": best.data.params.get(key) for name, key in SWEEP_PARAMS})
        out["sweep_t_test"] = best.data.tags.get("best_t_test")
    if value is not None and math.isfinite(value):
        out["sweep_best_val"] = value
    return out


def run_result(client, run) -> dict[str, Any]:
    """Ours for one final parent run: mean ± std over its seed child runs of both top-1 metrics."""
    children = search_pages(client, [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    seeds = [c.data.metrics for c in children if TOP1 in c.data.metrics]
    params = run.data.params
    out: dict[str, Any] = {"run_id": run.info.run_id, "seeds": len(seeds), "draws": params.get("final.noise_draws"),
                           "t_test": params.get("eval.t_test"), "T": params.get("diffusion.num_train_timesteps")}
    for key, name in ((TOP1, "ours_top1"), (ENSEMBLE, "ours_ensemble"), *GZSL):
        values = [m[key] for m in seeds if key in m]
        if values:
            out[f"{name}_mean"] = statistics.fmean(values)
            out[f"{name}_std_seeds"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def report_rows(results: dict[str, dict[str, Any] | None], refs: dict[str, dict[str, Any]],
                sweeps: dict[str, dict[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    """One row per split (its final or sweep may be missing: not run yet), then one per complete reference group."""
    rows = []
    for split, ours in results.items():
        ref = refs.get(split, {})
        row = {"split": split, "protocol": ref.get("protocol", ""), "paper_top1": ref.get("top1"),
               "paper_source": ref.get("source") or ref.get("note") or "", **(ours or {}),
               **((sweeps or {}).get(split) or {})}
        if row["paper_top1"] is not None and "ours_top1_mean" in row:
            row["delta_top1"] = row["ours_top1_mean"] - row["paper_top1"]
        rows.append(row)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if refs.get(row["split"], {}).get("group") and "ours_top1_mean" in row:
            groups.setdefault(refs[row["split"]]["group"], []).append(row)
    for group, members in groups.items():
        ref = refs[members[0]["split"]]
        row = {"split": f"{group} (mean of {len(members)} splits)", "protocol": ref.get("protocol", ""),
               "paper_top1": ref.get("top1"), "paper_source": ref.get("source") or ref.get("note") or "",
               "seeds": members[0].get("seeds"), "draws": members[0].get("draws"),
               "t_test": members[0].get("t_test"), "T": members[0].get("T"), "group_of": len(members)}
        for name in ("ours_top1", "ours_ensemble", *(name for _, name in GZSL)):
            means = [m[f"{name}_mean"] for m in members if f"{name}_mean" in m]
            if len(means) == len(members):   # std over the splits' means
                row[f"{name}_mean"] = statistics.fmean(means)
                row[f"{name}_std_seeds"] = statistics.pstdev(means) if len(means) > 1 else 0.0
        if row["paper_top1"] is not None and "ours_top1_mean" in row:
            row["delta_top1"] = row["ours_top1_mean"] - row["paper_top1"]
        rows.append(row)
    return rows


def _pm(row: dict[str, Any], name: str) -> str:
    if f"{name}_mean" not in row:
        return "not run"
    return f"{row[f'{name}_mean']:.2f} ± {row[f'{name}_std_seeds']:.2f}"


def _num(value: Any) -> str:
    """A logged param (a string in MLflow) in 3 significant digits, '–' when absent."""
    if value in (None, ""):
        return "–"
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return str(value)


def gzsl_cell(r: dict[str, Any]) -> str:
    """Seen / unseen / H (means over seeds), '–' without a GZSL test set, 'not run' without a final run."""
    if "ours_top1_mean" not in r:
        return "not run"
    if not all(f"{name}_mean" in r for _, name in GZSL):
        return "–"
    return " / ".join(f"{r[f'{name}_mean']:.2f}" for _, name in GZSL)


def sweep_cells(r: dict[str, Any]) -> str:
    """The sweep's two cells: best validation objective (trials), chosen T / τ / λ / lr / t_test."""
    if "sweep_run_id" not in r:
        return "– | –"
    best = f"{r['sweep_best_val']:.2f}" if "sweep_best_val" in r else "no best trial"
    n = r.get("sweep_trials")
    trials = f" ({n} trial{'' if str(n) == '1' else 's'})" if n else ""
    chosen = " / ".join(_num(r.get(f"sweep_{k}")) for k in ("T", "tau", "lambda", "lr", "t_test"))
    return f"{best}{trials} | {chosen if 'sweep_best_run_id' in r else '–'}"


def markdown_report(rows: list[dict[str, Any]]) -> str:
    """The table (paper beside ours, then the sweep that chose the config), then the source of every paper figure."""
    head = ("| split | protocol | paper top-1 % | ours top-1 % (mean over noise draws) | "
            "ours top-1 % (\"ensemble\": summed error over draws) | Δ ours − paper | seeds × draws | t_test / T | "
            "ours GZSL seen / unseen / H % | sweep: best val % | sweep: chosen T / τ / λ / lr / t_test |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines, notes = [], []
    for r in rows:
        paper = ("–" if not r["protocol"] else "not verified" if r["paper_top1"] is None
                 else f"{r['paper_top1']:.2f}")
        if r["paper_source"] and "group_of" not in r and r["protocol"] not in {n[0] for n in notes}:
            notes.append((r["protocol"], r["paper_source"]))
        delta = f"{r['delta_top1']:+.2f}" if "delta_top1" in r else "–"
        draws = f"{r.get('seeds', '–')} × {r.get('draws') or '–'}" if "ours_top1_mean" in r else "–"
        if "group_of" in r:
            draws = f"{r['group_of']} splits × {r.get('seeds', '–')} seeds"
        t = f"{r.get('t_test') or '–'} / {r.get('T') or '–'}" if "ours_top1_mean" in r else "–"
        lines.append(f"| {r['split']} | {r['protocol'] or '–'} | {paper} | {_pm(r, 'ours_top1')} | "
                     f"{_pm(r, 'ours_ensemble')} | {delta} | {draws} | {t} | {gzsl_cell(r)} | {sweep_cells(r)} |")
    legend = ("\nOurs: mean ± std over training seeds (population std; on a group row, over the splits' means). "
              "The paper averages 10 noise draws; the official code sums the errors of 3 fixed noises (\"ensemble\"). "
              "Δ uses the mean over draws. GZSL: generalised zero-shot on the split's gtest (held-out samples of "
              "seen and unseen classes, every class a candidate): accuracy on the seen-class samples, on the "
              "unseen-class samples, and their harmonic mean H, each the mean over seeds; uncalibrated (no bias "
              "subtracted from seen-class scores). Sweep: the sweep the final run was started from, else the "
              "split's newest; its best trial's validation objective (classes carved from the seen ones, never "
              "test) and the hyper-parameters it chose (τ = loss.margin, λ = loss.triplet_weight).\n")
    sources = "".join(f"\n- {protocol}: {source}" for protocol, source in notes)
    return head + "\n".join(lines) + "\n" + legend + ("\nPaper figures:" + sources + "\n" if notes else "")


def csv_report(rows: list[dict[str, Any]]) -> str:
    """The same rows as CSV (full precision, empty cells where a value is missing)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def write_report(uri: str, runs: dict[str, str | None], refs: dict[str, dict[str, Any]], out: Storage,
                 log: bool = True, report_run: bool = False) -> tuple[str, str]:
    """Table for {split: final parent run id (None: the latest final run of that split)}: writes out/paper_table.md
    and .csv, logs both on every final run read (unless log=False) and, with report_run, on a new run of the
    experiment `skeldiff-report`; returns (markdown, csv). refs: each split's paper reference
    (service.data.splits.load_references)."""
    client = MlflowClient(uri)
    results: dict[str, dict[str, Any] | None] = {}
    sweeps: dict[str, dict[str, Any] | None] = {}
    for split, run_id in runs.items():
        run = client.get_run(run_id) if run_id else latest_final_run(client, split)
        results[split] = run_result(client, run) if run is not None else None
        sweep = sweep_for(client, split, run)
        sweeps[split] = sweep_result(client, sweep) if sweep is not None else None
    rows = report_rows(results, refs, sweeps)
    md, table = markdown_report(rows), csv_report(rows)
    (out / "paper_table.md").write_text(md)
    (out / "paper_table.csv").write_text(table)
    if log:
        for result in results.values():
            if result is not None:
                client.log_text(result["run_id"], md, f"{ARTIFACT_DIR}/paper_table.md")
                client.log_text(result["run_id"], table, f"{ARTIFACT_DIR}/paper_table.csv")
        if report_run:   # one place for the table, also when no split has a final run yet
            with MLflowReporter.start(uri, REPORT_EXPERIMENT, f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                                      tags=standard_tags(phase="report", splits=",".join(runs))) as run:
                run.log_text(md, f"{ARTIFACT_DIR}/paper_table.md")
                run.log_text(table, f"{ARTIFACT_DIR}/paper_table.csv")
    return md, table

