"""`python -m service.predict`: the command lives in service.cli.predict; this module keeps its name."""

from service.cli.predict import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
