"""`python -m service.prepare`: the command lives in service.cli.prepare; this module keeps its name."""

from service.cli.prepare import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
