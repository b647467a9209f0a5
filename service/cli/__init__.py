"""Command lines, argparse and main() only: run, sweep, final, ensemble, encoder, prepare, report, cluster, bench."""
