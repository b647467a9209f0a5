"""The benchmarks of `python -m service.bench`, one module per benchmark; `common` holds the shared timing,
memory and machine probes."""
