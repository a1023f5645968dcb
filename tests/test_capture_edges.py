"""The capture's edge cases: torch.compile (with and without activation checkpointing), an enclosing bf16 autocast,
the storage the kept keys hold, repeated layer indices, and adapters applied after the probe was built."""

import pytest
import torch
import torch._dynamo

from swim.modeling.capture import (
    AttentionProbe,
    attention_from_qk,
    supervised_layers,
    vision_token_ids,
    vision_token_positions,
)
from swim.modeling.model import SwimQwen2_5_VLForConditionalGeneration, stock_model_class
from swim.modeling.objective import GroundingConfig, grounding_loss, supervised_rows
from swim.testing import PADDED_SAMPLES, video_batch
from swim.trainer import SwimSFTConfig

SAMPLES = PADDED_SAMPLES  # right-padded, unequal lengths, the second sample with two videos
LAYERS = [1, 3]
CONFIG = GroundingConfig(layers=LAYERS)


def load(ckpt):
    return stock_model_class(ckpt).from_pretrained(ckpt, attn_implementation="sdpa")


def grounded_batch(model, samples=SAMPLES):
    batch = video_batch(model.config, samples)
    grounding = batch.pop("grounding")
    return batch, grounding


def attention_loss(probe, model, batch, grounding, config=CONFIG):
    loss, _ = grounding_loss(probe, grounding, batch["input_ids"], batch["attention_mask"],
                             vision_token_ids(model.config), config)  # fmt: skip
    return loss


# ---- torch.compile


