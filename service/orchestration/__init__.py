"""Ray: the cluster, the sweep (Tuner, ASHA, best config), the trial worker, the encoder on Ray Train.

The only package of service/ that imports Ray."""
