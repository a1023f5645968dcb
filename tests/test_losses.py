"""Grounding losses: known answers, masking, gradients, fusion, parity with the official formula."""

import math

import pytest
import torch

from swim.modeling.losses import (
    bce_loss,
    dice_loss,
    fuse_layers,
    group_log_normalize,
    group_normalize,
    kl_loss,
    segment_sum,
    swim_parity_loss,
)

# one sample, two rows, two groups of 4 tokens, one padding column
GROUPS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1]])
MASK = torch.tensor([[[1.0, 0.5, 0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1, 0, 0, 0]]])  # [1, 2, 9]
VALID = torch.ones(1, 2, 2, dtype=torch.bool)


def random_attn(seed=0, layers=None):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 2, 9) if layers is None else (layers, 1, 2, 9)
    x = torch.rand(shape, generator=g) * (GROUPS >= 0)
    return x.requires_grad_()


def test_segment_helpers():
    x = torch.arange(9.0).view(1, 1, 9)
    assert segment_sum(x, GROUPS, 2).tolist() == [[[6.0, 22.0]]]
    norm = group_normalize(x + 1, GROUPS, 2)
    assert torch.allclose(segment_sum(norm, GROUPS, 2), torch.ones(1, 1, 2))
    assert norm[..., -1].item() == 0
    log_norm = group_log_normalize((x + 1).log(), GROUPS, 2)
    torch.testing.assert_close(log_norm.exp()[..., :8], norm[..., :8])


def test_kl_is_zero_for_attention_equal_to_target_and_positive_otherwise():
    perfect = group_normalize(MASK, GROUPS, 2).clamp_min(1e-30).log()
    assert kl_loss(perfect, MASK, GROUPS, VALID).item() == pytest.approx(0.0, abs=1e-6)
    uniform = group_normalize(torch.ones(1, 2, 9), GROUPS, 2).log()
    # row 0 group 0: t = (2/3, 1/3) vs uniform 1/4 -> KL = 2/3 log(8/3) + 1/3 log(4/3)
    expected_00 = 2 / 3 * math.log(8 / 3) + 1 / 3 * math.log(4 / 3)
    valid = torch.zeros_like(VALID)
    valid[0, 0, 0] = True
    assert kl_loss(uniform, MASK, GROUPS, valid).item() == pytest.approx(expected_00, rel=1e-5)


def test_bce_and_dice_are_zero_for_a_map_equal_to_a_binary_mask():
    binary = (MASK > 0.75).float()
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    valid[0, 1, 0] = False  # row 1 has no mask in group 0 -> excluded
    log_map = binary.clamp_min(1e-30).log()
    assert dice_loss(log_map, binary, GROUPS, valid).item() == pytest.approx(0.0, abs=1e-5)
    assert bce_loss(log_map, binary, GROUPS, valid).item() == pytest.approx(0.0, abs=1e-4)
    worse = torch.zeros_like(binary).log_softmax(-1)
    assert dice_loss(worse, binary, GROUPS, valid) > 0.1
    assert bce_loss(worse, binary, GROUPS, valid) > 0.1


@pytest.mark.parametrize("loss_fn", [kl_loss, bce_loss, dice_loss])
def test_invalid_pairs_and_padding_do_not_contribute(loss_fn):
    attn = random_attn()
    valid = VALID.clone()
    valid[0, 1, 1] = False
    base = loss_fn(group_normalize(attn, GROUPS, 2).log(), MASK, GROUPS, valid)
    changed = attn.detach().clone()
    changed[0, 1, 4:8] = torch.tensor([5.0, 0.1, 0.1, 0.1])  # row 1, group 1: not supervised
    changed[0, :, 8] = 7.0  # padding column
    again = loss_fn(group_normalize(changed, GROUPS, 2).log(), MASK, GROUPS, valid)
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    none = loss_fn(group_normalize(attn, GROUPS, 2).log(), MASK, GROUPS, torch.zeros_like(VALID))
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize("loss_fn", [kl_loss, bce_loss, dice_loss])
def test_gradients_are_finite_and_push_attention_into_the_mask(loss_fn):
    attn = random_attn(seed=3)
    loss = loss_fn(fuse_layers(attn[None], GROUPS, 2, "mean"), MASK, GROUPS, VALID)
    loss.backward()
    assert torch.isfinite(attn.grad).all()
    # one gradient step raises the attention mass inside the mask
    stepped = (attn - 0.05 * attn.grad / attn.grad.abs().max()).clamp_min(1e-6).detach()
    mass = lambda a: (group_normalize(a, GROUPS, 2) * (MASK > 0)).sum()  # noqa: E731
    assert mass(stepped) > mass(attn.detach())


def test_losses_are_float32_under_bf16_autocast():
    attn = random_attn().bfloat16()
    log_map = group_normalize(attn.float(), GROUPS, 2).log().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (kl_loss, bce_loss, dice_loss):
            out = fn(log_map, MASK.bfloat16(), GROUPS, VALID)
            assert out.dtype == torch.float32 and torch.isfinite(out)


def test_product_fusion_is_the_renormalised_geometric_product():
    attn = random_attn(layers=3).detach() + 0.01 * (GROUPS >= 0)
    fused = fuse_layers(attn, GROUPS, 2, "product").exp()
    product = attn.double().prod(0)
    expected = group_normalize(product, GROUPS, 2).float()
    torch.testing.assert_close(fused[..., :8], expected[..., :8], atol=1e-6, rtol=1e-5)
    mean = fuse_layers(attn, GROUPS, 2, "mean").exp()
    expected_mean = torch.stack([group_normalize(a, GROUPS, 2) for a in attn]).mean(0)
    torch.testing.assert_close(mean[..., :8], expected_mean[..., :8])
    with pytest.raises(ValueError, match="layer fusion"):
        fuse_layers(attn, GROUPS, 2, "median")


def test_product_fusion_survives_tiny_probabilities():
    # six layers of ~1e-5 probabilities: the official `prod / (sum + 1e-6)` collapses to ~1e-24, ours does not
    attn = (random_attn(layers=6).detach() + 0.5) * 1e-5 * (GROUPS >= 0)
    fused = fuse_layers(attn, GROUPS, 2, "product").exp()
    assert torch.allclose(segment_sum(fused, GROUPS, 2), torch.ones(1, 2, 2), atol=1e-5)


def official_parity(attn, mask, groups):
    """The official formula on well-scaled inputs (float64): prod, row/sum, per-group min-max, BCE."""
    fused = attn.double().prod(0)
    fused = fused / fused.sum(-1, keepdim=True)
    losses = []
    for g in range(2):
        cols = (groups[0] == g).nonzero().squeeze(1)
        for r in range(fused.shape[1]):
            x = fused[0, r, cols]
            p = ((x - x.min()) / (x.max() - x.min())).clamp(1e-6, 1 - 1e-6)
            t = mask[0, r, cols].double()
            losses.append(-(t * p.log() + (1 - t) * (1 - p).log()).mean())
    return torch.stack(losses).mean()


def test_swim_parity_matches_the_official_formula():
    attn = random_attn(layers=3).detach() + 0.05 * (GROUPS >= 0)
    ours = swim_parity_loss(attn, MASK, GROUPS, VALID)
    # float32 vs float64 differ only at the clamp bound 1 - 1e-6 (not exactly representable in float32)
    assert ours.item() == pytest.approx(official_parity(attn, MASK, GROUPS).item(), rel=1e-3)
