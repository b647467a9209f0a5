"""CoCoDiff data-parallel training (slow): a real 2-worker Ray Train TorchTrainer (gloo on CPU) runs fit_cocodiff
with Ray's prepare_model as the DDP wrapper, the way `service.methods.cocodiff.fit_trial` does for
`--workers-per-trial 2`. Both ranks must end with identical weights (gradients averaged, BatchNorm buffers
broadcast) that moved away from the initial ones, having trained on different shards of each global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trainers.config import build_config
from trainers.configs import CoCoDiffConfig

pytestmark = pytest.mark.slow

CLASSES, STEPS = 4, 6
TINY = {"backbone.encoder": "stgcn", "backbone.base_channels": 8, "backbone.units_per_stage": [1, 1],
        "module.hidden": 32, "module.depth": 1, "module.align_dim": 16, "optim.batch_size": 8,
        "optim.warmup_steps": 1, "optim.lr": 3e-3, "train.steps": STEPS, "train.eval_every": 3,
        "train.checkpoint_every": 3, "train.device": "cpu", "train.precision": "fp32", "train.threads": 1,
        "module.fine_dropout": 0.2}


def toy_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(40, 3, 8, 25, 2) sequences whose mean depends on the class, (40,) labels; identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(CLASSES).repeat_interleave(10)
    x = torch.randn(len(y), 3, 8, 25, 2, generator=g) + y.float()[:, None, None, None, None] * 0.5
    return x, y


def ddp_loop(config: dict) -> None:
    """A Ray Train worker: fit with DDP, then save this rank's weights and training losses."""
    import ray.train
    import ray.train.torch

    from trainers.cocodiff_fit import fit_cocodiff
    from trainers.tracking import ListReporter

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = build_config(CoCoDiffConfig, {}, TINY)
    x, y = toy_data()
    g = torch.Generator().manual_seed(1)
    fine, coarse = torch.randn(CLASSES, 12, generator=g), torch.randn(CLASSES, 10, generator=g)
    reporter = ListReporter()
    result = fit_cocodiff(cfg, x, y, x[:12], y[:12], fine, coarse, reporter, Path(config["out"]) / f"run{rank}",
                          progress=False, num_classes=CLASSES, wrap_model=ray.train.torch.prepare_model, rank=rank,
                          world_size=world)
    weights = {f"classifier.{k}": v for k, v in result.classifier.state_dict().items()}
    weights |= {f"module.{k}": v for k, v in result.module.state_dict().items()}
    torch.save({"weights": weights, "losses": [m["train/loss"] for _, m in reporter.metrics],
                "evaluations": [m for _, m, _, _ in reporter.evaluations], "world": world},
               Path(config["out"]) / f"rank{rank}.pt")


def test_two_ddp_workers_keep_identical_weights(tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.cocodiff_classifier import build_classifier
    from trainers.runtime import seed_everything

    ray.init(address="local", num_cpus=4, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers need not import tests/
        TorchTrainer(ddp_loop, train_loop_config={"out": str(tmp_path)},
                     torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "ray"))).fit()
    finally:
        ray.shutdown()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["weights"].keys() == r1["weights"].keys()
    different = [k for k in r0["weights"] if not torch.equal(r0["weights"][k], r1["weights"][k])]
    assert not different, f"ranks diverged: {different[:5]}"
    # Each rank saw its own shard (different losses), and both evaluated the same weights identically.
    assert r0["losses"] != r1["losses"] and r0["evaluations"] == r1["evaluations"] and len(r0["evaluations"]) == 2
    # Training moved the weights away from rank 0's initialisation (what DDP broadcast at wrap time).
    cfg = build_config(CoCoDiffConfig, {}, TINY)
    seed_everything(cfg.train.seed)
    init = build_classifier(cfg.backbone, CLASSES).state_dict()
    moved = [k for k, v in init.items()
             if v.is_floating_point() and not torch.equal(v, r0["weights"][f"classifier.{k}"])]
    assert len(moved) > len(init) // 2