@pytest.fixture
def fresh_dynamo():
    """Each compile test starts from, and leaves, an empty Dynamo cache (code is cached per code object, so compiled
    decoder layers of earlier tests would otherwise be reused)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_step(ckpt, checkpointing, compiled):
    """One training forward/backward (text + attention loss) as the trainer runs it: `use_cache=False`."""
    torch.manual_seed(0)
    model = load(ckpt).train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    batch, grounding = grounded_batch(model)
    probe = AttentionProbe(model, LAYERS)  # before the first compiled forward, as SwimSFTTrainer does
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    with probe.capture(supervised_rows(grounding, 0)):
        out = forward(**batch, use_cache=False)
    loss_attn = attention_loss(probe, model, batch, grounding)
    (out.loss + loss_attn).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), loss_attn.detach(), grads


def test_compiled_model_gives_the_eager_losses_and_gradients(tiny_ckpt, fresh_dynamo):
    """Dynamo compiled decoder layer 0 (no hooks) and reused that code for the supervised layers, whose hooks then
    never ran ("no captured q/k"); with checkpointing always, without it whenever `use_cache=False`. Without
    checkpointing here; with it through the trainer in tests/test_trainer.py (one compile test each: they cost)."""
    eager_text, eager_attn, eager_grads = _train_step(tiny_ckpt, checkpointing=False, compiled=False)
    text, attn, grads = _train_step(tiny_ckpt, checkpointing=False, compiled=True)
    torch.testing.assert_close(text, eager_text, rtol=1e-6, atol=0)
    torch.testing.assert_close(attn, eager_attn, rtol=1e-6, atol=0)
    assert grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-6 * float(g.abs().max()) + 1e-12, msg=name)


def test_code_compiled_before_the_probe_is_named_in_the_error(tiny_ckpt, fresh_dynamo):
    """A model compiled and run before the probe existed: Dynamo's cached code has no hook guard, so the hooks do
    not run; the error names torch.compile and the way out, which works."""
    model = load(tiny_ckpt).eval()
    inputs = {
        "input_ids": torch.randint(0, 100, (1, 12)),
        "attention_mask": torch.ones(1, 12, dtype=torch.long),
    }
    compiled = torch.compile(model, backend="aot_eager")
    rows = torch.tensor([[5, 11]])
    # a fresh process's default (an earlier probe of this process turned it off)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True), torch.no_grad():
        compiled(**inputs, use_cache=False)
        probe = AttentionProbe(model, LAYERS)
        with probe.capture(rows):
            compiled(**inputs, use_cache=False)
        with pytest.raises(RuntimeError, match=r"layers \[1, 3\].*compiled.*torch._dynamo.reset\(\)"):
            probe.rows(rows)
        torch._dynamo.reset()
        with probe.capture(rows):
            compiled(**inputs, use_cache=False)
        reference = AttentionProbe(model, LAYERS)
        with reference.capture(rows):
            model(**inputs, use_cache=False)
        torch.testing.assert_close(probe.rows(rows), reference.rows(rows), rtol=0, atol=1e-6)


# ---- autocast


def test_attention_rows_are_float32_under_bf16_autocast():
    """Under `torch.autocast("cpu", bfloat16)` (the model-class forward under accelerate's bf16) the score matmul
    ran in bf16: up to 15% off on probabilities above 1e-3 at this size."""
    torch.manual_seed(0)
    b, n, heads, kv_heads, d, length = 1, 4, 4, 2, 64, 2000
    query = torch.randn(b, n, heads, d) * 5  # logits q·k/sqrt(d) of std 5
    key = torch.randn(b, length, kv_heads, d)
    angles = torch.rand(b, length, d // 2) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    positions = torch.tensor([[10, 500, 1500, length - 1]])
    mask = torch.ones(b, length, dtype=torch.bool)
    scaling = d**-0.5
    reference = attention_from_qk(query, key, cos, sin, positions, mask, scaling)
    assert reference.max(-1).values.min() > 1e-3  # peaked rows: bf16 errors would show
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = attention_from_qk(query, key, cos, sin, positions, mask, scaling)
        from_bf16_inputs = attention_from_qk(
            query.bfloat16(), key.bfloat16(), cos, sin, positions, mask, scaling
        )
    assert rows.dtype == torch.float32 and from_bf16_inputs.dtype == torch.float32
    torch.testing.assert_close(rows, reference, rtol=1e-5, atol=1e-7)
    # bf16 states (what q_proj returns under autocast) are computed in float32 from their bf16 values
    expected = attention_from_qk(
        query.bfloat16().float(), key.bfloat16().float(), cos, sin, positions, mask, scaling
    )
    torch.testing.assert_close(from_bf16_inputs, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head_fusion", ["mean", "renorm_mean"])
def test_probe_vision_attention_is_float32_under_bf16_autocast(tiny_ckpt, head_fusion):
    model = load(tiny_ckpt).eval()
    batch, grounding = grounded_batch(model)
    rows = supervised_rows(grounding, 0)
    vision = vision_token_positions(batch["input_ids"], vision_token_ids(model.config))
    groups = grounding["vision_token_group"][:, : vision.shape[1]]
    probe = AttentionProbe(model, LAYERS)
    with torch.no_grad(), probe.capture(rows):
        model(**batch)
    with torch.no_grad():
        reference = probe.vision_attention(
            rows, vision, batch["attention_mask"], head_fusion=head_fusion, groups=groups
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = probe.vision_attention(
                rows, vision, batch["attention_mask"], head_fusion=head_fusion, groups=groups
            )
            all_rows = probe.rows(rows, batch["attention_mask"])
    assert ours.dtype == all_rows.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)


# ---- storage of the kept keys


@pytest.mark.parametrize("samples", [SAMPLES[:1], SAMPLES], ids=["batch_1", "batch_2"])
def test_kept_keys_own_storage_up_to_the_last_supervised_row(tiny_ckpt, samples):
    """Every sample captured: the key slice was a view holding the whole L-long key tensor alive."""
    model = load(tiny_ckpt).eval()
    batch, grounding = grounded_batch(model, samples)
    rows = supervised_rows(grounding, 0)
    length, key_length = batch["input_ids"].shape[1], int(rows.max()) + 1
    assert key_length < length
    probe = AttentionProbe(model, LAYERS)
    with torch.no_grad(), probe.capture(rows):
        model(**batch)
    for record in probe._captured.values():
        assert record.key.shape[:2] == (len(samples), key_length)
        assert record.key.untyped_storage().nbytes() == record.key.numel() * record.key.element_size()
    # the rotary tables stay views of the one pair every layer receives: no copy per layer
    first, second = probe._captured[0], probe._captured[1]
    assert first.cos.untyped_storage().data_ptr() == second.cos.untyped_storage().data_ptr()


def test_kept_keys_keep_the_gradient_path(tiny_ckpt):
    model = load(tiny_ckpt).train()
    batch, grounding = grounded_batch(model, SAMPLES[:1])
    probe = AttentionProbe(model, LAYERS)
    with probe.capture(supervised_rows(grounding, 0)):
        model(**batch)
    attention_loss(probe, model, batch, grounding).backward()
    for layer in LAYERS:
        grad = model.model.language_model.layers[layer].self_attn.k_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0


# ---- repeated layers


def test_repeated_layers_are_refused(tiny_ckpt, tmp_path):
    model = load(tiny_ckpt)
    with pytest.raises(ValueError, match=r"list \[1\] more than once"):
        supervised_layers(model, [1, 3, 1])
    with pytest.raises(ValueError, match=r"list \[1\] more than once"):
        AttentionProbe(model, [1, 1])
    for given in ([2, 7, 2], ["2", "7", "2"]):  # a recipe, the command line
        with pytest.raises(ValueError, match=r"attn_layers .* \[2\] more than once"):
            SwimSFTConfig(output_dir=str(tmp_path), use_cpu=True, attn_layers=given)


# ---- adapters applied after the probe was built


def _random_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a non-zero delta, large enough to move the attention rows
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model


def test_probe_built_before_peft_follows_the_adapters(tiny_ckpt):
    """A probe built before `get_peft_model` hooked `q_proj.base_layer`: its rows missed the LoRA delta."""
    model = load(tiny_ckpt).train()
    batch, grounding = grounded_batch(model)
    rows = supervised_rows(grounding, 0)
    before = AttentionProbe(model, LAYERS)
    peft_model = _random_lora(model)
    after = AttentionProbe(peft_model, LAYERS)
    with before.capture(rows), after.capture(rows):
        peft_model(**batch)
    with torch.no_grad():
        reference = after.rows(rows, batch["attention_mask"])
        ours = before.rows(rows, batch["attention_mask"])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    hooked = [name for name, m in peft_model.named_modules() if m._forward_hooks]
    assert not any(name.endswith("base_layer") for name in hooked)
    # the attention loss trains the adapters
    attention_loss(before, model, batch, grounding).backward()
    lora_grads = [
        p.grad for name, p in peft_model.named_parameters() if "lora_" in name and ".layers.1." in name
    ]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_swim_model_probe_follows_adapters_applied_after_a_grounded_forward(tiny_ckpt):
    model = SwimQwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)
    model.configure_grounding(GroundingConfig(layers=LAYERS))
    batch = video_batch(model.config, SAMPLES)
    with torch.no_grad():
        plain = model(**batch).loss_attn  # builds the lazy probe on the plain q_proj
        peft_model = _random_lora(model)
        adapted = peft_model(**batch).loss_attn
        model.configure_grounding(GroundingConfig(layers=LAYERS))  # a probe built after the adapters
        reference = peft_model(**batch).loss_attn
    assert abs(float(plain - reference)) > 1e-3  # the adapters do move the attention
    torch.testing.assert_close(adapted, reference, rtol=1e-6, atol=0)
