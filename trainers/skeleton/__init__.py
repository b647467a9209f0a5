"""Skeletons: NTU RGB+D / Kinetics-Skeleton / PKU-MMD readers, NTU splits, the Graph and GCN encoders.

Readers return numpy arrays laid out (M persons, T frames, V joints, C channels), float32; bad input raises
InputError naming the file (and line, for text formats).
"""

from trainers.skeleton.gcn import (
                                   CTRGCN,
                                   ENCODERS,
                                   STGCN,
                                   Encoder,
                                   ShiftGCN,
                                   build_encoder,
                                   joint_to_bone,
                                   joint_to_motion,
)
from trainers.skeleton.graph import LAYOUTS, Graph
from trainers.skeleton.kinetics import read_kinetics
from trainers.skeleton.ntu import (
                                   BodyTrack,
                                   SampleName,
                                   SkeletonSequence,
                                   load_missing_list,
                                   parse_sample_name,
                                   rank_bodies,
                                   read_skeleton,
                                   to_array,
)
from trainers.skeleton.pku import PKULabel, PKUSegment, read_pku_labels, read_pku_segments, read_pku_skeleton
from trainers.skeleton.preprocess import (
                                   NTU_BONES,
                                   STREAMS,
                                   AlignAxes,
                                   CentreOnJoint,
                                   Compose,
                                   PadBodies,
                                   Resample,
                                   align_to_axes,
                                   alignment_matrix,
                                   bone_stream,
                                   centre_on_joint,
                                   drop_empty_frames,
                                   image_pipeline,
                                   joint_stream,
                                   motion_stream,
                                   ntu_pipeline,
                                   pad_bodies,
                                   resample,
)
from trainers.skeleton.splits import BENCHMARKS, split_of, split_samples
from trainers.skeleton.synthetic import (
                                   ActionClass,
                                   SyntheticOptions,
                                   Variation,
                                   action_catalogue,
                                   animate,
                                   write_synthetic_dataset,
)

__all__ = [
    "NTU_BONES", "STREAMS", "AlignAxes", "CentreOnJoint", "Compose", "PadBodies", "Resample", "align_to_axes",
    "alignment_matrix", "bone_stream", "centre_on_joint", "drop_empty_frames", "image_pipeline", "joint_stream",
    "motion_stream", "ntu_pipeline", "pad_bodies", "resample", "ActionClass", "SyntheticOptions", "Variation",
    "action_catalogue", "animate", "write_synthetic_dataset",
    "CTRGCN", "ENCODERS", "Encoder", "Graph", "LAYOUTS", "STGCN", "ShiftGCN", "build_encoder", "joint_to_bone",
    "joint_to_motion", "BENCHMARKS", "BodyTrack", "PKULabel", "PKUSegment", "SampleName", "SkeletonSequence",
    "load_missing_list",
    "parse_sample_name", "rank_bodies", "read_kinetics", "read_pku_labels", "read_pku_segments",
    "read_pku_skeleton", "read_skeleton", "split_of", "split_samples", "to_array",
]
