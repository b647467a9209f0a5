"""Zero-shot scoring (docs/METHODS.md §1, Inference): noise once at t_test, pick the class whose text denoises best.

All candidates and all noise draws of a chunk of samples go through one forward pass; every t_test of a grid
reuses the same model and the same evaluation noise, so the accuracy-vs-t_test curve costs inference only.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import numpy as np
import torch
from einops import repeat

from trainers.diffusion import NoiseSchedule

# model(z_t, t, text_global, text_local, candidate=None) -> prediction; see TDSMDenoiser.forward
Denoiser = Callable[..., torch.Tensor]


def evaluation_noise(num_draws: int, num_samples: int, dim: int, seed: int) -> torch.Tensor:
    """(K, N, D) Gaussian noise from its own generator: independent of training randomness and of chunking."""
    return torch.randn(num_draws, num_samples, dim, generator=torch.Generator().manual_seed(seed))


def sample_keyed_noise(keys: torch.Tensor, num_draws: int, seed: int, dim: int | None = None) -> torch.Tensor:
    """(K, N, dim) Gaussian noise where sample i's (K, dim) block is a function of (seed, the float32 bytes of
    keys[i]) only; dim defaults to the row width of keys (the features themselves).

    A deployed classifier must give a sample the same answer alone, first or last in any batch: its noise
    cannot depend on the row position, as `evaluation_noise`'s does. A chain that takes skeleton sequences keys
    the noise by the sequence (its model input), not by the features the encoder makes of it.
    """
    rows = keys.detach().to("cpu", torch.float32).reshape(keys.shape[0], -1).contiguous().numpy()   # (N, *)
    dim = rows.shape[1] if dim is None else dim
    out = torch.empty(num_draws, rows.shape[0], dim)
    prefix = int(seed).to_bytes(16, "little", signed=True)
    for i, row in enumerate(rows):
        digest = hashlib.blake2b(prefix + row.tobytes(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)   # 63 bits: a valid seed
        out[:, i] = torch.randn(num_draws, dim, generator=gen)
    return out


# On a CPU a forward pass over more rows than fit the caches is slower per row than a few smaller ones (its
# elementwise chains stream every (rows, tokens, width) activation through memory): a small denoiser scored 1,920
# rows at once at 0.80x the speed of the per-class loop, 240 rows at a time at 1.02x (C=20, K=3, N=32, fp32, one
# core of an AMD EPYC, medians of 5 alternating rounds). Rows per forward are capped so one activation holds about
# this many elements (~9 MiB in fp32).
CPU_ACTIVATION_ELEMENTS = 256 * 36 * 256


def cpu_rows_per_forward(model: Denoiser, tokens: int) -> int | None:
    """The row cap of a CPU forward for a denoiser of this width (None when the model does not say its width)."""
    pos_embed = getattr(model, "pos_embed", None)
    if pos_embed is None:
        return None
    return max(16, CPU_ACTIVATION_ELEMENTS // (tokens * pos_embed.shape[-1]))


@torch.no_grad()
def score_candidates(model: Denoiser, schedule: NoiseSchedule, features: torch.Tensor, noise: torch.Tensor,
                     t_test: int, cand_global: torch.Tensor, cand_local: torch.Tensor, max_rows: int = 4096,
                     amp: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Denoising error of every (draw, sample, candidate): (K, N, C); smaller = better match.

    features (N, D) on the model's device; noise (K, N, D); cand_global (C, D_g); cand_local (C, M_l, D_l).
    Rows per forward pass = chunk x K x C, bounded by max_rows (on a CPU also by `cpu_rows_per_forward`; a chunk
    holds at least one sample). The model embeds each candidate's text once and gathers it per row (its
    `candidate` argument) instead of receiving the raw text repeated K x n times.
    """
    K, N, D = noise.shape
    C = cand_global.shape[0]
    device = features.device
    if device.type == "cpu" and (cap := cpu_rows_per_forward(model, cand_local.shape[1] + 1)) is not None:
        max_rows = min(max_rows, cap)
    chunk = max(1, max_rows // (K * C))
    out = torch.empty(K, N, C)
    for s in range(0, N, chunk):
        x0 = features[s:s + chunk]                                             # (n, D)
        n = x0.shape[0]
        eps = noise[:, s:s + chunk].to(device)                                 # (K, n, D)
        x0 = repeat(x0, "n d -> (k n c) d", k=K, c=C)                          # (K n C, D)
        eps = repeat(eps, "k n d -> (k n c) d", c=C)                           # (K n C, D)
        t = torch.full((K * n * C,), t_test, device=device, dtype=torch.long)
        z_t = schedule.add_noise(x0, eps, t)                                   # (K n C, D)
        candidate = torch.arange(C, device=device).repeat(K * n)               # (K n C,) c fastest
        with amp():
            pred = model(z_t, t, cand_global, cand_local, candidate)           # (K n C, D)
        err = (schedule.target(x0, eps, t) - pred.float()).pow(2).mean(-1)    # (K n C,)
        out[:, s:s + n] = err.view(K, n, C).cpu()
    return out


@torch.no_grad()
def score_candidates_loop(model: Denoiser, schedule: NoiseSchedule, features: torch.Tensor, noise: torch.Tensor,
                          t_test: int, cand_global: torch.Tensor, cand_local: torch.Tensor,
                          amp: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Reference: one forward per (draw, candidate) — the per-class loop that `score_candidates` replaces."""
    K, N, _ = noise.shape
    C = cand_global.shape[0]
    out = torch.empty(K, N, C)
    t = torch.full((N,), t_test, device=features.device, dtype=torch.long)
    for k in range(K):
        eps = noise[k].to(features.device)
        z_t = schedule.add_noise(features, eps, t)
        for c in range(C):
            with amp():
                pred = model(z_t, t, cand_global[c].expand(N, -1), cand_local[c].expand(N, -1, -1))
            out[k, :, c] = (schedule.target(features, eps, t) - pred.float()).pow(2).mean(-1).cpu()
    return out


@dataclass
class ZSLMetrics:
    """Accuracy of one t_test over K noise draws; classes are the candidate class ids in column order."""

    t_test: int
    classes: list[int]
    top1: float                  # mean over draws (the paper's protocol), in %
    top1_std: float              # std over draws
    top1_draws: list[float]      # accuracy of each draw
    top1_ensemble: float         # argmin of the draw-averaged error (the official code's summed errors)
    top5: float | None           # mean over draws; None with fewer than 5 candidates
    per_class: list[float]       # accuracy per candidate class over all draws, in %
    confusion: np.ndarray = field(repr=False)   # (C, C) counts over draws: rows true, columns predicted


def metrics_from_errors(errors: torch.Tensor, labels: torch.Tensor, classes: list[int], t_test: int) -> ZSLMetrics:
    """errors (K, N, C), labels (N,) class ids in `classes` -> ZSLMetrics."""
    K, N, C = errors.shape
    col = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([col[int(v)] for v in labels.tolist()], dtype=torch.long)   # (N,)
    pred = errors.argmin(-1)                                                      # (K, N)
    acc_draws = (pred == y).float().mean(-1) * 100                                # (K,)
    top5 = None
    if C >= 5:
        top5_idx = errors.topk(5, dim=-1, largest=False).indices                  # (K, N, 5)
        top5 = float((top5_idx == y[None, :, None]).any(-1).float().mean() * 100)
    ens = errors.mean(0).argmin(-1)                                               # (N,)
    confusion = np.zeros((C, C), dtype=np.int64)
    np.add.at(confusion, (y.repeat(K).numpy(), pred.reshape(-1).numpy()), 1)
    support = confusion.sum(1)
    per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1) * 100, np.nan)
    return ZSLMetrics(
        t_test=t_test, classes=list(classes), top1=float(acc_draws.mean()),
        top1_std=float(acc_draws.std(unbiased=False)), top1_draws=[float(a) for a in acc_draws],
        top1_ensemble=float((ens == y).float().mean() * 100),
        top5=top5, per_class=[float(v) for v in per_class], confusion=confusion,
    )


@dataclass
class ZSLCurve:
    """Metrics for every t_test of a grid, from one model and one set of evaluation noises."""

    by_t: dict[int, ZSLMetrics]

    def at(self, t_test: int) -> ZSLMetrics:
        return self.by_t[t_test]

    def best(self) -> ZSLMetrics:
        """The t_test with the highest mean top-1 (ties: the smaller t)."""
        return max(self.by_t.values(), key=lambda m: (m.top1, -m.t_test))


def evaluate_zsl(model: Denoiser, schedule: NoiseSchedule, features: torch.Tensor, labels: torch.Tensor,
                 classes: list[int], text_global: torch.Tensor, text_local: torch.Tensor, t_grid: list[int],
                 noise_draws: int, seed: int, max_rows: int = 4096,
                 amp: Callable[[], ContextManager] = contextlib.nullcontext) -> ZSLCurve:
    """Zero-shot accuracy over `classes` (ids into text_global/text_local) for every t in t_grid.

    features (N, D) and the text tensors on the model's device; labels (N,) class ids, all in `classes`.
    """
    idx = torch.tensor(classes, dtype=torch.long, device=text_global.device)
    cand_g, cand_l = text_global[idx], text_local[idx]                            # (C, D_g), (C, M_l, D_l)
    noise = evaluation_noise(noise_draws, features.shape[0], features.shape[1], seed)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        by_t = {}
        for t in t_grid:
            errors = score_candidates(model, schedule, features, noise, t, cand_g, cand_l, max_rows, amp)
            by_t[t] = metrics_from_errors(errors, labels.cpu(), classes, t)
    finally:
        if was_training:
            model.train()
    return ZSLCurve(by_t)


# ----------------------------------------------------------------------------------------------
# Generalised zero-shot (GZSL): test samples of seen and unseen classes, every class a candidate
# ----------------------------------------------------------------------------------------------

def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when either is 0 (a classifier that never gets one side right has H = 0)."""
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


@dataclass
class GZSLMetrics:
    """Accuracy (%) of one t_test over K noise draws with every class a candidate, split by the sample's class."""

    t_test: int
    seen: float                  # accuracy on the seen-class samples, mean over draws
    unseen: float                # accuracy on the unseen-class samples, mean over draws
    h: float                     # harmonic mean of `seen` and `unseen` (the two means above)
    seen_draws: list[float]
    unseen_draws: list[float]


def gzsl_from_errors(errors: torch.Tensor, labels: torch.Tensor, classes: list[int], seen: list[int],
                     t_test: int) -> GZSLMetrics:
    """errors (K, N, C) over candidate `classes` (seen and unseen ids), labels (N,) class ids -> GZSLMetrics.

    A sample counts as right when the argmin over *all* candidates is its class; seen/unseen accuracy is over the
    samples of the seen/unseen classes (sample accuracy, as test/zsl_top1). Both sides need samples.
    """
    col = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([col[int(v)] for v in labels.tolist()], dtype=torch.long)   # (N,)
    right = errors.argmin(-1) == y                                                # (K, N)
    is_seen = torch.isin(labels.cpu(), torch.tensor(sorted(seen), dtype=labels.dtype))   # (N,)
    if bool(is_seen.all()) or not bool(is_seen.any()):
        raise ValueError("GZSL needs samples of both seen and unseen classes")
    seen_draws = right[:, is_seen].float().mean(-1) * 100                         # (K,)
    unseen_draws = right[:, ~is_seen].float().mean(-1) * 100                      # (K,)
    s, u = float(seen_draws.mean()), float(unseen_draws.mean())
    return GZSLMetrics(t_test=t_test, seen=s, unseen=u, h=harmonic_mean(s, u),
                       seen_draws=[float(a) for a in seen_draws], unseen_draws=[float(a) for a in unseen_draws])


def evaluate_gzsl(model: Denoiser, schedule: NoiseSchedule, features: torch.Tensor, labels: torch.Tensor,
                  classes: list[int], seen: list[int], text_global: torch.Tensor, text_local: torch.Tensor,
                  t_test: int, noise_draws: int, seed: int, max_rows: int = 4096,
                  amp: Callable[[], ContextManager] = contextlib.nullcontext) -> GZSLMetrics:
    """GZSL accuracy at one t_test: every class of `classes` (seen + unseen ids) scored for every sample.

    Costs K x C forwards per sample (46 candidates in the skeleton chain against its 12 unseen for zsl_top1), so
    only t_test is scored, not the grid. Noise is keyed by the sample (`sample_keyed_noise`): a sample gets the
    noise it gets from the registered model, whatever else is in the set.
    """
    idx = torch.tensor(classes, dtype=torch.long, device=text_global.device)
    noise = sample_keyed_noise(features, noise_draws, seed)                       # (K, N, D)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        errors = score_candidates(model, schedule, features, noise, t_test, text_global[idx], text_local[idx],
                                  max_rows, amp)                                  # (K, N, C)
    finally:
        if was_training:
            model.train()
    return gzsl_from_errors(errors, labels.cpu(), classes, seen, t_test)
