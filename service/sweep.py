"""`python -m service.sweep`: the command lives in service.cli.sweep; this module keeps its name.

MLflowTrialCloser is re-exported: the Tune state of a sweep started before service/ had layers (tuner.pkl) names it
here, and `--resume` unpickles it.
"""

from service.cli.sweep import build_parser, main  # noqa: F401
from service.orchestration.sweep import MLflowTrialCloser  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
