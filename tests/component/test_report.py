"""The paper's protocols as named TDSM splits (search_spaces/tdsm_splits.yaml: split files, class lists and
reference figures, checked against the releases in ../shared/data when present) and the cross-split report
(`service.report`, `service.final`'s folder and source sweep): ours beside the paper's figure, read from a sqlite
MLflow store, logged back. A real `service.final --splits` run: tests/integration/test_report_cli.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from service.data.splits import load_references, load_splits
from trainers.config import build_config
from trainers.configs import TDSMConfig
from trainers.errors import InputError
from trainers.prompts import read_prompt_file

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ROOT / "search_spaces" / "tdsm_splits.yaml"
# The 48/12 NTU-60 unseen list of PURLS, SMIE and TDSM (docs/METHODS.md §3), not SynSE's own ru12.npy.
PROTOCOL_48_12 = [3, 5, 9, 12, 15, 40, 42, 47, 51, 56, 58, 59]
# split -> (classes in the data set, unseen classes); SMIE splits take their unseen classes from z_label.npy.
PROTOCOLS = {
    "ntu60-synse-55-5": (60, 5), "ntu60-synse-48-12": (60, 12), "ntu120-synse-110-10": (120, 10),
    "ntu120-synse-96-24": (120, 24), "ntu60-purls-40-20": (60, 20), "ntu60-purls-30-30": (60, 30),
    "ntu120-purls-80-40": (120, 40), "ntu120-purls-60-60": (120, 60),
    **{f"ntu60-smie-55-5-split{i}": (60, 5) for i in (2, 3, 4)},
    **{f"ntu120-smie-110-10-split{i}": (120, 10) for i in (2, 3, 4)},
    **{f"pku51-smie-46-5-split{i}": (51, 5) for i in (1, 2, 3)},
}


def real_splits(monkeypatch, root: Path) -> dict[str, dict]:
    """Every features split of the table, resolved against the data root `root`."""
    monkeypatch.setenv("SKELDIFF_DATA", str(root))
    table = yaml.safe_load(SPLITS.read_text())
    names = [n for n, v in table.items() if (v or {}).get("data.source") == "features"]
    return dict(load_splits(SPLITS, names))


def shared_file(path: str, root: Path, zsl: Path) -> Path:
    """A path under the data root -> the same release file in ../shared/data/zsl (README layout)."""
    rel = Path(path).relative_to(root)
    if rel.parts[0] == "class_lists":
        return zsl / "sa-dvae" / rel
    if rel.parts[0] == "label_splits" and len(rel.parts) == 3:          # label_splits/ntu60/ru5.npy: PURLS
        return zsl / "purls" / rel
    assert rel.parts[0] == "label_splits", rel
    return zsl / "synse-zsl" / rel                                      # label_splits/rv5_0.npy: SynSE


# ----------------------------------------------------------------------------------------------
# The named real-data splits
# ----------------------------------------------------------------------------------------------

def test_every_paper_protocol_is_a_named_split_with_a_reference(monkeypatch, tmp_path):
    splits = real_splits(monkeypatch, tmp_path)
    assert set(PROTOCOLS) <= set(splits)
    refs = load_references(SPLITS, list(splits))
    for name, overrides in splits.items():
        assert "reference" not in overrides                              # metadata, never a config key
        cfg = build_config(TDSMConfig, {}, overrides)                    # validates every key and value
        assert cfg.data.features_dir.parent == tmp_path
        assert cfg.text.class_names.suffix == ".csv"                     # prompt 1: the SA-DVAE `label` column
        if not name.startswith("pku51"):
            # The official code reads the NTU-120 prompts for NTU-60 too: their first 60 rows.
            assert cfg.text.class_names.name == "ntu120.csv"
            assert [p.name for p in cfg.text.descriptions] == ["ntu120_llm.txt"]                  # prompt 2
            assert cfg.text.num_classes == (60 if name.startswith("ntu60") else None)
        assert name in refs and refs[name]["protocol"]
    verified = {n: r["top1"] for n, r in refs.items() if r["top1"] is not None}
    assert len(refs) >= 8 and len(verified) >= 4
    assert verified["ntu60-synse-55-5"] == 86.49 and verified["ntu60-synse-48-12"] == 56.03       # docs/METHODS.md §1
    assert verified["ntu120-synse-110-10"] == 74.15 and verified["ntu120-synse-96-24"] == 65.06
    assert {verified[f"ntu60-smie-55-5-split{i}"] for i in (2, 3, 4)} == {88.88}
    assert all(refs[n]["note"] for n in refs if refs[n]["top1"] is None)


def test_split_files_are_the_released_protocols(monkeypatch, tmp_path, shared_data):
    zsl = shared_data / "zsl"
    splits = real_splits(monkeypatch, tmp_path)
    for name, (num_classes, unseen_count) in PROTOCOLS.items():
        cfg = build_config(TDSMConfig, {}, splits[name])
        names_file = shared_file(str(cfg.text.class_names), tmp_path, zsl)
        with names_file.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) >= num_classes and all(r["label"].strip() for r in rows), names_file
        assert len(read_prompt_file(names_file, first=cfg.text.num_classes)) == num_classes, name
        for desc in cfg.text.descriptions or []:                         # pku51: the label only
            assert len(read_prompt_file(shared_file(str(desc), tmp_path, zsl), expected_count=num_classes,
                                        first=cfg.text.num_classes))
        if cfg.data.unseen is None:                                      # SMIE: the feature folder's z_label
            continue
        unseen = np.load(shared_file(str(cfg.data.unseen), tmp_path, zsl)).tolist()
        assert len(unseen) == len(set(unseen)) == unseen_count and 0 <= min(unseen) <= max(unseen) < num_classes
        if name == "ntu60-synse-48-12":
            assert sorted(unseen) == PROTOCOL_48_12
        if isinstance(cfg.data.val_unseen, int):
            assert 0 < cfg.data.val_unseen < num_classes - unseen_count
        else:
            val = np.load(shared_file(str(cfg.data.val_unseen), tmp_path, zsl)).tolist()
            assert len(val) == unseen_count and not set(val) & set(unseen), name      # validation inside seen
        seen_file = zsl / "purls" / cfg.data.unseen.relative_to(tmp_path)
        seen = np.load(seen_file.with_name(f"rs{num_classes - unseen_count}.npy")).tolist()
        assert not set(seen) & set(unseen) and len(set(seen) | set(unseen)) == num_classes, name
    smie = json.loads((zsl / "smie" / "smie_splits_from_config.json").read_text())["optimized_setting_random_splits"]
    assert {d: sorted(len(v) for v in s.values()) for d, s in smie.items()} == \
        {"ntu60": [5, 5, 5], "ntu120": [10, 10, 10], "pku51": [5, 5, 5]}


def test_synse_ru12_is_not_the_protocol_list(shared_data):
    """Why ntu60-synse-48-12 reads PURLS' ntu60/ru12.npy and no SynSE rv12_0.npy (it holds unseen class 56)."""
    synse = shared_data / "zsl" / "synse-zsl" / "label_splits"
    assert sorted(np.load(synse / "ru12.npy").tolist()) != PROTOCOL_48_12
    assert 56 in np.load(synse / "rv12_0.npy").tolist()
    assert sorted(np.load(shared_data / "zsl" / "purls" / "label_splits" / "ntu60" / "ru12.npy").tolist()) \
        == PROTOCOL_48_12


