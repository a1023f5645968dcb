"""The real `SFTTrainer.train()` path trains the grounding loss; checkpoints stay plain Qwen2.5-VL."""

import json

import pytest
import torch
import torch._dynamo
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from swim.modeling.capture import find_decoder_layers
from swim.modeling.model import SwimQwen2_5_VLForConditionalGeneration, stock_model_class, swim_model_class
from swim.modeling.objective import GroundingConfig
from swim.testing import video_batch
from swim.trainer import SwimSFTConfig, SwimSFTTrainer

SPECS = [
    dict(videos=[(2, 4, 4)], text=6, queries=[(1, 0), (4, 1)], objects=2),
    dict(videos=[(2, 4, 8)], text=8, queries=[(2, 0)], objects=1),
    dict(videos=[(2, 4, 4)], text=5),  # no masks: text loss only
    dict(videos=[(2, 4, 4)], text=7, queries=[(3, 0)], objects=1),
]


def train(ckpt, out_dir, attn_weight, checkpointing=None, steps=1, model_cls=None, **overrides):
    model = (model_cls or stock_model_class(ckpt)).from_pretrained(ckpt)
    args = SwimSFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        attn_layers=[1, 3],
        attn_weight=attn_weight,
        activation_checkpointing=checkpointing is not None,
        activation_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"},
        **overrides,
    )
    trainer = SwimSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"index": list(range(len(SPECS)))}),
        data_collator=lambda rows: video_batch(model.config, [SPECS[r["index"]] for r in rows]),
        processing_class=AutoTokenizer.from_pretrained(ckpt),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return trainer, before


def test_reentrant_checkpointing_is_rejected_when_the_config_is_parsed(tmp_path):
    with pytest.raises(ValueError, match="use_reentrant.*false"):
        SwimSFTConfig(output_dir=str(tmp_path), use_cpu=True, activation_checkpointing=True,
                      activation_checkpointing_kwargs={"use_reentrant": True})  # fmt: skip
    with pytest.raises(ValueError, match="torch's default"):
        SwimSFTConfig(output_dir=str(tmp_path), use_cpu=True, activation_checkpointing_kwargs={})
    # a text-only baseline has no attention gradient to lose
    SwimSFTConfig(output_dir=str(tmp_path), use_cpu=True, attn_weight=0.0,
                  activation_checkpointing_kwargs={"use_reentrant": True})  # fmt: skip


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant"])
def test_attention_loss_changes_the_supervised_layers_in_sft_trainer_train(
    family_ckpt, tmp_path, checkpointing
):
    with_attn, before = train(family_ckpt, tmp_path / "a", attn_weight=1.0, checkpointing=checkpointing)
    text_only, _ = train(family_ckpt, tmp_path / "b", attn_weight=0.0, checkpointing=checkpointing)
    logs_a, logs_b = with_attn.state.log_history[0], text_only.state.log_history[0]
    assert logs_a["loss_text"] == pytest.approx(logs_b["loss_text"], rel=1e-6)  # same data, same start
    assert logs_a["loss_attn"] > 0 and logs_b["loss_attn"] == pytest.approx(logs_a["loss_attn"], rel=1e-6)
    assert logs_a["loss"] > logs_b["loss"]
    layers_a = find_decoder_layers(with_attn.model)
    layers_b = find_decoder_layers(text_only.model)
    for i in (1, 3):
        for name in ("q_proj", "k_proj"):
            wa = getattr(layers_a[i].self_attn, name).weight
            wb = getattr(layers_b[i].self_attn, name).weight
            assert not torch.equal(wa, wb), f"attention loss did not change layer {i} {name}"
    # the vision tower and merger are frozen by default
    for name, p in with_attn.model.named_parameters():
        if ".visual." in f".{name}":
            assert not p.requires_grad and torch.equal(p, before[name])


def test_torch_compile_with_activation_checkpointing_trains_as_eager(tiny_ckpt, tmp_path):
    """`torch_compile` with the recipes' non-reentrant checkpointing: the hooks in the checkpointed layers used to
    be skipped by the compiled code ("no captured q/k" on the first supervised step)."""
    torch._dynamo.reset()
    try:
        eager, _ = train(
            tiny_ckpt, tmp_path / "eager", attn_weight=1.0, checkpointing="non_reentrant", steps=1
        )
        compiled, _ = train(
            tiny_ckpt,
            tmp_path / "compiled",
            attn_weight=1.0,
            checkpointing="non_reentrant",
            steps=1,
            torch_compile=True,
            torch_compile_backend="aot_eager",
        )
        assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    finally:
        torch._dynamo.reset()
    for logs_e, logs_c in zip(eager.state.log_history[:1], compiled.state.log_history[:1], strict=True):
        for key in ("loss", "loss_text", "loss_attn"):
            assert logs_c[key] == pytest.approx(logs_e[key], rel=1e-5), key
    for (name, pe), pc in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(pc, pe, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_is_a_plain_checkpoint_of_the_stock_class(family_ckpt, tmp_path):
    stock = stock_model_class(family_ckpt)
    trainer, _ = train(
        family_ckpt, tmp_path / "run", attn_weight=1.0, model_cls=swim_model_class(family_ckpt)
    )
    assert type(trainer.model).__name__ == f"Swim{stock.__name__}"
    trainer.save_model(str(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == [stock.__name__]
    model, info = stock.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), p.detach(), rtol=0, atol=0)


def test_model_forward_returns_both_losses(tiny_ckpt):
    model, info = SwimQwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.configure_grounding(GroundingConfig(layers=[1, 3], attn_weight=0.5, text_weight=0.05))
    batch = video_batch(model.config, SPECS[:2])
    out = model(**batch)
    assert out.loss_attn > 0
    torch.testing.assert_close(out.loss, 0.05 * out.loss_text + 0.5 * out.loss_attn)
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)
    batch.pop("grounding")
    torch.testing.assert_close(out.loss_text, plain(**batch).loss)
    no_grounding = model(**batch)
    assert no_grounding.loss_attn is None and torch.equal(no_grounding.loss, no_grounding.loss_text)


def test_evaluate_logs_both_losses(tiny_ckpt, tmp_path):
    trainer, _ = train(tiny_ckpt, tmp_path / "run", attn_weight=1.0)
    metrics = trainer.evaluate(Dataset.from_dict({"index": [0, 1]}))
    assert metrics["eval_loss"] > 0 and metrics["eval_loss_attn"] > 0 and metrics["eval_loss_text"] > 0
