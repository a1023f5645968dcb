"""The segmentation head: shapes, gradients, priors, checkpoints; the last-hidden-state probe; the data side."""

import json

import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from swim.data.records import load_records
from swim.data.synth.shapes import SynthConfig, generate
from swim.modeling.families import family_of
from swim.seg.data import SegDataConfig, SegDataset, collate_seg, with_seg_template
from swim.seg.head import SegHead, SegHeadConfig
from swim.seg.probe import LastHiddenProbe
from swim.seg.sam2 import tiny_sam2_config
from swim.testing import video_batch


@pytest.fixture(scope="module")
def sam():
    from transformers import Sam2Model

    torch.manual_seed(0)
    return Sam2Model(tiny_sam2_config(128, 32))


def head_inputs(d=16, frames=3, objects=2):
    torch.manual_seed(1)
    pixel_values = torch.randn(frames, 3, 128, 128)
    hidden = torch.randn(objects, d, requires_grad=True)
    pair_frame = torch.arange(frames).repeat(objects)  # every (frame, object) pair
    pair_query = torch.arange(objects).repeat_interleave(frames)
    return pixel_values, hidden, pair_frame, pair_query


@pytest.mark.parametrize("mba_mode, prior", [(None, "prepass"), ("code", "prepass"), ("fixed", "none"),
                                             ("paper", "swim_attn")])  # fmt: skip
def test_head_forward_shapes_and_gradients(sam, mba_mode, prior):
    head = SegHead(SegHeadConfig(llm_hidden=16, mba_mode=mba_mode, mba_prior=prior, mba_heads=4), sam)
    head.freeze_encoder()
    pixel_values, hidden, pair_frame, pair_query = head_inputs()
    expr = torch.randn(2, 5, 16)
    out = head(pixel_values, hidden, pair_frame, pair_query, expr_hidden=expr, expr_mask=torch.ones(2, 5, dtype=bool),
               prior=torch.rand(6, 8, 8), pool_weights=torch.rand(6, 8, 8), mba_scale=1.0)  # fmt: skip
    assert out.logits.shape == (6, 32, 32) and out.prompts.shape == (2, 32) and out.pooled.shape == (6, 32)
    assert (out.gate is None) == (mba_mode is None)
    if out.gate is not None:
        assert out.gate.shape == (6, 8, 8) and out.gate.min() >= 0 and out.gate.max() <= 1
    out.logits.sum().backward()
    assert (
        hidden.grad is not None and hidden.grad.abs().sum() > 0
    )  # the prompt reaches the LLM's hidden state
    trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert all(p.grad is None for n, p in head.named_parameters() if n.startswith("sam.vision_encoder"))
    assert head.sam.mask_decoder.conv_s0.weight.grad is not None  # trained with the decoder (Sa2VA)


def test_swim_attn_prior_is_required(sam):
    head = SegHead(SegHeadConfig(llm_hidden=16, mba_mode="fixed", mba_prior="swim_attn", mba_heads=4), sam)
    with pytest.raises(ValueError, match="swim_attn"):
        head(*head_inputs(), expr_hidden=torch.randn(2, 1, 16), expr_mask=torch.ones(2, 1, dtype=bool))


def test_prepass_prior_ignores_the_prompt(sam):
    """The paper's prior is class-agnostic: the same gate for two different objects on one frame."""
    head = SegHead(SegHeadConfig(llm_hidden=16, mba_mode="code", mba_heads=4), sam).eval()
    out = head(*head_inputs(frames=1))
    torch.testing.assert_close(out.gate[0], out.gate[1])


def test_head_saves_beside_and_reloads(sam, tmp_path):
    head = SegHead(SegHeadConfig(llm_hidden=16, mba_mode="fixed", mba_heads=4), sam).eval()
    torch.nn.init.constant_(head.mba.gamma, 0.3)
    head.save_pretrained(tmp_path / "seg_head")
    assert json.loads((tmp_path / "seg_head" / "seg_head.json").read_text())["mba_mode"] == "fixed"
    assert (tmp_path / "seg_head" / "sam2" / "config.json").exists()  # a stock Sam2Model folder
    again = SegHead.from_pretrained(tmp_path / "seg_head").eval()
    inputs = head_inputs()
    kw = dict(expr_hidden=torch.randn(2, 3, 16), expr_mask=torch.ones(2, 3, dtype=bool))
    torch.testing.assert_close(again(*inputs, **kw).logits, head(*inputs, **kw).logits, rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [None, False, True])
