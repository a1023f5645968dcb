"""Attention capture, for every supported family: equality with eager attention, gradients under checkpointing,
cost and scope."""

import pytest
import torch
from transformers.utils import is_flash_attn_2_available

from swim.modeling import attention_maps
from swim.modeling.capture import (
    AttentionProbe,
    default_supervised_layers,
    find_decoder_layers,
    supervised_layers,
    vision_token_ids,
    vision_token_positions,
)
from swim.modeling.families import family_of
from swim.modeling.losses import fuse_heads
from swim.modeling.model import stock_model_class
from swim.modeling.objective import GroundingConfig, grounding_loss, supervised_pair_count, supervised_rows
from swim.testing import PADDED_SAMPLES, video_batch

SAMPLES = PADDED_SAMPLES  # right-padded, unequal lengths, the second sample with two videos
# An image before the video (Qwen3-VL's DeepStack adds vision features to image and video positions alike).
WITH_IMAGE = [
    dict(images=[(4, 4)], videos=[(2, 4, 4)], text=6, queries=[(1, 0)], objects=1),
    dict(videos=[(2, 4, 8)], text=9, queries=[(2, 0)], objects=1),
]


def load(ckpt, impl="sdpa"):
    return stock_model_class(ckpt).from_pretrained(ckpt, attn_implementation=impl)


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("grounding", "labels")}


