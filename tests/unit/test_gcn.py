"""GCN encoders: shapes on both layouts, gradients, overfitting a tiny batch, paper-sized parameter counts,
person-order invariance, bf16 autocast on CPU, the bone/motion streams and the factory's errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.errors import InputError
from trainers.skeleton.gcn import (
    CTRGCN,
    ENCODERS,
    STGCN,
    ShiftGCN,
    TemporalShift,
    build_encoder,
    channel_plan,
    joint_to_bone,
    joint_to_motion,
)
from trainers.skeleton.graph import Graph

NAMES = list(ENCODERS)
TINY = {"base_channels": 8, "units_per_stage": (1, 1, 1)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def skeletons(n: int = 2, t: int = 8, v: int = 25, m: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, t, v, m, generator=torch.Generator().manual_seed(seed))


def test_channel_plan_is_the_papers():
    plan = channel_plan(3, 64, (4, 3, 3))
    assert [c for _, c, _ in plan] == [64] * 4 + [128] * 3 + [256] * 3
    assert [i for i, (_, _, s) in enumerate(plan) if s == 2] == [4, 7]
    assert plan[0][0] == 3 and all(plan[i][0] == plan[i - 1][1] for i in range(1, 10))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout, num_joints", [("ntu-rgb+d", 25), ("openpose", 18)])
def test_output_shapes(name, layout, num_joints):
    model = build_encoder(name, num_classes=7, layout=layout, base_channels=8).eval()   # full depth, 10 units
    x = skeletons(t=16, v=num_joints)                                                     # (2, 3, 16, V, 2)
    with torch.no_grad():
        assert model.forward_map(x).shape == (2, 2, 32, 4, num_joints)                  # T: 16 -> 8 -> 4
        assert model.forward_features(x).shape == (2, model.feature_dim) == (2, 32)
        assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match="V=25"):
        build_encoder(name, 7, base_channels=8)(skeletons(v=18 if num_joints == 25 else 17))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    model = build_encoder(name, num_classes=5, **TINY)
    for m in model.modules():
        if hasattr(m, "alpha"):
            torch.nn.init.constant_(m.alpha, 0.5)   # CTR-GCN's refinement is off at init (α = 0): switch it on
    x, y = skeletons(), torch.tensor([1, 3])
    F.cross_entropy(model(x), y).backward()         # training mode: every parameter is on the graph
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # In training mode BatchNorm cancels the bias of the conv before it; in eval mode each gradient is non-zero.
    model.zero_grad()
    F.cross_entropy(model.eval()(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.parametrize("name", NAMES)
def test_tiny_encoder_overfits_four_sequences(name):
    model = build_encoder(name, num_classes=4, **TINY)
    x, y = skeletons(n=4), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_parameter_counts_match_the_papers():
    """Full width, NTU-60 head: ST-GCN 3,098,832 (~3.1 M), CTR-GCN 1,446,522 (1.46 M reported on NTU-120:
    1,461,942 here), Shift-GCN 690,141 (~0.7 M)."""
    def count(model):
        return sum(p.numel() for p in model.parameters())
    assert 3.0e6 < count(STGCN(num_classes=60)) < 3.2e6
    assert 1.40e6 < count(CTRGCN(num_classes=60)) < 1.50e6
    assert 1.40e6 < count(CTRGCN(num_classes=120)) < 1.50e6
    assert 0.6e6 < count(ShiftGCN(num_classes=60)) < 0.8e6


@pytest.mark.parametrize("name", NAMES)
def test_person_order_does_not_change_the_feature(name):
    model = build_encoder(name, num_classes=3, **TINY)
    x = skeletons(n=3)
    for mode in (True, False):                       # batch statistics (train) and running statistics (eval)
        model.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), model.forward_features(x.flip(-1)),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward_on_cpu(name):
    """bf16 logits stay within a few bf16 roundings (unit roundoff 2**-9) of fp32.

    Relative error of the logits over 40 init seeds: worst 0.5 % (ST-GCN), 1.4 % (Shift-GCN), 2.1 % (CTR-GCN, the
    deepest); 6 % leaves ~3x headroom. The init is seeded so the bound does not depend on test order.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_encoder(name, num_classes=3, **TINY).eval()
    x = skeletons()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 6e-2


def test_per_person_data_bn():
    model = build_encoder("ctrgcn", num_classes=3, data_bn_persons=2, **TINY)
    assert model.data_bn.num_features == 2 * 25 * 3
    assert model(skeletons()).shape == (2, 3)
    with pytest.raises(ValueError, match="M=1"):
        model(skeletons(m=1))


def test_temporal_shift_reads_shifted_frames():
    shift = TemporalShift(3)
    with torch.no_grad():
        shift.shift.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.arange(1.0, 7.0).view(1, 1, 6, 1).repeat(1, 3, 1, 1)            # (1, 3, 6, 1) frames 1..6
    y = shift(x)[0, :, :, 0]
    assert y[0].tolist() == [2, 3, 4, 5, 6, 0]                                   # reads t + 1
    assert y[1].tolist() == [0, 0, 1, 2, 3, 4]                                   # reads t - 2
    assert y[2].tolist() == [1.5, 2.5, 3.5, 4.5, 5.5, 3.0]                       # halfway to t + 1
    shift.stride = 2
    assert shift(x)[0, 0, :, 0].tolist() == [2, 4, 6]


def test_bone_and_motion_streams():
    g = Graph("ntu-rgb+d")
    x = skeletons(t=4)
    bones = joint_to_bone(x, g.bone_pairs)
    assert bones.shape == x.shape
    assert torch.all(bones[:, :, :, g.center] == 0)
    torch.testing.assert_close(bones[:, :, :, 3], x[:, :, :, 3] - x[:, :, :, 2])   # head - neck
    motion = joint_to_motion(x)
    torch.testing.assert_close(motion[:, :, 1], x[:, :, 2] - x[:, :, 1])
    assert torch.all(motion[:, :, -1] == 0)


def test_factory_errors_name_the_field():
    with pytest.raises(InputError, match="encoder 'agcn'"):
        build_encoder("agcn", 10)
    with pytest.raises(InputError, match="layout 'coco'"):
        build_encoder("stgcn", 10, layout="coco")
    with pytest.raises(InputError, match="base_channels 0"):
        build_encoder("stgcn", 10, base_channels=0)
    with pytest.raises(InputError, match="units_per_stage"):
        build_encoder("shiftgcn", 10, units_per_stage=(2, 0))
    with pytest.raises(InputError, match="dropout 1.5"):
        build_encoder("ctrgcn", 10, dropout=1.5)
    with pytest.raises(InputError, match="CTR-GCN width 6"):
        build_encoder("ctrgcn", 10, base_channels=6)
    assert isinstance(build_encoder("stgcn", 10, **TINY), STGCN)
