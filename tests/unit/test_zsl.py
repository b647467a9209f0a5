import numpy as np
import torch

from trainers.configs import ModelConfig
from trainers.diffusion import NoiseSchedule
from trainers.tdsm_model import TDSMDenoiser
from trainers.zsl import (
    evaluate_zsl,
    evaluation_noise,
    metrics_from_errors,
    sample_keyed_noise,
    score_candidates,
    score_candidates_loop,
)


def trained_like_model(gen):
    model = TDSMDenoiser(ModelConfig(preset="tiny"), 16, 12, 10, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_batched_scoring_equals_naive_loop(gen):
    model = trained_like_model(gen)
    sched = NoiseSchedule(50)
    x = torch.randn(9, 16, generator=gen)
    g, l = torch.randn(6, 12, generator=gen), torch.randn(6, 5, 10, generator=gen)
    noise = evaluation_noise(3, 9, 16, seed=7)
    fast = score_candidates(model, sched, x, noise, 25, g, l, max_rows=40)   # forces several chunks
    slow = score_candidates_loop(model, sched, x, noise, 25, g, l)
    assert fast.shape == (3, 9, 6)
    # fp32 GEMMs of different shapes reorder sums: a few ulps of the O(1) errors; a wrong row would be O(1) off.
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_chunking_does_not_change_scores(gen):
    model = trained_like_model(gen)
    sched = NoiseSchedule(50, prediction_type="v_prediction")
    x = torch.randn(7, 16, generator=gen)
    g, l = torch.randn(4, 12, generator=gen), torch.randn(4, 5, 10, generator=gen)
    noise = evaluation_noise(2, 7, 16, seed=1)
    a = score_candidates(model, sched, x, noise, 10, g, l, max_rows=8)
    b = score_candidates(model, sched, x, noise, 10, g, l, max_rows=10_000)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)   # chunk size only changes GEMM shapes (fp32 ulps)


def test_evaluation_noise_is_seeded_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = evaluation_noise(2, 3, 4, seed=5)
    torch.manual_seed(99)
    torch.randn(100)
    assert torch.equal(a, evaluation_noise(2, 3, 4, seed=5))
    assert not torch.equal(a, evaluation_noise(2, 3, 4, seed=6))


def test_metrics_from_errors():
    classes = [4, 8, 15]
    labels = torch.tensor([4, 8, 15, 15])
    # draw 0: all right; draw 1: last sample wrong (predicts 8)
    err = torch.tensor([
        [[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 0]],
        [[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0.5]],
    ], dtype=torch.float)
    m = metrics_from_errors(err, labels, classes, t_test=25)
    assert m.top1 == 87.5 and abs(m.top1_std - 12.5) < 1e-6
    assert m.top5 is None
    assert m.top1_ensemble == 100.0           # draw-mean errors of the last sample: [1, .5, .25] -> right
    assert m.confusion.sum() == 8 and m.confusion[2, 1] == 1
    assert np.allclose(m.per_class, [100, 100, 75])


def test_top5_with_enough_classes(gen):
    err = torch.rand(2, 30, 7, generator=gen)
    labels = torch.randint(7, (30,), generator=gen)
    m = metrics_from_errors(err, labels, list(range(7)), 5)
    assert m.top5 is not None and m.top5 >= m.top1


def test_curve_over_t_grid(gen):
    model = trained_like_model(gen)
    x = torch.randn(10, 16, generator=gen)
    labels = torch.tensor([1, 3] * 5)
    g, l = torch.randn(5, 12, generator=gen), torch.randn(5, 5, 10, generator=gen)
    curve = evaluate_zsl(model, NoiseSchedule(50), x, labels, [1, 3], g, l, [5, 25, 45], 2, seed=0)
    assert sorted(curve.by_t) == [5, 25, 45]
    assert curve.best().top1 == max(m.top1 for m in curve.by_t.values())


def test_sample_keyed_noise_follows_the_sample_not_its_row():
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    batch = sample_keyed_noise(x, 4, seed=11)                                    # (K, N, D)
    assert batch.shape == (4, 6, 16)
    alone = sample_keyed_noise(x[2:3], 4, seed=11)
    perm = torch.tensor([5, 0, 3, 1, 4, 2])                                      # sample 2 arrives last
    shuffled = sample_keyed_noise(x[perm], 4, seed=11)
    # Bitwise: each sample's noise comes from its own generator, whatever else is in the batch.
    assert torch.equal(alone[:, 0], batch[:, 2]) and torch.equal(shuffled[:, -1], batch[:, 2])
    assert torch.equal(shuffled, batch[:, perm])
    assert not torch.equal(sample_keyed_noise(x, 4, seed=12), batch)             # the seed matters
    assert not torch.equal(batch[:, 0], batch[:, 1])                             # so does the sample
    # Standard normal: 384 values, so the mean is within 4 standard errors (4 / sqrt(384) ~ 0.2) of 0.
    assert abs(float(batch.mean())) < 0.2 and 0.8 < float(batch.std()) < 1.2


def test_cpu_forwards_are_capped_to_cache_sized_row_counts(gen):
    """On a CPU one forward holds at most cpu_rows_per_forward rows (a whole chunk of K x C rows at least), and
    the capped scores equal the per-class loop's (computed in float64, where only the batching differs, ~1e-15;
    stored as float32, so they agree to an ulp of that)."""
    from trainers.zsl import cpu_rows_per_forward

    model = TDSMDenoiser(ModelConfig(preset="tiny", hidden_size=256, depth=1, num_heads=4), 16, 12, 10, 4).double()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    sched = NoiseSchedule(50)
    x, noise = torch.randn(40, 16, generator=gen).double(), torch.randn(2, 40, 16, generator=gen).double()
    g, l = torch.randn(6, 12, generator=gen).double(), torch.randn(6, 4, 10, generator=gen).double()
    cap = cpu_rows_per_forward(model, 5)
    assert cap == 256 * 36 * 256 // (5 * 256)
    batched = score_candidates(model, sched, x, noise, 10, g, l, max_rows=10**6)
    assert max(seen) <= cap and len(seen) == -(-40 // (cap // 12))          # 12 = K x C rows per sample
    torch.testing.assert_close(batched, score_candidates_loop(model, sched, x, noise, 10, g, l), rtol=1e-6, atol=0)