def eager_attentions(model, inputs) -> dict:
    """Eager `output_attentions` keyed by layer index (a hybrid model returns its softmax layers only)."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    layers = list(find_decoder_layers(model))
    assert len(attentions) == len(layers)
    return dict(zip(layers, attentions))


def eager_rows(ckpt, inputs, layers, query_positions):
    attentions = eager_attentions(load(ckpt, "eager").eval(), inputs)
    out = []
    for layer in layers:
        a = attentions[layer]  # [B, H, L, L]
        out.append(a.gather(2, query_positions[:, None, :, None].expand(-1, a.shape[1], -1, a.shape[-1])))
    return torch.stack(out)


@pytest.mark.parametrize("samples", [SAMPLES, WITH_IMAGE], ids=["two_videos", "image_and_video"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_maps_equal_eager_output_attentions(family_ckpt, impl, samples):
    model = load(family_ckpt, impl).eval()
    batch = video_batch(model.config, samples)
    inputs = model_inputs(batch)
    assert inputs["attention_mask"][0].sum() != inputs["attention_mask"][1].sum(), "one sample must be padded"
    # rows: tokens inside and right after the vision tokens, and the last real token of each sample
    lengths = inputs["attention_mask"].sum(1)
    query_positions = torch.stack([torch.tensor([15, 20, int(n) - 1]) for n in lengths])
    layers = list(find_decoder_layers(model))
    with torch.no_grad():
        ours = attention_maps(model, inputs, layers, query_positions)
    reference = eager_rows(family_ckpt, inputs, layers, query_positions)
    heads = model.config.text_config.num_attention_heads
    assert ours.shape == (len(layers), 2, heads, 3, inputs["input_ids"].shape[1])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours.sum(-1)), atol=1e-5, rtol=0)
    # causal: nothing after the row; padding: nothing on the shorter sample's pad tokens
    keys = torch.arange(ours.shape[-1])
    after = keys[None, None, :] > query_positions[:, :, None]  # [B, n, L]
    assert ours.masked_select(after[None, :, None]).abs().max() == 0
    short = int(lengths.argmin())
    assert ours[:, short, ..., int(lengths[short]) :].abs().max() == 0


def test_sliding_window_layers_equal_eager(tiny_checkpoints, tmp_path):
    """A Qwen2.5-VL text model with sliding-window attention on its upper layers (window 8)."""
    model = load(tiny_checkpoints("qwen2_5_vl"), "eager")
    config = model.config
    config.text_config.use_sliding_window, config.text_config.sliding_window = True, 8
    config.text_config.max_window_layers = 2
    config.text_config.layer_types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    model = type(model)(config).eval()
    model.save_pretrained(tmp_path)
    assert [find_decoder_layers(model)[i].self_attn.sliding_window for i in (1, 2)] == [None, 8]
    inputs = model_inputs(video_batch(config, SAMPLES))
    lengths = inputs["attention_mask"].sum(1)
    query_positions = torch.stack([torch.tensor([15, int(n) - 1]) for n in lengths])
    with torch.no_grad():
        ours = attention_maps(model, inputs, [1, 2, 3], query_positions)
    reference = eager_rows(tmp_path, inputs, [1, 2, 3], query_positions)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    for b, n in enumerate(
        lengths.tolist()
    ):  # the last row sees only its 8 latest keys in the windowed layers
        assert ours[1:, b, :, 1, : n - 8].abs().max() == 0 and ours[0, b, :, 1, : n - 8].min() > 0


def test_capture_leaves_main_forward_unchanged(family_ckpt):
    model = load(family_ckpt).eval()
    inputs = model_inputs(video_batch(model.config, SAMPLES))
    with torch.no_grad():
        plain = model(**inputs).logits
        probe = AttentionProbe(model)
        with probe.capture():
            captured = model(**inputs).logits
        probe.remove()
    assert torch.equal(plain, captured)


@pytest.mark.gpu
@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn not installed")
def test_attention_maps_under_flash_attention_2(tiny_ckpt):
    model = _flash_attention_2_model(tiny_ckpt)
    inputs = _on_cuda(model_inputs(video_batch(model.config, SAMPLES)))
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


def test_probe_hooks_only_the_supervised_attention_of_text_decoder_layers(tiny_ckpt):
    model = load(tiny_ckpt)
    layers = find_decoder_layers(model)
    assert list(layers) == list(range(model.config.text_config.num_hidden_layers))
    probe = AttentionProbe(model, [1, 3])
    pre = [name for name, m in model.named_modules() if m._forward_pre_hooks]
    post = [name for name, m in model.named_modules() if m._forward_hooks]
    prefix = "model.language_model.layers"
    assert pre == [f"{prefix}.1.self_attn", f"{prefix}.3.self_attn"]
    assert post == [f"{prefix}.{i}.self_attn.{p}" for i in (1, 3) for p in ("q_proj", "k_proj")]
    probe.remove()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="not softmax-attention decoder layers"):
        AttentionProbe(model, [4])


def test_each_family_is_captured_before_rope_at_its_own_modules(family_ckpt):
    model = load(family_ckpt)
    family = family_of(model)
    layers = supervised_layers(model)
    probe = AttentionProbe(model)
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert {name.rsplit(".", 1)[-1] for name in hooked} == (
        {"q_norm", "k_norm"} if family.qk_norm else {"q_proj", "k_proj"}
    )
    assert sorted({int(name.split(".layers.")[1].split(".")[0]) for name in hooked}) == layers == probe.layers
    if family.hybrid:  # Qwen3.5: only the softmax-attention layers exist for the probe, by their own index
        assert layers == [1, 3] and list(find_decoder_layers(model)) == [1, 3]
        with pytest.raises(ValueError, match=r"\[0\] are not softmax-attention decoder layers .* \[1, 3\]"):
            AttentionProbe(model, [0])
    probe.remove()


def test_unsupported_models_are_refused_by_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    with pytest.raises(ValueError, match="unsupported model type 'llama'.*qwen2_5_vl.*qwen3_vl"):
        AttentionProbe(model)


def test_nothing_captured_outside_capture_block(tiny_ckpt):
    model = load(tiny_ckpt).eval()
    probe = AttentionProbe(model, [1])
    with torch.no_grad():
        model(**model_inputs(video_batch(model.config, SAMPLES)))
    assert probe._captured == {}
    with pytest.raises(RuntimeError, match="inside `probe.capture\\(\\)`"):
        probe.rows(torch.zeros(2, 1, dtype=torch.long))


def test_vision_token_positions():
    ids = torch.tensor([[5, 13, 13, 7, 13], [13, 1, 2, 0, 0]])
    assert vision_token_positions(ids, 13).tolist() == [[1, 2, 4], [0, -1, -1]]


def _grounded_batch(model, samples=SAMPLES):
    batch = video_batch(model.config, samples)
    grounding = batch.pop("grounding")
    batch.pop("labels")
    return batch, grounding


def _supervised_grads(ckpt, mode, layers=(1, 3), samples=SAMPLES, config=None):
    """Gradients of the attention loss through the real path: one forward inside `capture(rows)`, then the loss."""
    torch.manual_seed(0)
    model = load(ckpt).train()
    if mode != "none":
        model.activation_checkpointing_enable({"use_reentrant": mode == "reentrant"})
    batch, grounding = _grounded_batch(model, samples)
    config = config or GroundingConfig(layers=list(layers))
    probe = AttentionProbe(model, config.layers)
    with probe.capture(supervised_rows(grounding, config.query_offset)):
        # the real path: its output feeds a loss, so checkpointing is active for the layers
        text_logits = model(**batch).logits
    loss, stats = grounding_loss(probe, grounding, batch["input_ids"], batch["attention_mask"],
                                 vision_token_ids(model.config), config)  # fmt: skip
    assert stats["attn_pairs"] > 0
    (loss + 0 * text_logits.sum()).backward()
    return _qk_grads(model), loss.detach()


def _qk_grads(model):
    """Gradients of the attention parameters that shape q and k, per (layer index, module)."""
    out = {}
    for i, layer in find_decoder_layers(model).items():
        for name in ("q_proj", "k_proj", "q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                out[(i, name)] = getattr(layer.self_attn, name).weight.grad
    return out


class _EagerProbe:
    """Stands in for `AttentionProbe` in `grounding_loss`: vision attention read off eager `output_attentions`."""

    def __init__(self, attentions, layers):
        self.attentions, self.layers = attentions, layers

    def vision_attention(self, query_positions, vision_positions, attention_mask=None, batch_index=None,
                         head_fusion="mean", groups=None):  # fmt: skip
        out = []
        for layer in self.layers:
            a = self.attentions[layer][batch_index]  # [B', H, L, L]
            heads, length = a.shape[1], a.shape[-1]
            rows = a.gather(2, query_positions.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, length))
            index = vision_positions.clamp(min=0)[:, None, None, :].expand(-1, heads, rows.shape[2], -1)
            keep = (query_positions >= 0)[:, None, :, None] & (vision_positions >= 0)[:, None, None, :]
            out.append(fuse_heads(rows.gather(3, index) * keep, groups, head_fusion))
        return torch.stack(out).float()


def _assert_grads_close(ours, reference):
    for key, g in ours.items():
        if reference[key] is None or reference[key].abs().max() == 0:
            assert g is None or g.abs().max() == 0, key
        else:  # float32 noise, amplified by swim_parity's products of small probabilities: relative to the peak
            torch.testing.assert_close(
                g, reference[key], atol=3e-5 * float(reference[key].abs().max()), rtol=0
            )


def _eager_reference(ckpt, config, samples=SAMPLES):
    """The same loss on eager `output_attentions` of the same model and batch, and its gradients."""
    model = load(ckpt, "eager").train()
    batch, grounding = _grounded_batch(model, samples)
    outputs = model(**batch, output_attentions=True)
    attentions = dict(zip(find_decoder_layers(model), outputs.attentions))
    layers = supervised_layers(model, config.layers)
    loss, _ = grounding_loss(_EagerProbe(attentions, layers), grounding, batch["input_ids"],
                             batch["attention_mask"], vision_token_ids(model.config), config)  # fmt: skip
    loss.backward()
    return _qk_grads(model), loss.detach()


def test_attention_loss_gradients_equal_eager_attention_gradients(family_ckpt):
    """The loss and its q/k gradients (projections, and the per-head norms of Qwen3) equal those of the same
    loss on eager `output_attentions`, for every family."""
    config = GroundingConfig(layers=[1, 3])
    ours, loss = _supervised_grads(family_ckpt, "none", config=config)
    reference, reference_loss = _eager_reference(family_ckpt, config)
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5)
    _assert_grads_close(ours, reference)


# Images only (one, then two of different sizes): the columns are image tokens, a group per image.
IMAGES = [
    dict(images=[(4, 4)], videos=[], text=6, queries=[(1, 0)], objects=1),
    dict(images=[(4, 8), (4, 4)], videos=[], text=9, queries=[(2, 0), (5, 0)], objects=1),
]
KLAL = GroundingConfig(layers="all", layer_fusion="per_layer", head_fusion="renorm_mean", target="klal")


@pytest.mark.parametrize("samples", [IMAGES, WITH_IMAGE], ids=["images", "image_and_video"])
def test_klal_loss_on_image_tokens_equals_eager_attention_loss(family_ckpt, samples):
    """KLAL's settings (every layer, heads renormalised, mean of per-layer KLs, three-level target) on image
    tokens: loss and q/k gradients equal those of the same loss on eager `output_attentions`."""
    ours, loss = _supervised_grads(family_ckpt, "none", samples=samples, config=KLAL)
    reference, reference_loss = _eager_reference(family_ckpt, KLAL, samples=samples)
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5)
    _assert_grads_close(ours, reference)


def test_official_formula_gradients_equal_eager_attention_gradients(tiny_ckpt):
    config = GroundingConfig(layers=[1, 3], loss_type="swim_parity", query_offset=-1)
    ours, loss = _supervised_grads(tiny_ckpt, "none", config=config)
    reference, reference_loss = _eager_reference(tiny_ckpt, config)
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5)
    _assert_grads_close(ours, reference)


MIXED = [dict(videos=[(2, 4, 8)], text=4), SAMPLES[0]]  # the first sample has no masks: a subset is captured


@pytest.mark.parametrize("samples", [SAMPLES, MIXED], ids=["all_supervised", "mixed"])
@pytest.mark.parametrize("mode", ["none", "non_reentrant"])
def test_attention_loss_reaches_q_and_k_of_every_supervised_layer(family_ckpt, mode, samples):
    grads, _ = _supervised_grads(family_ckpt, mode, samples=samples)
    qk_norm = family_of(family_ckpt).qk_norm
    for layer in (1, 3):
        for name in ("q_proj", "k_proj") + (("q_norm", "k_norm") if qk_norm else ()):
            g = grads[(layer, name)]
            assert g is not None and g.abs().sum() > 0, f"no gradient at layer {layer} {name} ({mode})"
    reference, _ = _supervised_grads(family_ckpt, "none", samples=samples)
    for key, g in grads.items():
        if reference[key] is None:
            assert g is None
        else:
            torch.testing.assert_close(g, reference[key], atol=1e-6, rtol=1e-4)


def test_reentrant_checkpointing_fails_loudly(tiny_ckpt):
    with pytest.raises(RuntimeError, match="use_reentrant"):
        _supervised_grads(tiny_ckpt, "reentrant")


def test_no_module_with_parameters_runs_after_the_forward(family_ckpt):
    """ZeRO-3 gathers and FSDP reshards weights around a module's own forward: the loss must call no module."""
    model = load(family_ckpt).train()
    batch, grounding = _grounded_batch(model)
    config = GroundingConfig(layers=[1, 3])
    probe = AttentionProbe(model, config.layers)
    with probe.capture(supervised_rows(grounding, 0)):
        model(**batch)
    called = []
    handles = [m.register_forward_pre_hook(lambda m, a, name=name: called.append(name))
               for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]  # fmt: skip
    loss, _ = grounding_loss(probe, grounding, batch["input_ids"], batch["attention_mask"],
                             vision_token_ids(model.config), config)  # fmt: skip
    loss.backward()
    for h in handles:
        h.remove()
    assert called == [] and loss > 0


