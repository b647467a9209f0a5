"""Skeleton graph: adjacency symmetry and normalisation, the 3-partition, centres and bone trees, both layouts."""

from __future__ import annotations

import numpy as np
import pytest

from trainers.errors import InputError
from trainers.skeleton.graph import LAYOUTS, Graph, bone_pairs, normalize_rows, normalize_symmetric, spatial_partition

LAYOUT_SIZES = [("ntu-rgb+d", 25, 20), ("openpose", 18, 1)]


@pytest.fixture(params=[name for name, _, _ in LAYOUT_SIZES])
def graph(request) -> Graph:
    return Graph(request.param)


@pytest.mark.parametrize("layout, num_joints, center", LAYOUT_SIZES)
def test_shapes_and_centre(layout, num_joints, center):
    g = Graph(layout)
    V = num_joints
    assert (g.num_joints, g.center) == (V, center)
    assert g.adjacency.shape == g.normalized_adjacency.shape == (V, V)
    assert g.A.shape == (3, V, V) and g.A.dtype == np.float32
    assert len(g.bone_pairs) == V - 1
    assert g.hop_to_center[center] == 0 and (g.hop_to_center > 0).sum() == V - 1


def test_ntu_numbering_is_zero_based():
    g = Graph("ntu-rgb+d")
    parent = dict(g.bone_pairs)
    # 1-based: head 4 - neck 3 - spine 21 - mid spine 2 - base 1; left hand 8 - thumb 23 - tip 22.
    assert parent[3] == 2 and parent[2] == 20 and parent[1] == 20 and parent[0] == 1
    assert parent[22] == 7 and parent[21] == 22
    assert g.adjacency[20].sum() == 4                     # spine joint: mid spine, neck, both shoulders


def test_adjacency_symmetric_binary_tree(graph):
    a = graph.adjacency
    assert np.array_equal(a, a.T)
    assert set(np.unique(a)) <= {0.0, 1.0} and np.all(np.diag(a) == 0)
    assert a.sum() / 2 == graph.num_joints - 1            # both layouts are trees


def test_normalisation(graph):
    V = graph.num_joints
    a_hat = graph.normalized_adjacency
    np.testing.assert_allclose(a_hat.sum(axis=1), np.ones(V), rtol=1e-6)
    assert np.array_equal(a_hat > 0, (graph.adjacency + np.eye(V)) > 0)
    s = normalize_symmetric(graph.adjacency + np.eye(V, dtype=np.float32))
    np.testing.assert_allclose(s, s.T, rtol=1e-6)
    # D^-1/2 A D^-1/2 and D^-1 A share their spectrum (similar matrices); the largest eigenvalue is 1.
    assert np.isclose(np.linalg.eigvalsh(s).max(), 1.0, atol=1e-5)
    assert np.array_equal(normalize_rows(np.zeros((3, 3), np.float32)), np.zeros((3, 3)))


def test_partition_sums_back_and_splits_by_distance(graph):
    A, r = graph.A, graph.hop_to_center
    np.testing.assert_allclose(A.sum(axis=0), graph.normalized_adjacency, rtol=1e-6)
    support = A > 0
    assert support.sum(axis=0).max() == 1                              # every entry in exactly one part
    assert np.array_equal(np.diag(A[0]), np.diag(graph.normalized_adjacency))
    assert np.count_nonzero(A[0] - np.diag(np.diag(A[0]))) == 0        # a tree: no neighbour at equal distance
    i, j = np.nonzero(support[1])
    assert np.all(r[j] == r[i] - 1)                                    # centripetal: sender nearer the centre
    i, j = np.nonzero(support[2])
    assert np.all(r[j] == r[i] + 1)                                    # centrifugal: sender farther away
    assert np.array_equal(support[1], support[2].T)
    assert not support[1][graph.center].any()                          # nothing is nearer than the centre
    with pytest.raises(ValueError):
        graph.A[0, 0, 0] = 1.0                                         # read-only


def test_bone_pairs_form_a_tree_rooted_at_the_centre(graph):
    edges = {frozenset(e) for e in graph.edges}
    parent = dict(graph.bone_pairs)
    assert set(parent) == set(range(graph.num_joints)) - {graph.center}
    assert all(frozenset(pair) in edges for pair in graph.bone_pairs)
    for joint in range(graph.num_joints):
        path = [joint]
        while path[-1] != graph.center:
            path.append(parent[path[-1]])
            assert len(path) <= graph.num_joints                       # no cycles
        assert len(path) - 1 == graph.hop_to_center[joint]


def test_bad_layouts_are_named():
    with pytest.raises(InputError, match="layout 'coco'.*ntu-rgb\\+d"):
        Graph("coco")
    with pytest.raises(InputError, match=r"joints \[3\]"):
        spatial_partition([(0, 1), (1, 2)], 4, center=1)
    with pytest.raises(InputError, match=r"joints \[3\]"):
        bone_pairs([(0, 1), (1, 2)], 4, center=1)
    assert set(LAYOUTS) == {"ntu-rgb+d", "openpose"}
