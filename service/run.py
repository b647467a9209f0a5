"""`python -m service.run`: the command lives in service.cli.run; this module keeps its name."""

from service.cli.run import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
