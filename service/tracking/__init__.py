"""MLflow: the store and its runs, a sweep's trials, artifacts, sources of final runs, the registry, the
paper report and stream ensembles. The only package of service/ that imports MLflow."""
