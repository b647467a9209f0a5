"""Skeleton GCN encoders behind one interface: ST-GCN, Shift-GCN and CTR-GCN.

Every encoder reads the standard layout x (N, C, T, V, M): channels, frames, joints, persons. The same
backbone runs on every person; `forward_features` averages its last map over persons, frames and joints into
(N, feature_dim) and `forward` adds a linear head. All three share ST-GCN's plan of ten units, widths
64,64,64,64 | 128,128,128 | 256,256,256, with temporal stride 2 entering the second and third stage;
`base_channels` and `units_per_stage` shrink it for tests and CPU runs.

Graph matrices follow `trainers.skeleton.graph`: rows receive, `y_i = sum_j A[i, j] x_j`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from trainers.errors import InputError
from trainers.skeleton.graph import Graph

# ----------------------------------------------------------------------------------------------
# Input streams
# ----------------------------------------------------------------------------------------------


def joint_to_bone(x: torch.Tensor, bone_pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(N, C, T, V, M) joints -> bones: each child joint minus its parent; joints without a parent read zero."""
    child = torch.tensor([c for c, _ in bone_pairs], dtype=torch.long, device=x.device)
    parent = torch.tensor([p for _, p in bone_pairs], dtype=torch.long, device=x.device)
    bones = torch.zeros_like(x)
    bones[:, :, :, child] = x[:, :, :, child] - x[:, :, :, parent]
    return bones