def test_last_hidden_probe_equals_the_last_hidden_state(tiny_ckpt, checkpointing):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt)
    if checkpointing is not None:
        model.activation_checkpointing_enable({"use_reentrant": checkpointing})
        model.train()
    batch = video_batch(model.config, [dict(videos=[(2, 4, 4)], text=6), dict(videos=[(2, 4, 4)], text=3)])
    batch.pop("grounding")
    probe = LastHiddenProbe(model)
    with probe.capture():
        out = model.model(**{k: v for k, v in batch.items() if k != "labels"})
    rows = probe.rows(torch.tensor([0, 1]), torch.tensor([[3, 9], [2, 5]]))
    expected = out.last_hidden_state[torch.tensor([[0, 0], [1, 1]]), torch.tensor([[3, 9], [2, 5]])]
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    rows.sum().backward()  # the kept tensor carries its gradient, under any checkpointing
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None
    probe.clear()
    with pytest.raises(RuntimeError, match="capture"):
        probe.rows(torch.tensor([0]), torch.tensor([0]))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_synth")
    return generate(out, SynthConfig(qa_fraction=0.0), seed=0, counts={"train": 3, "val": 0})["train"]


def seg_dataset(tiny_ckpt, synth, **seg):
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    family = family_of("qwen2_5_vl")
    settings = family.video_settings(num_frames=8, max_frames=8, min_pixels=3136, max_pixels=12544)
    records, _ = load_records(synth)
    config = SegDataConfig(image_size=128, mask_size=32, **seg)
    token = None
    if config.query == "seg_token":
        tokenizer.add_tokens([config.seg_token], special_tokens=True)
        token = tokenizer.convert_tokens_to_ids(config.seg_token)
    return SegDataset(records, settings, tokenizer, seg=config, seg_token_id=token, strict=True,
                      system_prompt=None, family=family), records  # fmt: skip


def test_seg_dataset_targets_match_the_record(tiny_ckpt, synth):
    from swim.data.masks import decode_segmentation, pool_mask

    dataset, records = seg_dataset(tiny_ckpt, synth)
    sample = dataset[0]
    assert sample["seg_pixel_values"].shape == (8, 3, 128, 128)  # 8 distinct sampled frames of 8
    assert sample["seg_frame_group"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sample["seg_masks"].shape == (1, 8, 32, 32) and sample["seg_valid"].all()
    # the query is the tagged word's (last) token, and the expression ends with it
    query = int(sample["seg_query"][0])
    assert query == int(sample["query_positions"].max()) and int(sample["seg_expr"][0].max()) == query
    assert (
        sample["seg_expr"][0][sample["seg_expr"][0] >= 0] > (sample["mm_token_type_ids"] == 2).nonzero().max()
    ).all()
    raw = json.loads(synth.read_text())[0]
    mask = decode_segmentation(raw["annotation"][0]["3"]["segmentation"])
    torch.testing.assert_close(sample["seg_masks"][0, 3], torch.from_numpy(pool_mask(mask, (32, 32), 1)))
    # a batch mixing a sample with targets and one without
    bare = {k: v for k, v in dataset[1].items() if not k.startswith("seg_")}
    batch = collate_seg([bare, sample])
    assert batch["frame_index"][0].eq(-1).all() and batch["frame_index"][1].tolist() == list(range(8))
    assert batch["query"].tolist() == [[-1], [query]] and collate_seg([bare]) is None


def test_seg_token_mode_appends_a_sa2va_turn(tiny_ckpt, synth):
    dataset, records = seg_dataset(tiny_ckpt, synth, query="seg_token")
    shape = json.loads(synth.read_text())[0]["scene"][0]["shape"]
    turns = with_seg_template(records[0], "[SEG]").turns()
    assert [t.text for t in turns[-2:]] == [f"Please segment the {shape}.", "Sure, [SEG]."]
    assert with_seg_template(with_seg_template(records[0], "[SEG]"), "[SEG]").turns() == turns  # once only
    sample = dataset[0]
    token = dataset.seg_token_id
    assert int(sample["seg_query"][0]) == int((sample["input_ids"] == token).nonzero().max())
    assert sample["labels"][sample["seg_query"][0]] == token  # the [SEG] token is a training target