@pytest.mark.parametrize("reference, fragment", [
    ({"top1": 50.0, "source": "t"}, "must be a mapping with protocol and top1"),
    ({"protocol": "p", "top1": 50.0, "source": "t", "seed": 1}, "must be a mapping"),
    ({"protocol": "p", "top1": 150.0, "source": "t"}, "expected a percentage"),
    ({"protocol": "p", "top1": None}, "a note must say why"),
    ({"protocol": "p", "top1": 50.0}, "a source"),
])
def test_bad_reference_blocks_name_the_split(tmp_path, reference, fragment):
    path = tmp_path / "splits.yaml"
    path.write_text(yaml.safe_dump({"s": {"data.source": "synthetic", "reference": reference}}))
    with pytest.raises(InputError, match=fragment) as err:
        load_references(path, ["s"])
    assert f"{path}: s.reference" in str(err.value)
    assert load_splits(path, ["s"]) == [("s", {"data.source": "synthetic"})]


# ----------------------------------------------------------------------------------------------
# service.report from MLflow runs
# ----------------------------------------------------------------------------------------------

def log_final(uri: str, split: str, top1: list[float], ensemble: list[float]) -> str:
    """A finished TDSM final as service.final logs it: a parent (tags, params) and one child run per seed."""
    from service.tracking.store import MLflowReporter, standard_tags

    parent = MLflowReporter.start(uri, f"tdsm-{split}", f"final-{split}",
                                  tags=standard_tags(split=split, phase="final", method="tdsm"))
    parent.log_params({"eval.t_test": 25, "diffusion.num_train_timesteps": 50, "final.noise_draws": 10})
    for i, (a, b) in enumerate(zip(top1, ensemble)):
        child = MLflowReporter.start(uri, f"tdsm-{split}", f"final-{split}-seed{i}", parent_run_id=parent.run_id,
                                     tags=standard_tags(split=split, phase="final", seed=i))
        child.log_metrics({"test/zsl_top1": a, "test/zsl_top1_ensemble": b}, 1)
        child.finish()
    parent.finish()
    return parent.run_id


