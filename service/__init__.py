"""Ray + MLflow experiment service: CLIs (`python -m service.X`), Tune/Train orchestration, tracking."""

import os

# libgomp reads its wait policy once, when torch loads it, and this runs before any service module imports torch.
# PASSIVE: idle OpenMP threads sleep instead of spinning, so a second process on the same cores does not turn a
# 150 ms step into 2 s (docs/benchmarks.md: contended). Ray workers get it through connect_ray's runtime env.
THREAD_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
for _key, _value in THREAD_ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
