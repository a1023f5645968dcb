"""KLAL's pieces of the loss with known answers: the three-level target, head renormalisation, per-layer KL."""

import math

import pytest
import torch

from swim.modeling.losses import fuse_heads, fuse_layers, group_normalize, kl_loss, per_layer_loss
from swim.modeling.objective import GroundingConfig
from swim.modeling.targets import TARGET_BUILDERS, dilate_cells, three_level_target


def grid(h, w, group=0):
    """groups [h*w], cells [h*w, 2] of one group laid out row-major."""
    index = torch.arange(h * w)
    return torch.full((h * w,), group), torch.stack([index // w, index % w], -1)


def one_sample(*grids):
    """groups [1, K], cells [1, K, 2] of several groups (e.g. two images) in sequence order."""
    parts = [grid(h, w, g) for g, (h, w) in enumerate(grids)]
    return torch.cat([p[0] for p in parts])[None], torch.cat([p[1] for p in parts])[None]


def test_three_level_target_on_a_4x4_grid():
    groups, cells = one_sample((4, 4))
    inside = torch.zeros(1, 1, 16, dtype=torch.bool)
    inside[0, 0, 5] = True  # cell (1, 1): its 8 neighbours are the ring, the other 7 cells the floor
    target = three_level_target(inside, groups, cells, ring=1, masses=(0.6, 0.3, 0.1))[0, 0].view(4, 4)
    expected = torch.full((4, 4), 0.1 / 7)
    expected[0:3, 0:3] = 0.3 / 8
    expected[1, 1] = 0.6
    torch.testing.assert_close(target, expected)
    # a corner cell has 3 neighbours; radius 2 around it covers the 3x3 corner block
    inside = torch.zeros(1, 1, 16, dtype=torch.bool)
    inside[0, 0, 0] = True
    corner = three_level_target(inside, groups, cells, ring=1, masses=(0.6, 0.3, 0.1))[0, 0].view(4, 4)
    assert corner[0, 0] == pytest.approx(0.6) and corner[0, 1] == corner[1, 1] == pytest.approx(0.1)
    assert corner[3, 3] == pytest.approx(0.1 / 12)
    assert dilate_cells(inside, groups, cells, 2)[0, 0].view(4, 4)[:3, :3].all()
    assert int(dilate_cells(inside, groups, cells, 2).sum()) == 9


def test_three_level_target_per_group_with_padding_and_empty_levels():
    # sample 0: two images (2x3 and 2x2 grids); sample 1: one 2x2 image, padded
    g0, c0 = one_sample((2, 3), (2, 2))
    g1, c1 = one_sample((2, 2))
    groups = torch.stack([g0[0], torch.cat([g1[0], torch.full((6,), -1)])])
    cells = torch.stack([c0[0], torch.cat([c1[0], torch.full((6, 2), -1)])])
    inside = torch.zeros(2, 1, 10, dtype=torch.bool)
    inside[0, 0, [0, 6, 7, 8, 9]] = True  # image 1 of sample 0 is all target: no ring, no floor there
    inside[1, 0, 3] = True  # sample 1: cell (1, 1) of 2x2 -> the other 3 are its ring, no floor
    t = three_level_target(inside, groups, cells, ring=1, masses=(0.6, 0.3, 0.1))
    # cell (0, 0) of 2x3: ring (0, 1), (1, 0), (1, 1); floor (0, 2), (1, 2)
    torch.testing.assert_close(t[0, 0, :6], torch.tensor([0.6, 0.3 / 3, 0.1 / 2, 0.3 / 3, 0.3 / 3, 0.1 / 2]))
    torch.testing.assert_close(t[0, 0, 6:], torch.full((4,), 0.25))  # all mass on the 4 target cells
    torch.testing.assert_close(
        t[1, 0, :4], torch.tensor([0.1, 0.1, 0.1, 0.6]) / 0.9
    )  # no floor: 0.6/0.3 renormalised
    assert t[1, 0, 4:].abs().sum() == 0  # padding
    # each group sums to 1
    for b, n_groups in ((0, 2), (1, 1)):
        sums = [float(t[b, 0][groups[b] == g].sum()) for g in range(n_groups)]
        assert sums == pytest.approx([1.0] * n_groups)
    # ring 0: two levels only
    flat = three_level_target(inside[1:], groups[1:], cells[1:], ring=0, masses=(0.6, 0.3, 0.1))
    torch.testing.assert_close(flat[0, 0, :4], torch.tensor([0.1 / 3, 0.1 / 3, 0.1 / 3, 0.6]) / 0.7)


def test_target_builders_and_their_settings():
    groups, cells = one_sample((2, 2))
    area = torch.tensor([[[0.5, 0.0, 0.0, 0.25]]])
    config = GroundingConfig(target="klal", target_ring=0, target_masses=(3, 0, 1))
    assert torch.equal(TARGET_BUILDERS["area"](area, groups, cells, config), area)
    klal = TARGET_BUILDERS["klal"](area, groups, cells, config)  # touched cells (area > 0) are the target
    torch.testing.assert_close(klal, torch.tensor([[[0.375, 0.125, 0.125, 0.375]]]))
    with pytest.raises(ValueError, match="vision_token_cell"):
        TARGET_BUILDERS["klal"](area, groups, None, config)
    with pytest.raises(ValueError, match="needs loss_type 'kl'"):
        GroundingConfig(target="klal", loss_type="bce")
    with pytest.raises(ValueError, match="target_masses"):
        GroundingConfig(target="klal", target_masses=(0, 1, 1))
    with pytest.raises(ValueError, match="per_layer / renorm_mean do not apply"):
        GroundingConfig(loss_type="swim_parity", layer_fusion="per_layer")
    with pytest.raises(ValueError, match="layers must be"):
        GroundingConfig(layers="some")


def test_renorm_mean_weighs_every_head_the_same():
    groups = torch.tensor([[0, 0, 1, 1]])
    # head 0 puts 0.1 of its mass on group 0's two tokens (1:1), head 1 puts 0.9 there (1:2)
    attn = torch.tensor([[[[0.05, 0.05, 0.2, 0.2]], [[0.3, 0.6, 0.0, 0.05]]]])  # [B=1, H=2, n=1, K=4]
    torch.testing.assert_close(fuse_heads(attn, groups, "mean"), attn.mean(1))
    renorm = fuse_heads(attn, groups, "renorm_mean")[0, 0]
    torch.testing.assert_close(renorm[:2], torch.tensor([(0.5 + 1 / 3) / 2, (0.5 + 2 / 3) / 2]))
    torch.testing.assert_close(renorm[2:], torch.tensor([(0.5 + 0.0) / 2, (0.5 + 1.0) / 2]))
    # the raw mean is dominated by the head with more vision mass
    mean = group_normalize(attn.mean(1), groups, 2)[0, 0, :2]
    torch.testing.assert_close(mean, torch.tensor([0.35, 0.65]) / 1.0)


GROUPS = torch.tensor([[0, 0]])
TARGET = torch.tensor([[[1.0, 0.0]]])
VALID = torch.ones(1, 1, 1, dtype=torch.bool)


def test_per_layer_kl_is_the_mean_of_the_layers_kls_and_bounds_the_fused_kl():
    attn = torch.tensor([[[[0.5, 0.5]]], [[[0.9, 0.1]]]])  # [Λ=2, B, n, K]
    per_layer = per_layer_loss(kl_loss, attn, TARGET, GROUPS, VALID)
    assert per_layer.item() == pytest.approx((math.log(2) - math.log(0.9)) / 2, rel=1e-6)
    fused = kl_loss(fuse_layers(attn, GROUPS, 1, "mean"), TARGET, GROUPS, VALID)
    assert fused.item() == pytest.approx(-math.log(0.7), rel=1e-6)
    assert per_layer > fused  # Jensen: the mean of the layers' KLs is the stronger objective
    same = attn[:1].expand(2, -1, -1, -1)
    assert per_layer_loss(kl_loss, same, TARGET, GROUPS, VALID).item() == pytest.approx(
        kl_loss(fuse_layers(same, GROUPS, 1, "mean"), TARGET, GROUPS, VALID).item()
    )


def test_per_layer_and_fused_gradients_by_hand():
    """d KL(t || a/Σa) / d a_i = 1/Σa - t_i/a_i (for Σt = 1): per_layer gives each layer 1/Λ of its own gradient,
    fused gives every layer the gradient through the mean map."""
    attn = torch.tensor([[[[0.5, 0.5]]], [[[0.6, 0.2]]]], dtype=torch.float64, requires_grad=True)
    per_layer_loss(kl_loss, attn, TARGET, GROUPS, VALID).backward()
    a = attn.detach()
    by_hand = (1 / a.sum(-1, keepdim=True) - TARGET / a) / 2
    torch.testing.assert_close(attn.grad, by_hand.float().double(), atol=1e-6, rtol=1e-5)
    attn.grad = None
    kl_loss(fuse_layers(attn, GROUPS, 1, "mean"), TARGET, GROUPS, VALID).backward()
    q = (a / a.sum(-1, keepdim=True)).mean(0)  # the fused map
    d_q = -TARGET / q  # d KL / d q (q sums to 1)
    norm = a.sum(-1, keepdim=True)
    fused_by_hand = (d_q - (d_q * a / norm).sum(-1, keepdim=True)) / norm / 2
    torch.testing.assert_close(attn.grad, fused_by_hand, atol=1e-6, rtol=1e-5)
