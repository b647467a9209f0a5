"""Skeletons: NTU RGB+D / Kinetics-Skeleton / PKU-MMD readers, NTU splits, the Graph and GCN encoders.

Readers return numpy arrays laid out (M persons, T frames, V joints, C channels), float32; bad input raises
InputError naming the file (and line, for text formats).

The modules are imported by name (`trainers.skeleton.ntu`, ...): importing the package imports none of them, so
a reader or the split tables load without torch (the CLIs' configs need them before anything heavy)."""
