"""`python -m service.report`: the command lives in service.cli.report; this module keeps its name."""

from service.cli.report import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
