"""`python -m service.encoder`: the command lives in service.cli.encoder; this module keeps its name."""

from service.cli.encoder import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
