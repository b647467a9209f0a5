"""CoCoDiff's data as the service layer resolves it: one function used by `service.run`, `service.sweep` and
`service.final`.

`data.source=prepared` reads `data.prepared_dir` as it is. `data.source=synthetic` (the embedded default) is the
generated NTU-format action set of `trainers.skeleton.synthetic` (46 classes x `data.synthetic.per_class`),
generated and run through `service.prepare synthetic` once, cached under `$SKELDIFF_CACHE/synthetic` (both
stages are no-ops when their inputs did not change). Trainers never run `service.prepare` themselves: they get
the prepared folder from here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from trainers.cocodiff import CoCoDiffConfig
from trainers.cocodiff_fit import SkeletonData, prepare_cocodiff
from trainers.tdsm_task import default_cache_dir


def synthetic_root() -> Path:
    """Where the generated set and its prepared arrays are cached: $SKELDIFF_CACHE/synthetic."""
    return default_cache_dir() / "synthetic"


def prepared_folder(cfg: CoCoDiffConfig, log: Callable[[str], None] | None = None) -> Path:
    """The prepared folder a config trains on; generates and prepares the synthetic set when needed."""
    if cfg.data.source == "prepared":
        return Path(cfg.data.prepared_dir)
    from service.encoder import synthetic_prepared

    s = cfg.data.synthetic
    _, prepared, _ = synthetic_prepared(synthetic_root(), s.per_class, s.seed, log)
    return prepared


def prepare_cocodiff_inputs(cfg: CoCoDiffConfig, log: Callable[[str], None] | None = None
                            ) -> tuple[SkeletonData, list[str], torch.Tensor | None, torch.Tensor | None]:
    """(data, class names, fine text, coarse text) of a config; the texts are None for the baseline."""
    return prepare_cocodiff(cfg, prepared_folder(cfg, log))
