"""A third method, registered from this file alone, runs through `service.run`, a 2-trial `service.sweep` on a real
local Ray and `service.final` (docs/ARCHITECTURE.md, "Adding a third method"): nothing outside this file knows it.

`Toy` fits a scalar towards a target by gradient steps; its objective is a validation "accuracy" that depends on the
learning rate, which the sweep searches. Run as a script, this file registers `Toy` and runs the named CLI:
`python tests/integration/test_third_method.py {run,sweep,final} ARGS...` (Ray workers import it by its module name,
so PYTHONPATH holds this folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from service.methods import register
from service.methods.base import FinalOptions, Method, RunOptions, Trial
from service.methods.common import open_run
from trainers.config import dump_yaml

HERE = Path(__file__).resolve().parent
TARGET = 3.0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToyOptim(Strict):
    lr: float = Field(0.1, gt=0, le=1.5, description="step size")


class ToyTrain(Strict):
    steps: int = Field(6, ge=1)
    eval_every: int = Field(3, ge=1)
    seed: int = 0
    device: str = "auto"


class ToyData(Strict):
    name: str = "toy-data"


class ToyConfig(Strict):
    method: Literal["toy"] = "toy"
    optim: ToyOptim = Field(default_factory=ToyOptim)
    train: ToyTrain = Field(default_factory=ToyTrain)
    data: ToyData = Field(default_factory=ToyData)


def fit(cfg: ToyConfig, target: float, reporter) -> float:
    """Steps of w <- w + lr (target - w); evaluation: 100 (1 - |target - w| / target). Returns the best score."""
    w, best = 0.0, float("-inf")
    for step in range(1, cfg.train.steps + 1):
        w += cfg.optim.lr * (target - w)
        reporter.log_metrics({"train/loss": (target - w) ** 2}, step)
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            score = 100 * (1 - abs(target - w) / target)
            best = max(best, score)
            reporter.log_evaluation({"val/acc": score}, step, {}, None)
    return best


class Toy(Method):
    name = "toy"
    config_cls = ToyConfig
    objective = "val/acc"
    rankable_metrics = ("val/acc",)
    about = "a test's toy method"

    def add_arguments(self, parser, command: str) -> None:
        if command == "final":
            parser.add_argument("--toy-repeats", type=int, default=1, help="toy: fits per seed")

    def options(self, given, command: str) -> dict[str, Any]:
        return {"repeats": given["toy_repeats"]} if command == "final" else {}

    def split_name(self, cfg: ToyConfig) -> str:
        return cfg.data.name

    def prepare(self, cfg: ToyConfig) -> float:
        return TARGET

    def fit_trial(self, trial: Trial) -> None:
        fit(trial.cfg, trial.data, trial.reporter)

    def run(self, cfg: ToyConfig, opts: RunOptions) -> dict[str, Any]:
        run_dir, reporter = open_run(opts, self.split_name(cfg), "toy0000000", cfg)
        with reporter:
            reporter.log_text(dump_yaml(cfg), "config.yaml")
            best = fit(cfg, self.prepare(cfg), reporter)
        return {"val/acc_max": round(best, 4), "mlflow_run_id": reporter.run_id, "run_dir": str(run_dir)}

    def final(self, opts: FinalOptions, targets: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        rows = []
        for split, tree in targets:
            cfg = ToyConfig.model_validate(tree)
            scores = [fit(cfg, TARGET, Quiet()) for _ in range(opts.seeds * opts.extra["repeats"])]
            rows.append({"split": split, "lr": cfg.optim.lr, "scores": scores})
        (opts.out / "toy-table.json").write_text(json.dumps(rows))
        return {"method": self.name, "rows": rows, "out": str(opts.out)}


class Quiet:
    def log_metrics(self, metrics, step):
        pass

    def log_evaluation(self, metrics, step, artifacts, checkpoint_dir):
        pass


# ----------------------------------------------------------------------------------------------
# The three commands, each in its own process as a user runs them
# ----------------------------------------------------------------------------------------------

def cli(command: str, *argv: str, tmp_path: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "SKELDIFF_RESULTS": str(tmp_path / "results")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(Path(__file__)), command, *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(out: subprocess.CompletedProcess) -> dict[str, Any]:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_third_method_runs_through_run_sweep_and_final(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = last_json(cli("run", "toy", "--set", "optim.lr=0.5", "--tracking-uri", uri, tmp_path=tmp_path))
    assert run["val/acc_max"] == pytest.approx(100 * (1 - 0.5 ** 6))       # w after 6 steps: 3 (1 - 0.5^6)

    space = tmp_path / "toy.yaml"
    space.write_text("method: toy\nmetric: val/acc\nmode: max\nparams:\n  optim.lr: {choice: [0.05, 0.9]}\n")
    sweep = last_json(cli("sweep", "toy", "--space", str(space), "--num-samples", "2", "--scheduler", "fifo",
                          "--search", "random", "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"),
                          tmp_path=tmp_path))
    [summary] = sweep["sweeps"]
    assert summary["split"] == "toy-data" and summary["metric"] == "val/acc_max"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy-toy-data-sweeps")
    trials = client.search_runs([experiment.experiment_id],
                                f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    lrs = [float(r.data.params["optim.lr"]) for r in trials]
    assert len(trials) == 2 and set(lrs) <= {0.05, 0.9}
    winner = max(lrs, key=lambda lr: 1 - abs(1 - lr) ** 6)      # score after 6 steps: 100 (1 - |1 - lr|^6)
    assert summary["best_metric"] == pytest.approx(100 * (1 - abs(1 - winner) ** 6), abs=1e-3)
    best = Path(summary["best_config"])
    assert f"lr: {winner}" in best.read_text() and "method: toy" in best.read_text()

    final = last_json(cli("final", "--from", str(best), "--seeds", "2", "--toy-repeats", "2", "--tracking-uri", uri,
                          "--no-register", tmp_path=tmp_path))
    [row] = final["rows"]
    assert final["method"] == "toy" and row["lr"] == winner and len(row["scores"]) == 4
    assert json.loads((Path(final["out"]) / "toy-table.json").read_text()) == final["rows"]
    # Another method's flag is refused by name, in one line, before anything runs.
    refused = cli("final", "--from", str(best), "--noise-draws", "3", "--tracking-uri", uri, tmp_path=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip() == \
        "error: --noise-draws: tdsm only (its zero-shot data shortcuts and evaluation draws), not a toy flag"


if __name__ == "__main__":
    import test_third_method as plugin  # by its module name: what Ray workers import to unpickle it

    from service.cli import final as final_cli
    from service.cli import run as run_cli
    from service.cli import sweep as sweep_cli

    register(plugin.Toy())
    command, *rest = sys.argv[1:]
    sys.exit({"run": run_cli, "sweep": sweep_cli, "final": final_cli}[command].main(rest))