def test_report_puts_ours_beside_the_paper_and_logs_the_table(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from service.report import main as report_main

    splits = tmp_path / "splits.yaml"
    ref = {"protocol": "SMIE X 55/5 (mean of 3 splits)", "top1": 80.0, "source": "Table 9, row TDSM", "group": "g"}
    splits.write_text(yaml.safe_dump({
        "a": {"data.source": "synthetic", "reference": {"protocol": "P 55/5", "top1": 60.0, "source": "Table 1"}},
        "b": {"data.source": "synthetic", "reference": {"protocol": "Q 30/30", "top1": None, "note": "not here"}},
        **{f"s{i}": {"data.source": "synthetic", "reference": ref} for i in (1, 2)},
        "unrun": {"data.source": "synthetic"}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_final(uri, "a", [50.0, 40.0], [52.0, 44.0])          # an older final of `a`: the report takes the newest
    run_a = log_final(uri, "a", [60.0, 70.0], [61.0, 73.0])
    run_b = log_final(uri, "b", [30.0], [31.0])
    run_s = [log_final(uri, f"s{i}", [70.0 + 10 * i] * 2, [71.0 + 10 * i] * 2) for i in (1, 2)]
    rc = report_main(["--splits", "a", "b", "s1", "s2", "unrun", "--splits-file", str(splits), "--tracking-uri", uri,
                      "--out", str(tmp_path / "out")])
    md = capsys.readouterr().out
    assert rc == 0
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "paper top-1 %" in lines["split"] and "ensemble" in lines["split"]
    # a: seeds 60, 70 -> 65 ± 5 (population std); ensemble 61, 73 -> 67 ± 6; Δ = 65 - 60
    assert "| 60.00 | 65.00 ± 5.00 | 67.00 ± 6.00 | +5.00 | 2 × 10 | 25 / 50 |" in lines["a"]
    assert "| not verified | 30.00 ± 0.00 | 31.00 ± 0.00 | – |" in lines["b"]
    assert "| – | not run | not run |" in lines["unrun"]
    # the group row: the mean of the splits' means 80 and 90, std over the splits 5, beside the paper's 80
    assert "| 80.00 | 85.00 ± 5.00 | 86.00 ± 5.00 | +5.00 | 2 splits × 2 seeds |" in lines["g (mean of 2 splits)"]
    assert "- P 55/5: Table 1" in md and "- Q 30/30: not here" in md
    table = list(csv.DictReader((tmp_path / "out" / "paper_table.csv").open()))
    assert [r["split"] for r in table] == ["a", "b", "s1", "s2", "unrun", "g (mean of 2 splits)"]
    assert table[0]["run_id"] == run_a and float(table[0]["ours_ensemble_mean"]) == 67.0
    assert (tmp_path / "out" / "paper_table.md").read_text() == md.rstrip("\n") + "\n"
    client = MlflowClient(uri)
    for run_id in (run_a, run_b, *run_s):
        assert {a.path for a in client.list_artifacts(run_id, "report")} == \
            {"report/paper_table.md", "report/paper_table.csv"}


def test_report_refuses_a_missing_splits_file(tmp_path, capsys):
    from service.report import main as report_main

    assert report_main(["--splits", "a", "--splits-file", str(tmp_path / "absent.yaml"),
                        "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "absent.yaml: not found" in capsys.readouterr().err


def log_sweep(uri: str, split: str, trials: list[tuple[float, int, float, float, float, int]],
              best: int | None, objective: bool = True) -> str:
    """A finished TDSM sweep as service.sweep logs it: a parent (tags, params, best_run_id, sweep/best_* metric) and
    one child run per trial (T, τ, λ, lr params; val/zsl_top1_max; best_t_test tag). objective=False: as sweeps
    logged it before the sweep.objective param."""
    from service.tracking.store import MLflowReporter, standard_tags

    name = f"tdsm-{split}-smoke-{len(trials)}"
    parent = MLflowReporter.start(uri, f"tdsm-{split}", name,
                                  tags=standard_tags(split=split, phase="sweep", method="tdsm", sweep=name))
    parent.log_params({"sweep.num_samples": len(trials), "sweep.metric": "val/zsl_top1",
                       **({"sweep.objective": "val/zsl_top1_max"} if objective else {})})
    ids = []
    for i, (val, T, tau, lam, lr, t_test) in enumerate(trials):
        child = MLflowReporter.start(uri, f"tdsm-{split}", f"trial{i}", parent_run_id=parent.run_id,
                                     tags=standard_tags(split=split, phase="sweep", method="tdsm",
                                                        ray_trial_name=f"trial{i}"))
        child.log_params({"diffusion.num_train_timesteps": T, "loss.margin": tau, "loss.triplet_weight": lam,
                          "optim.lr": lr})
        child.log_metrics({"val/zsl_top1": val - 1.0, "val/zsl_top1_max": val}, 1)
        child.set_tags({"best_t_test": t_test})
        child.finish()
        ids.append(child.run_id)
    if best is not None:
        parent.set_tags({"best_run_id": ids[best], "best_config": f"/tmp/{name}/best_config.yaml"})
    parent.log_metrics({"sweep/best_val_zsl_top1": trials[best][0] if best is not None else float("nan")}, 0)
    parent.finish()
    return parent.run_id


def test_report_carries_the_sweep_that_chose_the_config(tmp_path, capsys, monkeypatch):
    """Sweep columns: the final's own sweep (tag source_sweep_run_id) over a newer one, the newest sweep of a split
    without a final, none for a split with neither; every search pages on (PAGE=1 here: one run per request)."""
    from mlflow.tracking import MlflowClient

    import service.report as report
    from service.tracking import store

    monkeypatch.setattr(store, "PAGE", 1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    splits = tmp_path / "splits.yaml"
    splits.write_text(yaml.safe_dump({n: {"data.source": "synthetic"} for n in ("a", "b", "c", "none")}))
    own = log_sweep(uri, "a", [(80.0, 10, 0.5, 1.2, 2.0e-3, 9), (91.25, 50, 1.0, 0.75, 1.5e-3, 25)], best=1)
    newer = log_sweep(uri, "a", [(99.0, 10, 2.0, 0.5, 1.0e-3, 5)], best=0)       # not the one `a`'s final came from
    run_a = log_final(uri, "a", [60.0, 70.0], [61.0, 73.0])
    MlflowClient(uri).set_tag(run_a, "source_sweep_run_id", own)
    log_sweep(uri, "b", [(40.0, 10, 0.5, 1.0, 1.0e-3, 1)], best=0)               # older: the newest wins
    run_b = log_sweep(uri, "b", [(55.5, 50, 0.5, 1.1, 3.0e-3, 40), (60.0, 10, 1.0, 0.6, 1.0e-3, 5)], best=1,
                      objective=False)
    log_sweep(uri, "c", [(float("nan"), 10, 0.5, 1.0, 1.0e-3, 1)], best=None)    # every trial failed
    rc = report.main(["--splits", "a", "b", "c", "none", "--splits-file", str(splits), "--tracking-uri", uri,
                      "--out", str(tmp_path / "out")])
    md = capsys.readouterr().out
    assert rc == 0
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "sweep: best val % | sweep: chosen T / τ / λ / lr / t_test |" in lines["split"]
    # the GZSL cell: '–' for a final without GZSL metrics, 'not run' without a final
    assert lines["a"].endswith("| 65.00 ± 5.00 | 67.00 ± 6.00 | – | 2 × 10 | 25 / 50 | – | "
                               "91.25 (2 trials) | 50 / 1 / 0.75 / 0.0015 / 25 |")
    assert lines["b"].endswith("| not run | not run | – | – | – | not run | 60.00 (2 trials) | "
                               "10 / 1 / 0.6 / 0.001 / 5 |")
    assert lines["c"].endswith("| not run | not run | – | – | – | not run | no best trial (1 trial) | – |")
    assert lines["none"].endswith("| not run | not run | – | – | – | not run | – | – |")
    table = {r["split"]: r for r in csv.DictReader((tmp_path / "out" / "paper_table.csv").open())}
    assert table["a"]["sweep_run_id"] == own != newer and float(table["a"]["sweep_best_val"]) == 91.25
    assert table["a"]["sweep_metric"] == "val/zsl_top1_max"
    assert (table["a"]["sweep_T"], table["a"]["sweep_tau"], table["a"]["sweep_lambda"], table["a"]["sweep_lr"],
            table["a"]["sweep_t_test"]) == ("50", "1.0", "0.75", "0.0015", "25")
    assert table["b"]["sweep_run_id"] == run_b and table["b"]["ours_top1_mean"] == ""
    assert table["b"]["sweep_metric"] == "val/zsl_top1_max" and float(table["b"]["sweep_best_val"]) == 60.0
    assert table["c"]["sweep_best_val"] == "" and table["none"]["sweep_run_id"] == ""
    client = MlflowClient(uri)
    (made,) = client.search_runs([client.get_experiment_by_name("skeldiff-report").experiment_id])
    assert made.data.tags["phase"] == "report" and made.data.tags["splits"] == "a,b,c,none"
    assert {a.path for a in client.list_artifacts(made.info.run_id, "report")} == \
        {"report/paper_table.md", "report/paper_table.csv"}
    assert {a.path for a in client.list_artifacts(run_a, "report")} == \
        {"report/paper_table.md", "report/paper_table.csv"}


def test_final_defaults_its_folder_to_the_storage_path_and_names_its_sweep(tmp_path):
    """`final/` never lands in the working directory; a final knows the sweep its config came from."""
    from service.cli.final import build_parser
    from service.orchestration.final import default_out
    from service.tracking.sources import STATE_FILE, source_sweep_run_id

    args = build_parser().parse_args(["--from", "x", "--storage-path", str(tmp_path / "store")])
    assert args.out is None
    out = default_out(args.storage_path, "tdsm", ["synthetic-u5", "synthetic-u12"])
    assert out.parent.local == tmp_path / "store" / "final" and out.name.startswith("tdsm-synthetic-u5+synthetic-u12-")
    assert default_out(args.storage_path, "tdsm", list("abcd")).name.startswith("tdsm-a-and-3-more-")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    best = tmp_path / "sweep" / "best_config.yaml"
    best.parent.mkdir()
    best.write_text("method: tdsm\n")
    assert source_sweep_run_id(str(best), uri) is None                          # no state file beside it
    (best.parent / STATE_FILE).write_text(json.dumps({"parent_run_id": "p1", "split": "a"}))
    assert source_sweep_run_id(str(best), uri) == "p1"
    parent = log_sweep(uri, "a", [(50.0, 10, 0.5, 1.0, 1.0e-3, 1)], best=0)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    trial = client.get_run(parent).data.tags["best_run_id"]
    assert source_sweep_run_id(parent, uri) == parent and source_sweep_run_id(trial, uri) == parent
    assert source_sweep_run_id(log_final(uri, "a", [1.0], [1.0]), uri) is None