def test_capture_keeps_only_the_rows_of_samples_with_queries(tiny_ckpt):
    model = load(tiny_ckpt).eval()
    samples = [dict(videos=[(2, 4, 4)], text=5), dict(SAMPLES[0])]  # the first has no masks
    batch, grounding = _grounded_batch(model, samples)
    rows = supervised_rows(grounding, 0)
    probe = AttentionProbe(model, [1])
    with torch.no_grad(), probe.capture(rows):
        model(**batch)
    record = probe._captured[0]
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    last = int(rows.max())
    assert record.query.shape == (1, rows.shape[1], config.num_attention_heads, head_dim)
    assert record.key.shape == (1, last + 1, config.num_key_value_heads, head_dim)
    # the rows of the supervised sample equal eager attention; another row was not kept
    with torch.no_grad():
        ours = probe.rows(rows[1:], batch["attention_mask"][1:], batch_index=torch.tensor([1]))
    reference = eager_rows(tiny_ckpt, batch, [1], rows.clamp(min=0))[:, 1:]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="not captured"):
        probe.rows(rows[1:] - 1, batch_index=torch.tensor([1]))
    with pytest.raises(RuntimeError, match="none were captured"):
        probe.rows(torch.tensor([[3]]), batch_index=torch.tensor([0]))


