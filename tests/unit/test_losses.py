import torch

from trainers.losses import sample_negative_classes, triplet_diffusion_loss


def test_loss_matches_hand_computation(gen):
    target, pp, pn = (torch.randn(6, 8, generator=gen) for _ in range(3))
    valid = torch.tensor([True, True, False, True, False, True])
    out = triplet_diffusion_loss(target, pp, pn, valid, margin=1.0, triplet_weight=0.5)
    e_pos = ((target - pp) ** 2).mean(1)
    e_neg = ((target - pn) ** 2).mean(1)
    l_td = torch.clamp(e_pos - e_neg + 1.0, min=0)[valid].mean()
    assert torch.allclose(out["loss_diff"], e_pos.mean())
    assert torch.allclose(out["loss_td"], l_td)
    assert torch.allclose(out["loss"], e_pos.mean() + 0.5 * l_td)


def test_masked_pairs_do_not_contribute(gen):
    target, pp, pn = (torch.randn(4, 8, generator=gen) for _ in range(3))
    valid = torch.tensor([True, False, True, False])
    a = triplet_diffusion_loss(target, pp, pn, valid, 1.0, 1.0)["loss_td"]
    pn2 = pn.clone()
    pn2[~valid] = target[~valid] + 100.0                      # change only masked negatives
    b = triplet_diffusion_loss(target, pp, pn2, valid, 1.0, 1.0)["loss_td"]
    assert torch.equal(a, b)


def test_all_masked_gives_zero_triplet_term(gen):
    target, pp, pn = (torch.randn(3, 4, generator=gen) for _ in range(3))
    out = triplet_diffusion_loss(target, pp, pn, torch.zeros(3, dtype=torch.bool), 1.0, 1.0)
    assert out["loss_td"].item() == 0.0


def test_margin_satisfied_gives_zero(gen):
    target = torch.zeros(2, 4)
    out = triplet_diffusion_loss(target, target.clone(), target + 2.0, torch.ones(2, dtype=torch.bool), 1.0, 1.0)
    assert out["loss_td"].item() == 0.0                       # e_neg = 4 > e_pos + tau


def test_gradient_pushes_negative_error_up(gen):
    target = torch.randn(4, 8, generator=gen)
    pn = (target + 0.1 * torch.randn(4, 8, generator=gen)).requires_grad_()
    pp = target + 0.5
    triplet_diffusion_loss(target, pp, pn, torch.ones(4, dtype=torch.bool), 1.0, 1.0)["loss"].backward()
    # descending the gradient moves pred_neg away from the target
    moved = pn - 0.1 * pn.grad
    assert ((moved - target) ** 2).sum() > ((pn - target) ** 2).sum()


def test_negatives_come_from_pool(gen):
    pool = torch.tensor([3, 5, 9])
    neg = sample_negative_classes(torch.zeros(1000, dtype=torch.long), pool, gen)
    assert set(neg.tolist()) == {3, 5, 9}
