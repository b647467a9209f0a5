"""`python -m service.sweep`: the command lives in service.cli.sweep; this module keeps its name.

MLflowTrialCloser is still found here: the Tune state of a sweep started before service/ had layers (tuner.pkl)
names it, and `--resume` unpickles it. It is imported on first use (`__getattr__`), so `--help` stays light.
"""

from service.cli.sweep import build_parser, main  # noqa: F401


def __getattr__(name: str):
    if name == "MLflowTrialCloser":
        from service.orchestration.sweep import MLflowTrialCloser
        return MLflowTrialCloser
    raise AttributeError(f"module 'service.sweep' has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())