def test_first_forward_in_a_capture_block_is_kept(tiny_ckpt):
    """TRL's label-smoothing path runs a second, gradient-free forward inside the same block: ignore it."""
    model = load(tiny_ckpt).train()
    batch, grounding = _grounded_batch(model)
    probe = AttentionProbe(model, [1])
    with probe.capture(supervised_rows(grounding, 0)):
        model(**batch)
        with torch.no_grad():
            model(**batch)
    assert probe._captured[0].query.requires_grad


def _flash_attention_2_model(ckpt):
    return (
        stock_model_class(ckpt)
        .from_pretrained(ckpt, attn_implementation="flash_attention_2", dtype=torch.bfloat16)
        .cuda()
    )


def _on_cuda(inputs):
    inputs = {k: v.cuda() for k, v in inputs.items()}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].bfloat16()
    return inputs


@pytest.mark.gpu
@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn not installed")
def test_attention_loss_trains_under_flash_attention_2_bf16(tiny_ckpt):
    """The training path on GPU: FlashAttention-2 main kernel, bf16, non-reentrant checkpointing."""
    model = _flash_attention_2_model(tiny_ckpt)
    model.train().activation_checkpointing_enable({"use_reentrant": False})
    batch, grounding = _grounded_batch(model)
    batch, grounding = _on_cuda(batch), {k: v.cuda() for k, v in grounding.items()}
    config = GroundingConfig(layers=[1, 3])
    probe = AttentionProbe(model, config.layers)
    with probe.capture(supervised_rows(grounding, 0)):
        logits = model(**batch).logits
    loss, _ = grounding_loss(probe, grounding, batch["input_ids"], batch["attention_mask"],
                             vision_token_ids(model.config), config)  # fmt: skip
    (loss + 0 * logits.float().sum()).backward()
    _, reference = _supervised_grads(tiny_ckpt, "none")  # float32, sdpa, CPU
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 0.05 * reference.item()
    grads = _qk_grads(model)
    for layer in (1, 3):
        for name in ("q_proj", "k_proj"):
            assert grads[(layer, name)] is not None and grads[(layer, name)].abs().sum() > 0


