"""`python -m service.cluster`: the command lives in service.cli.cluster; this module keeps its name."""

from service.cli.cluster import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
