"""Segmentation losses, MBA semantics and the SWIM attention gate, against hand-computed values."""

import math

import pytest
import torch

from swim.seg.losses import bce_sum, boundary_sum, dice_sum, masked_average, sobel_magnitude, tmc_loss
from swim.seg.mba import MaskBiasedAttention
from swim.seg.objective import Pairs, attention_gate, object_attention, step_counts

LN3 = math.log(3.0)


def test_bce_and_dice_equal_hand_values():
    logits = torch.tensor([[[0.0, LN3]]])  # sigmoid: 0.5, 0.75
    target = torch.tensor([[[1.0, 0.0]]])
    # BCE: (-log 0.5 - log 0.25) / 2 = (ln 2 + ln 4) / 2
    assert bce_sum(logits, target).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    # Dice (eps 1): 1 - (2·0.5 + 1) / (1.25 + 1 + 1)
    assert dice_sum(logits, target).item() == pytest.approx(1 - 2 / 3.25, rel=1e-6)
    # sums over pairs
    two = torch.cat([logits, logits]), torch.cat([target, target])
    assert bce_sum(*two).item() == pytest.approx(2 * bce_sum(logits, target).item(), rel=1e-6)


def test_sobel_of_a_vertical_step():
    step = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4)[None]
    # gx = (right - left)·(1 + 2 + 1) on the two columns beside the edge, 0 elsewhere (replicated borders)
    expected = torch.tensor([0.0, 4.0, 4.0, 0.0]).expand(4, 4)
    torch.testing.assert_close(sobel_magnitude(step)[0], expected, atol=1e-5, rtol=0)


def test_boundary_loss_per_sample_and_the_released_normalisation():
    step = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4)
    flat = torch.zeros(4, 4)  # constant logits: no predicted edge
    # per sample: |0 - [0, 1, 1, 0]| averaged over 16 pixels = 0.5
    assert boundary_sum(flat[None], step[None]).item() == pytest.approx(0.5, abs=1e-5)
    # the first pair's target has no edge: `parity` divides the second pair by ~eps (defect D5)
    targets, logits = torch.stack([torch.zeros(4, 4), step]), torch.stack([flat, flat])
    assert boundary_sum(logits, targets, "per_sample").item() == pytest.approx(0.5, abs=1e-5)
    assert boundary_sum(logits, targets, "parity").item() > 1e4
    with pytest.raises(ValueError, match="boundary norm"):
        boundary_sum(logits, targets, "max")


def test_tmc_equals_the_hand_computed_infonce():
    eye = torch.eye(2)
    # tau 1: similarity I, each row's cross-entropy is log(1 + e^-1) in both directions
    assert tmc_loss(eye, eye, tau=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert tmc_loss(3 * eye, eye, tau=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    swapped = tmc_loss(eye, eye.flip(0), tau=0.5).item()  # mismatched pairs cost more
    assert swapped == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)
    assert tmc_loss(eye[:1], eye[:1]).item() == 0.0  # one object: no negative, skipped
    z = torch.randn(3, 4, requires_grad=True)
    parity = tmc_loss(z, torch.randn(3, 4), impl="parity")
    assert parity.item() == 0.0 and parity.requires_grad  # the released code's constant zero (D4)


def test_masked_average():
    features = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(
        masked_average(features, weights), torch.tensor([[1.5, 5.5]]), atol=1e-5, rtol=0
    )


def mba_inputs(n_tokens=3):
    torch.manual_seed(0)
    features, prompt = torch.randn(2, 16, 4, 4), torch.randn(2, 16)
    tokens, mask = torch.randn(2, n_tokens, 16), torch.ones(2, n_tokens, dtype=torch.bool)
    mask[1, -1] = False
    return features, torch.ones(2, 4, 4), prompt, tokens, mask


@pytest.mark.parametrize("mode", ["code", "paper", "fixed"])
def test_mba_is_the_identity_while_gamma_is_zero(mode):
    mba = MaskBiasedAttention(16, heads=4, mode=mode).eval()
    features, gate, prompt, tokens, mask = mba_inputs()
    torch.testing.assert_close(mba(features, gate, prompt, tokens, mask), features, rtol=0, atol=0)


def test_code_mode_is_a_gated_bias_add():
    """One key: the softmax is 1, so the injection is the same vector at every pixel (defect D1)."""
    mba = MaskBiasedAttention(16, heads=4, mode="code").eval()
    torch.nn.init.constant_(mba.gamma, 0.5)
    features, gate, prompt, _, _ = mba_inputs()
    added = mba(features, gate, prompt) - features  # [P, C, h, w]
    torch.testing.assert_close(added, added[..., :1, :1].expand_as(added), atol=1e-6, rtol=0)
    gate[:, :2] = 0.0  # the gate switches it off where the prior says "background"
    assert (mba(features, gate, prompt) - features)[:, :, :2].abs().max() == 0


@pytest.mark.parametrize("mode, trained", [("paper", False), ("code", False), ("fixed", True)])
def test_only_the_fixed_router_gets_a_gradient(mode, trained):
    mba = MaskBiasedAttention(16, heads=4, mode=mode).eval()
    torch.nn.init.constant_(mba.gamma, 0.5)
    features, gate, prompt, tokens, mask = mba_inputs()
    mba(features, gate, prompt, tokens, mask).square().sum().backward()
    grads = [p.grad for p in mba.router.parameters()]
    if trained:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:  # top-K indices only: the router never trains (defect D2)
        assert all(g is None for g in grads)
    assert mba.gamma.grad is not None and mba.gamma.grad.abs() > 0


def test_attention_gate_is_one_for_uniform_attention_and_follows_a_peak():
    groups = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])  # two temporal groups of 2x2 tokens
    attn = torch.tensor(
        [[[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 4.0]]]
    )  # group 0 uniform, group 1 on its last token
    pairs = Pairs(sample=torch.tensor([0, 0]), obj=torch.tensor([0, 0]), slot=torch.tensor([0, 1]),
                  frame=torch.tensor([0, 1]), query=torch.tensor([0, 0]), query_sample=torch.tensor([0]),
                  query_object=torch.tensor([0]))  # fmt: skip
    gate = attention_gate(attn, groups, torch.tensor([[2, 2]]), torch.tensor([[0, 1]]), pairs, side=2)
    torch.testing.assert_close(gate[0], torch.ones(2, 2))  # K_g · 1/4 = 1 everywhere
    torch.testing.assert_close(gate[1], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # 4 · a, clamped to [0, 1]
    # an object without attention rows: no prior (1)
    gate = attention_gate(
        torch.zeros(1, 1, 8), groups, torch.tensor([[2, 2]]), torch.tensor([[0, 1]]), pairs, 2
    )
    assert torch.equal(gate, torch.ones(2, 2, 2))


def test_object_attention_averages_each_objects_rows():
    attn = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # three rows
    objects = torch.tensor([[0, 0, -1]])
    torch.testing.assert_close(object_attention(attn, objects, 2), torch.tensor([[[0.5, 0.5], [0.0, 0.0]]]))


def test_step_counts():
    valid = torch.zeros(2, 2, 3, dtype=torch.bool)
    valid[0, 0, :2] = True
    seg = {"valid": valid, "query": torch.tensor([[5, -1], [-1, -1]])}
    assert step_counts(seg) == (2, 0) and step_counts(None) == (0, 0)
    valid[1, 0, 0] = True
    seg["query"][1, 0] = 7
    assert step_counts(seg) == (3, 1)  # two objects with pairs: one contrast
