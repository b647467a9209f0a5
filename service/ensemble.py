"""`python -m service.ensemble`: the command lives in service.cli.ensemble; this module keeps its name."""

from service.cli.ensemble import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
