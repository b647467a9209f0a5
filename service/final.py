"""`python -m service.final`: the command lives in service.cli.final; this module keeps its name."""

from service.cli.final import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
