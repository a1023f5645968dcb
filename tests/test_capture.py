"""Attention capture: equality with eager attention, gradients under checkpointing, cost and scope."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.utils import is_flash_attn_2_available

from swim.modeling import attention_maps
from swim.modeling.capture import (
    AttentionProbe,
    default_supervised_layers,
    find_decoder_layers,
    video_token_positions,
)
from swim.modeling.objective import GroundingConfig, grounding_loss
from swim.testing import video_batch

# Right-padded, unequal lengths, the second sample with two videos.
SAMPLES = [
    dict(videos=[(2, 4, 4)], text=6, queries=[(1, 0), (4, 1)], objects=2),
    dict(videos=[(2, 4, 8), (2, 4, 4)], text=9, queries=[(2, 0)], objects=1),
]


def load(ckpt, impl="sdpa"):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, attn_implementation=impl)


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("grounding", "labels")}


def eager_rows(ckpt, inputs, layers, query_positions):
    model = load(ckpt, "eager").eval()
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    out = []
    for layer in layers:
        a = attentions[layer]  # [B, H, L, L]
        out.append(a.gather(2, query_positions[:, None, :, None].expand(-1, a.shape[1], -1, a.shape[-1])))
    return torch.stack(out)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_maps_equal_eager_output_attentions(tiny_ckpt, impl):
    model = load(tiny_ckpt, impl).eval()
    batch = video_batch(model.config, SAMPLES)
    inputs = model_inputs(batch)
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"].shape[1], "sample 0 must be padded"
    # rows: answer tokens, a row right after a video, and the last real token of each sample
    lengths = inputs["attention_mask"].sum(1)
    query_positions = torch.stack([torch.tensor([15, 20, int(n) - 1]) for n in lengths])
    layers = [0, 1, 3]
    with torch.no_grad():
        ours = attention_maps(model, inputs, layers, query_positions)
    reference = eager_rows(tiny_ckpt, inputs, layers, query_positions)
    assert ours.shape == (3, 2, model.config.text_config.num_attention_heads, 3, inputs["input_ids"].shape[1])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours.sum(-1)), atol=1e-5, rtol=0)
    # causal: nothing after the row; padding: nothing on sample 0's pad tokens
    keys = torch.arange(ours.shape[-1])
    after = keys[None, None, :] > query_positions[:, :, None]  # [B, n, L]
    assert ours.masked_select(after[None, :, None]).abs().max() == 0
    assert ours[:, 0, ..., int(lengths[0]) :].abs().max() == 0


def test_capture_leaves_main_forward_unchanged(tiny_ckpt):
    model = load(tiny_ckpt).eval()
    inputs = model_inputs(video_batch(model.config, SAMPLES))
    with torch.no_grad():
        plain = model(**inputs).logits
        probe = AttentionProbe(model, [1, 2])
        with probe.capture():
            captured = model(**inputs).logits
        probe.remove()
    assert torch.equal(plain, captured)


@pytest.mark.gpu
@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn not installed")
def test_attention_maps_under_flash_attention_2(tiny_ckpt):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_ckpt, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda()
    batch = video_batch(model.config, SAMPLES)
    inputs = {k: v.cuda() for k, v in model_inputs(batch).items()}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].bfloat16()
    query_positions = torch.tensor([[20, 21], [30, 31]]).cuda()
    with torch.no_grad():
        ours = attention_maps(model, inputs, [1, 3], query_positions)
    reference = eager_rows(tiny_ckpt, {k: v.cpu().float() if v.is_floating_point() else v.cpu()
                                       for k, v in inputs.items()}, [1, 3], query_positions.cpu())  # fmt: skip
    torch.testing.assert_close(ours.cpu(), reference, atol=2e-2, rtol=0)


def test_default_supervised_layers():
    assert default_supervised_layers(28) == [2, 7, 12, 17, 22, 27]
    assert default_supervised_layers(36) == [3, 9, 16, 22, 29, 35]
    assert default_supervised_layers(8) == [1, 2, 3, 4, 6, 7]
    assert default_supervised_layers(4) == [0, 1, 2, 3]


def test_probe_hooks_only_text_decoder_layers(tiny_ckpt):
    model = load(tiny_ckpt)
    layers = find_decoder_layers(model)
    assert len(layers) == model.config.text_config.num_hidden_layers
    probe = AttentionProbe(model, [1, 3])
    hooked = [name for name, m in model.named_modules() if m._forward_pre_hooks]
    assert hooked == ["model.language_model.layers.1", "model.language_model.layers.3"]
    probe.remove()
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="out of range"):
        AttentionProbe(model, [4])


def test_nothing_captured_outside_capture_block(tiny_ckpt):
    model = load(tiny_ckpt).eval()
    probe = AttentionProbe(model, [1])
    with torch.no_grad():
        model(**model_inputs(video_batch(model.config, SAMPLES)))
    assert probe._captured == {}
    with pytest.raises(RuntimeError, match="inside `probe.capture\\(\\)`"):
        probe.rows(torch.zeros(2, 1, dtype=torch.long))


def test_video_token_positions():
    ids = torch.tensor([[5, 13, 13, 7, 13], [13, 1, 2, 0, 0]])
    assert video_token_positions(ids, 13).tolist() == [[1, 2, 4], [0, -1, -1]]


def _supervised_grads(tiny_ckpt, mode, layers=(1, 3), samples=SAMPLES):
    torch.manual_seed(0)
    model = load(tiny_ckpt).train()
    if mode != "none":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"}
        )
    batch = video_batch(model.config, samples)
    grounding = batch.pop("grounding")
    batch.pop("labels")
    config = GroundingConfig(layers=list(layers))
    probe = AttentionProbe(model, config.layers)
    with probe.capture():
        # the real path: its output feeds a loss, so reentrant checkpointing is active for the layers
        text_logits = model(**batch).logits
    loss, stats = grounding_loss(probe, grounding, batch["input_ids"], batch["attention_mask"],
                                 model.config.video_token_id, config)  # fmt: skip
    assert stats["attn_pairs"] > 0
    (loss + 0 * text_logits.sum()).backward()
    decoder = find_decoder_layers(model)
    return {
        (i, name): getattr(decoder[i].self_attn, name).weight.grad
        for i in range(len(decoder))
        for name in ("q_proj", "k_proj")
    }


@pytest.mark.parametrize("mode", ["none", "reentrant", "non_reentrant"])
def test_attention_loss_reaches_q_and_k_of_every_supervised_layer(tiny_ckpt, mode):
    grads = _supervised_grads(tiny_ckpt, mode)
    for layer in (1, 3):
        for name in ("q_proj", "k_proj"):
            g = grads[(layer, name)]
            assert g is not None and g.abs().sum() > 0, f"no gradient at layer {layer} {name} ({mode})"
    # layers above the last supervised one cannot influence the loss
    assert grads[(3, "q_proj")] is not None
    reference = _supervised_grads(tiny_ckpt, "none")
    for key, g in grads.items():
        if reference[key] is None:
            assert g is None
        else:
            torch.testing.assert_close(g, reference[key], atol=1e-6, rtol=1e-4)


def test_only_samples_with_queries_are_recomputed(tiny_ckpt):
    model = load(tiny_ckpt).eval()
    samples = [dict(SAMPLES[0]), dict(videos=[(2, 4, 4)], text=5)]  # the second has no masks
    batch = video_batch(model.config, samples)
    probe = AttentionProbe(model, [1])
    seen = []
    original = probe.video_attention

    def spy(query_positions, video_positions, attention_mask=None, batch_index=None):
        seen.append((tuple(query_positions.shape), batch_index.tolist()))
        return original(query_positions, video_positions, attention_mask, batch_index)

    probe.video_attention = spy
    with torch.no_grad(), probe.capture():
        model(**model_inputs(batch))
        grounding_loss(probe, batch["grounding"], batch["input_ids"], batch["attention_mask"],
                       model.config.video_token_id, GroundingConfig(layers=[1]))  # fmt: skip
    assert seen == [((1, 2), [0])]