def joint_to_motion(x: torch.Tensor) -> torch.Tensor:
    """(N, C, T, V, M) -> frame differences x[t+1] - x[t]; the last frame reads zero."""
    motion = torch.zeros_like(x)
    motion[:, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
    return motion


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def channel_plan(in_channels: int, base_channels: int, units_per_stage: Sequence[int]) -> list[tuple[int, int, int]]:
    """(in, out, temporal stride) per unit: width base·2^s in stage s; stride 2 on entering every later stage."""
    plan, c_in = [], in_channels
    for s, n_units in enumerate(units_per_stage):
        c_out = base_channels * 2 ** s
        for u in range(n_units):
            plan.append((c_in, c_out, 2 if s > 0 and u == 0 else 1))
            c_in = c_out
    return plan


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Temporal conv (kernel × 1, 'same' padding) + BatchNorm over (B, C, T, V)."""
    pad = (kernel - 1) * dilation // 2
    return nn.Sequential(nn.Conv2d(c_in, c_out, (kernel, 1), (stride, 1), (pad, 0), (dilation, 1)),
                         nn.BatchNorm2d(c_out))


def unit_residual(c_in: int, c_out: int, stride: int, enabled: bool) -> nn.Module | None:
    """None (no residual), identity when shapes agree, else a strided 1×1 conv + BN."""
    if not enabled:
        return None
    if c_in == c_out and stride == 1:
        return nn.Identity()
    return conv_bn(c_in, c_out, 1, stride)


def add_residual(y: torch.Tensor, x: torch.Tensor, residual: nn.Module | None) -> torch.Tensor:
    return y if residual is None else y + residual(x)


class Encoder(nn.Module):
    """Data BN, a stack of units (built by the subclass in `self.units`), global pooling and a linear head.

    data_bn_persons: None normalises the input over (V·C) with statistics shared by all persons (ST-GCN), so
    the pooled feature does not depend on the order of persons; an int M normalises over (M·V·C), one set of
    statistics per person slot (the Shift-GCN / CTR-GCN releases), and then inputs must have exactly M persons.
    """

    def __init__(self, in_channels: int, num_classes: int, layout: str, base_channels: int,
                 units_per_stage: Sequence[int], head_dropout: float, data_bn_persons: int | None):
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        _check_positive("base_channels", base_channels)
        if len(units_per_stage) == 0 or any(int(n) < 1 for n in units_per_stage):
            raise InputError(f"units_per_stage {tuple(units_per_stage)}: expected one or more counts >= 1")
        if not 0.0 <= head_dropout < 1.0:
            raise InputError(f"dropout {head_dropout}: expected a probability in [0, 1)")
        if data_bn_persons is not None:
            _check_positive("data_bn_persons", data_bn_persons)
        self.graph = Graph(layout)
        self.in_channels = in_channels
        self.num_joints = self.graph.num_joints
        self.data_bn_persons = data_bn_persons
        self.plan = channel_plan(in_channels, base_channels, tuple(int(n) for n in units_per_stage))
        self.feature_dim = self.plan[-1][1]
        self.data_bn = nn.BatchNorm1d((data_bn_persons or 1) * self.num_joints * in_channels)
        self.units = nn.ModuleList()                       # filled by the subclass from self.plan
        self.drop = nn.Dropout(head_dropout)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def init_weights(self) -> None:
        """Kaiming (fan-out) convs with zero bias, unit BatchNorms; subclasses add their own exceptions."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) -> last spatio-temporal map (N, M, feature_dim, T', V)."""
        N, C, T, V, M = x.shape
        if C != self.in_channels or V != self.num_joints:
            raise ValueError(f"input (N, C, T, V, M) = {tuple(x.shape)}: expected C={self.in_channels}, "
                             f"V={self.num_joints} ({self.graph.layout})")
        if self.data_bn_persons is not None and M != self.data_bn_persons:
            raise ValueError(f"input has M={M} persons, data BN was built for data_bn_persons={self.data_bn_persons}")
        x = x.permute(0, 4, 3, 1, 2)                                         # (N, M, V, C, T)
        if self.data_bn_persons is None:
            x = self.data_bn(x.reshape(N * M, V * C, T))                     # (N·M, V·C, T)
        else:
            x = self.data_bn(x.reshape(N, M * V * C, T))                     # (N, M·V·C, T)
        x = x.reshape(N, M, V, C, T).permute(0, 1, 3, 4, 2).reshape(N * M, C, T, V)   # (N·M, C, T, V)
        for unit in self.units:
            x = unit(x)                                                      # (N·M, C', T', V)
        return x.reshape(N, M, *x.shape[1:])                                 # (N, M, C', T', V)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) -> (N, feature_dim), the mean over persons, frames and joints."""
        return self.forward_map(x).mean(dim=(1, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) -> logits (N, num_classes)."""
        return self.fc(self.drop(self.forward_features(x)))


def _check_positive(field: str, value: int) -> None:
    if int(value) < 1:
        raise InputError(f"{field} {value}: expected a positive integer")


# ----------------------------------------------------------------------------------------------
# ST-GCN (Yan, Xiong & Lin, AAAI 2018)
# ----------------------------------------------------------------------------------------------


class SpatialGraphConv(nn.Module):
    """ST-GCN's partitioned graph conv: y = sum_k (A_k ⊙ M_k) x W_k, one 1×1 conv for all K partitions."""

    def __init__(self, c_in: int, c_out: int, A: np.ndarray, edge_importance: bool = True):
        super().__init__()
        self.num_subsets = A.shape[0]
        self.register_buffer("A", torch.tensor(A, dtype=torch.float32), persistent=False)   # (K, V, V)
        # M_k: learnable edge importance weighting, a mask on the fixed partition, one per unit.
        self.edge_importance = nn.Parameter(torch.ones_like(self.A)) if edge_importance else None
        self.conv = nn.Conv2d(c_in, c_out * self.num_subsets, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, T, V = x.shape
        a = self.A if self.edge_importance is None else self.A * self.edge_importance   # (K, V, V)
        x = self.conv(x).view(B, self.num_subsets, -1, T, V)                             # (B, K, C', T, V)
        return torch.einsum("bkctj,kij->bcti", x, a.to(x.dtype))                         # (B, C', T, V)


class GCNUnit(nn.Module):
    """One encoder unit: spatial (graph) module -> temporal module; + residual; ReLU (all three encoders)."""

    def __init__(self, gcn: nn.Module, tcn: nn.Module, residual: nn.Module | None):
        super().__init__()
        self.gcn = gcn
        self.tcn = tcn
        self.residual = residual
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(add_residual(self.tcn(self.gcn(x)), x, self.residual))   # (B, C', T/stride, V)


class STGCN(Encoder):
    """ST-GCN: 3-partition spatial graph conv with learnable edge importance, 9-frame temporal conv, residuals.

    `dropout` is the paper's: after the temporal conv of every unit (0.5 in its experiments), not on the head.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 60, layout: str = "ntu-rgb+d",
                 base_channels: int = 64, units_per_stage: Sequence[int] = (4, 3, 3), dropout: float = 0.0,
                 data_bn_persons: int | None = None, edge_importance: bool = True):
        super().__init__(in_channels, num_classes, layout, base_channels, units_per_stage, 0.0, data_bn_persons)
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout {dropout}: expected a probability in [0, 1)")
        for i, (c_in, c_out, stride) in enumerate(self.plan):
            tcn = nn.Sequential(nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),   # BN, ReLU, conv (9 x 1), BN, dropout
                                conv_bn(c_out, c_out, 9, stride), nn.Dropout(dropout))
            self.units.append(GCNUnit(SpatialGraphConv(c_in, c_out, self.graph.A, edge_importance), tcn,
                                      unit_residual(c_in, c_out, stride, i > 0)))
        self.init_weights()


# ----------------------------------------------------------------------------------------------
# Shift-GCN (Cheng et al., CVPR 2020)
# ----------------------------------------------------------------------------------------------


class SpatialShiftConv(nn.Module):
    """Non-local spatial shift graph conv: shift in, learnable mask, point-wise conv, shift out, BN.

    Shift: channel c of joint v reads joint (v + c) mod V, so every joint sees every other joint through some
    channel. The adaptive mask weights each (joint, channel) of the shifted map by tanh(W) + 1 (1 at init). The
    output shift reads joint (v - c) mod V, sending the mixed channels back. + residual (1×1 conv if the width
    changes), ReLU.
    """

    def __init__(self, c_in: int, c_out: int, num_joints: int):
        super().__init__()
        V = num_joints
        joints = torch.arange(V)[:, None]
        src_in = (joints + torch.arange(c_in)[None]) % V                              # (V, C) joint read
        src_out = (joints - torch.arange(c_out)[None]) % V                            # (V, C') joint read
        # Flat indices into a (V·C) row: joint * C + channel.
        self.register_buffer("shift_in", (src_in * c_in + torch.arange(c_in)).flatten(), persistent=False)
        self.register_buffer("shift_out", (src_out * c_out + torch.arange(c_out)).flatten(), persistent=False)
        self.mask = nn.Parameter(torch.zeros(V, c_in))
        self.linear = nn.Linear(c_in, c_out)
        self.bn = nn.BatchNorm1d(V * c_out)
        self.down = nn.Identity() if c_in == c_out else conv_bn(c_in, c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, V = x.shape
        y = x.permute(0, 2, 3, 1).reshape(B * T, V * C)                 # (B·T, V·C)
        y = y.index_select(1, self.shift_in).view(B * T, V, C)          # (B·T, V, C) shifted in
        y = self.linear(y * (torch.tanh(self.mask) + 1))                # (B·T, V, C')
        y = y.reshape(B * T, -1).index_select(1, self.shift_out)        # (B·T, V·C') shifted out
        y = self.bn(y).view(B, T, V, -1).permute(0, 3, 1, 2)            # (B, C', T, V)
        return self.relu(y + self.down(x))


class TemporalShift(nn.Module):
    """Adaptive temporal shift: channel c at output frame t reads frame t·stride + s_c.

    s_c is a learnable real shift per channel; fractional shifts interpolate linearly between the two nearest
    frames (so s_c gets a gradient), frames outside the sequence read zero.
    """

    def __init__(self, channels: int, stride: int = 1, init_range: float = 1.0):
        super().__init__()
        self.stride = stride
        self.shift = nn.Parameter(torch.empty(channels).uniform_(-init_range, init_range))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, V = x.shape
        t_out = (T - 1) // self.stride + 1
        floor = torch.floor(self.shift.detach())                                   # (C,)
        frac = (self.shift - floor).to(x.dtype)[None, :, None, None]               # (1, C, 1, 1) in [0, 1)
        base = torch.arange(t_out, device=x.device) * self.stride                  # (T',)
        lo = base[None] + floor.long()[:, None]                                    # (C, T') frame below

        def read(frames: torch.Tensor) -> torch.Tensor:                            # (C, T') -> (B, C, T', V)
            index = frames.clamp(0, T - 1)[None, :, :, None].expand(B, C, t_out, V)
            inside = ((frames >= 0) & (frames < T)).to(x.dtype)[None, :, :, None]
            return x.gather(2, index) * inside

        return read(lo) * (1 - frac) + read(lo + 1) * frac                          # (B, C, T', V)


class ShiftTemporalConv(nn.Module):
    """Shift-GCN temporal module: BN, temporal shift, point-wise conv, ReLU, strided temporal shift, BN."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(c_in)
        self.shift_in = TemporalShift(c_in)
        self.linear = nn.Conv2d(c_in, c_out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shift_out = TemporalShift(c_out, stride)
        self.bn_out = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.linear(self.shift_in(self.bn_in(x))))     # (B, C', T, V)
        return self.bn_out(self.shift_out(x))                        # (B, C', T/stride, V)


class ShiftGCN(Encoder):
    """Shift-GCN: shift graph operations + point-wise convs in place of graph and temporal convolutions.

    The graph enters only through its joint count: the non-local shift connects every joint to every other.
    `dropout` applies to the pooled feature before the head.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 60, layout: str = "ntu-rgb+d",
                 base_channels: int = 64, units_per_stage: Sequence[int] = (4, 3, 3), dropout: float = 0.0,
                 data_bn_persons: int | None = None):
        super().__init__(in_channels, num_classes, layout, base_channels, units_per_stage, dropout,
                         data_bn_persons)
        for i, (c_in, c_out, stride) in enumerate(self.plan):
            self.units.append(GCNUnit(SpatialShiftConv(c_in, c_out, self.num_joints),
                                      ShiftTemporalConv(c_out, c_out, stride),
                                      unit_residual(c_in, c_out, stride, i > 0)))
        self.init_weights()


# ----------------------------------------------------------------------------------------------
# CTR-GCN (Chen et al., ICCV 2021)
# ----------------------------------------------------------------------------------------------


class CTRGC(nn.Module):
    """Channel-wise topology refinement graph conv (CTR-GC) for one shared topology A (V, V).

    Correlations R[r, i, j] = tanh(φ(x)_i - ψ(x)_j) on temporally pooled features (R channels), lifted by a
    1×1 conv to one (V, V) refinement per output channel; topology_c = A + α·Q_c; y_c = topology_c · ξ(x)_c.
    """

    def __init__(self, c_in: int, c_out: int, rel_reduction: int = 8):
        super().__init__()
        rel = max(c_in // rel_reduction, 8)           # the paper's input layer (C=3) uses 8 as well
        self.phi = nn.Conv2d(c_in, rel, 1)
        self.psi = nn.Conv2d(c_in, rel, 1)
        self.xi = nn.Conv2d(c_in, c_out, 1)           # value transform
        self.lift = nn.Conv2d(rel, c_out, 1)          # correlation channels -> one topology per output channel

    def forward(self, x: torch.Tensor, A: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        q = self.phi(x).mean(2)                                          # (B, R, V) pooled over frames
        k = self.psi(x).mean(2)                                          # (B, R, V)
        rel = torch.tanh(q.unsqueeze(-1) - k.unsqueeze(-2))              # (B, R, V, V) [i receives j]
        topology = self.lift(rel) * alpha + A.to(rel.dtype)              # (B, C', V, V)
        return torch.einsum("bcij,bctj->bcti", topology, self.xi(x))     # (B, C', T, V)


class CTRGraphConv(nn.Module):
    """Sum of CTR-GCs over the K partitions of a learnable shared topology; BN; + residual; ReLU."""

    def __init__(self, c_in: int, c_out: int, A: np.ndarray):
        super().__init__()
        self.A = nn.Parameter(torch.tensor(A, dtype=torch.float32))     # (K, V, V) initialised from the graph
        self.convs = nn.ModuleList(CTRGC(c_in, c_out) for _ in range(A.shape[0]))
        self.alpha = nn.Parameter(torch.zeros(1))                        # refinement starts switched off
        self.bn = nn.BatchNorm2d(c_out)
        self.down = nn.Identity() if c_in == c_out else conv_bn(c_in, c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(conv(x, self.A[k], self.alpha) for k, conv in enumerate(self.convs))   # (B, C', T, V)
        return self.relu(self.bn(y) + self.down(x))


class MultiScaleTemporalConv(nn.Module):
    """Four branches of C'/4 channels, concatenated: 5×1 convs at dilations 1 and 2, 3×1 max-pool, 1×1 conv.

    Each branch opens with a 1×1 bottleneck (+ BN, ReLU except the plain 1×1 branch) and carries the stride.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int = 5, dilations: Sequence[int] = (1, 2)):
        super().__init__()
        num_branches = len(dilations) + 2
        if c_out % num_branches:
            raise InputError(f"CTR-GCN width {c_out}: must divide into {num_branches} temporal branches "
                             f"(choose base_channels as a multiple of {num_branches})")
        width = c_out // num_branches

        def bottleneck() -> list[nn.Module]:
            return [nn.Conv2d(c_in, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]

        self.branches = nn.ModuleList(
            [nn.Sequential(*bottleneck(), conv_bn(width, width, kernel, stride, d)) for d in dilations]
            + [nn.Sequential(*bottleneck(), nn.MaxPool2d((3, 1), (stride, 1), (1, 0)), nn.BatchNorm2d(width)),
               conv_bn(c_in, width, 1, stride)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)   # (B, C', T/stride, V)


class CTRGCN(Encoder):
    """CTR-GCN: channel-wise topology refinement graph convs and multi-scale temporal convs.

    `dropout` applies to the pooled feature before the head.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 60, layout: str = "ntu-rgb+d",
                 base_channels: int = 64, units_per_stage: Sequence[int] = (4, 3, 3), dropout: float = 0.0,
                 data_bn_persons: int | None = None):
        super().__init__(in_channels, num_classes, layout, base_channels, units_per_stage, dropout,
                         data_bn_persons)
        for i, (c_in, c_out, stride) in enumerate(self.plan):
            self.units.append(GCNUnit(CTRGraphConv(c_in, c_out, self.graph.A),
                                      MultiScaleTemporalConv(c_out, c_out, stride),
                                      unit_residual(c_in, c_out, stride, i > 0)))
        self.init_weights()

    def init_weights(self) -> None:
        """Base init, then the graph conv's output BN near zero so every unit starts close to its residual."""
        super().init_weights()
        for unit in self.units:
            nn.init.constant_(unit.gcn.bn.weight, 1e-6)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------

ENCODERS: dict[str, type[Encoder]] = {"stgcn": STGCN, "shiftgcn": ShiftGCN, "ctrgcn": CTRGCN}


def build_encoder(name: str, num_classes: int, in_channels: int = 3, layout: str = "ntu-rgb+d",
                  base_channels: int = 64, units_per_stage: Sequence[int] = (4, 3, 3), dropout: float = 0.0,
                  data_bn_persons: int | None = None) -> Encoder:
    """The encoder called `name` ('stgcn' | 'shiftgcn' | 'ctrgcn'); InputError naming the field on bad values."""
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise InputError(f"encoder {name!r}: expected one of {', '.join(ENCODERS)}") from None
    return cls(in_channels=in_channels, num_classes=num_classes, layout=layout, base_channels=base_channels,
               units_per_stage=units_per_stage, dropout=dropout, data_bn_persons=data_bn_persons)
