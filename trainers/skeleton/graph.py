"""The skeleton graph: joint layouts as edge lists and the adjacency matrices GCN encoders aggregate with.

Pure numpy. Convention everywhere: a (V, V) matrix `A` has the *receiving* joint on rows, so one aggregation
step is `y_i = sum_j A[i, j] x_j` (einsum `"...j,ij->...i"`). Normalisation is by row, `D^-1 (A + I)`: each
joint averages its neighbourhood, which is the normalisation of ST-GCN's released models written with rows as
receivers. `normalize_symmetric` gives the `D^-1/2 (A + I) D^-1/2` form written in the ST-GCN paper.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from trainers.errors import InputError


@dataclass(frozen=True)
class Layout:
    """A skeleton: joint count, undirected bones as 0-based (a, b) pairs, and the centre joint."""

    name: str
    num_joints: int
    edges: tuple[tuple[int, int], ...]
    center: int


def _from_one_based(pairs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    return tuple((a - 1, b - 1) for a, b in pairs)


# NTU RGB+D / Kinect v2, 1-based as the dataset documents them: 1 spine base, 2 spine mid, 3 neck, 4 head,
# 5-8 left shoulder/elbow/wrist/hand, 9-12 right shoulder/elbow/wrist/hand, 13-16 left hip/knee/ankle/foot,
# 17-20 right hip/knee/ankle/foot, 21 spine at the shoulders, 22/23 left hand tip/thumb, 24/25 right.
# The hands follow the convention of ST-GCN and its successors (tip - thumb - hand), not the Kinect SDK's
# (tip - hand, thumb - wrist), so features and accuracies stay comparable with the literature.
NTU_EDGES_1BASED = (
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10), (12, 11),
    (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (22, 23), (23, 8), (24, 25),
    (25, 12),
)

# OpenPose 18-joint (COCO order) as released with Kinetics-Skeleton: 0 nose, 1 neck, 2-4 right shoulder/elbow/
# wrist, 5-7 left, 8-10 right hip/knee/ankle, 11-13 left, 14/15 right/left eye, 16/17 right/left ear. The hips
# hang from the shoulders (ST-GCN's layout), so the neck is the only joint joining the arms and the head.
OPENPOSE_EDGES = (
    (4, 3), (3, 2), (7, 6), (6, 5), (13, 12), (12, 11), (10, 9), (9, 8), (11, 5), (8, 2), (5, 1), (2, 1),
    (0, 1), (15, 0), (14, 0), (17, 15), (16, 14),
)

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("ntu-rgb+d", 25, _from_one_based(NTU_EDGES_1BASED), center=20),   # joint 21, spine at the shoulders
    Layout("openpose", 18, OPENPOSE_EDGES, center=1),                          # neck
)}


def get_layout(name: str) -> Layout:
    """The layout called `name`, or an InputError listing the known names."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise InputError(f"layout {name!r}: expected one of {', '.join(LAYOUTS)}") from None


# ----------------------------------------------------------------------------------------------
# Pure functions of an edge list
# ----------------------------------------------------------------------------------------------

def adjacency_matrix(edges, num_joints: int) -> np.ndarray:
    """(V, V) symmetric 0/1 matrix of the undirected edges, no self loops."""
    a = np.zeros((num_joints, num_joints), dtype=np.float32)
    for i, j in edges:
        a[i, j] = a[j, i] = 1.0
    np.fill_diagonal(a, 0.0)
    return a


def normalize_rows(a: np.ndarray) -> np.ndarray:
    """D^-1 A with D the row sums; all-zero rows stay zero."""
    deg = a.sum(axis=1, keepdims=True)
    return np.divide(a, deg, out=np.zeros_like(a), where=deg > 0)


def normalize_symmetric(a: np.ndarray) -> np.ndarray:
    """D^-1/2 A D^-1/2 with D the row sums of a symmetric A; isolated joints stay zero."""
    deg = a.sum(axis=1)
    inv_sqrt = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
    return (a * inv_sqrt[:, None] * inv_sqrt[None, :]).astype(a.dtype)