def test_supervised_rows_and_pair_count_by_hand(tiny_ckpt):
    model = load(tiny_ckpt)
    batch = video_batch(model.config, SAMPLES + [dict(videos=[(2, 4, 4)], text=5)])
    grounding = batch["grounding"]
    # sample 0: 2 tagged rows x 2 temporal groups; sample 1: 1 row x 4 groups (two videos); sample 2: no masks
    assert supervised_pair_count(grounding, 0) == 2 * 2 + 1 * 4
    assert supervised_pair_count(None, 0) == 0
    rows = supervised_rows(grounding, -1)
    assert torch.equal(rows >= 0, grounding["query_positions"] >= 0)
    assert torch.equal(rows[rows >= 0], grounding["query_positions"][rows >= 0] - 1)
    # a group without a mask is not a pair: drop object 0's mask in sample 0's second group
    grounding["object_group_valid"][0, 0, 1] = False
    assert supervised_pair_count(grounding, 0) == 2 * 2 + 1 * 4 - 1


def test_pair_count_with_image_groups(tiny_ckpt):
    """An image is one group: sample 0 has 1 row x 1 image, sample 1 has 2 rows x 2 images."""
    model = load(tiny_ckpt)
    grounding = video_batch(model.config, IMAGES)["grounding"]
    assert grounding["vision_token_group"][1].tolist() == [0] * 8 + [1] * 4
    assert supervised_pair_count(grounding, 0) == 1 * 1 + 2 * 2