def hop_distances(edges, num_joints: int, source: int) -> np.ndarray:
    """(V,) number of bones from `source` to every joint (breadth-first); -1 where unreachable."""
    neighbours = [[] for _ in range(num_joints)]
    for i, j in edges:
        neighbours[i].append(j)
        neighbours[j].append(i)
    dist = np.full(num_joints, -1, dtype=np.int64)
    dist[source] = 0
    queue = deque([source])
    while queue:
        i = queue.popleft()
        for j in neighbours[i]:
            if dist[j] < 0:
                dist[j] = dist[i] + 1
                queue.append(j)
    return dist


def spatial_partition(edges, num_joints: int, center: int) -> np.ndarray:
    """(3, V, V) ST-GCN "spatial configuration" partition of the row-normalised adjacency with self loops.

    Yan et al. 2018, "Partition strategies": the neighbours j of a root joint i split by their distance to the centre r:
    0 = the root itself (and any neighbour as far from the centre as the root), 1 = centripetal (r_j < r_i),
    2 = centrifugal (r_j > r_i). The three parts sum back to `normalize_rows(adjacency + I)`.
    """
    a_norm = normalize_rows(adjacency_matrix(edges, num_joints) + np.eye(num_joints, dtype=np.float32))
    r = hop_distances(edges, num_joints, center)
    if (r < 0).any():
        raise InputError(f"skeleton graph: joints {np.flatnonzero(r < 0).tolist()} are not connected to the "
                         f"centre joint {center}")
    r_root, r_nbr = r[:, None], r[None, :]                       # (V, 1) receiving joint i, (1, V) sender j
    parts = np.stack([
        np.where(r_nbr == r_root, a_norm, 0.0),
        np.where(r_nbr < r_root, a_norm, 0.0),
        np.where(r_nbr > r_root, a_norm, 0.0),
    ])
    return parts.astype(np.float32)                              # (3, V, V)


def bone_pairs(edges, num_joints: int, center: int) -> tuple[tuple[int, int], ...]:
    """(child, parent) for every joint but the centre, parents one bone nearer the centre (a spanning tree)."""
    r = hop_distances(edges, num_joints, center)
    parent = {}
    for i, j in sorted(edges):
        for child, par in ((i, j), (j, i)):
            if r[par] == r[child] - 1 and child not in parent:
                parent[child] = par
    missing = sorted(set(range(num_joints)) - {center} - set(parent))
    if missing:
        raise InputError(f"skeleton graph: joints {missing} have no path to the centre joint {center}")
    return tuple((child, parent[child]) for child in sorted(parent))


# ----------------------------------------------------------------------------------------------
# Graph
# ----------------------------------------------------------------------------------------------

def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class Graph:
    """One layout's matrices, computed once and read-only.

    adjacency: (V, V) 0/1 bones, symmetric, no self loops.
    normalized_adjacency: (V, V) row-normalised adjacency with self loops (rows sum to 1).
    A: (3, V, V) spatial partition (self / centripetal / centrifugal), summing to `normalized_adjacency`.
    bone_pairs: (child, parent) pairs, V - 1 of them, a tree rooted at `center`.
    """

    def __init__(self, layout: str = "ntu-rgb+d"):
        spec = get_layout(layout)
        self.layout = spec.name
        self.num_joints = spec.num_joints
        self.center = spec.center
        self.edges = spec.edges
        self.adjacency = _frozen(adjacency_matrix(spec.edges, spec.num_joints))
        eye = np.eye(spec.num_joints, dtype=np.float32)
        self.normalized_adjacency = _frozen(normalize_rows(self.adjacency + eye))
        self.A = _frozen(spatial_partition(spec.edges, spec.num_joints, spec.center))
        self.bone_pairs = bone_pairs(spec.edges, spec.num_joints, spec.center)
        self.hop_to_center = _frozen(hop_distances(spec.edges, spec.num_joints, spec.center))

    def __repr__(self) -> str:
        return f"Graph({self.layout!r}, V={self.num_joints}, center={self.center})"
