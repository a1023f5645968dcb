"""One code path for every supported family: the spec, the data layout against the stock processors, tiny
checkpoints, and training -> checkpoint -> grounding eval / overlays / inference on Qwen3-VL."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_checks import assert_stock_checkpoint
from fixtures_data import write_clip
from transformers import AutoProcessor, AutoTokenizer
from transformers.video_utils import VideoMetadata

from swim.data.dataset import SwimDataset
from swim.data.records import Turn, load_records
from swim.data.synth.shapes import SynthConfig, generate
from swim.data.tags import build_text
from swim.data.video import load_video, read_frames, resize_frames
from swim.modeling.families import FAMILIES, family_of, group_timestamps, supported_model_types
from swim.modeling.model import stock_model_class

ROOT = Path(__file__).resolve().parents[1]
TURNS = [Turn("user", "What is the <ins>dog</ins> doing?"), Turn("assistant", "The <ins>dog</ins> runs.")]


def test_family_of_reads_models_configs_paths_and_names(family_ckpt):
    spec = family_of(family_ckpt)
    model = stock_model_class(family_ckpt).from_pretrained(family_ckpt)
    assert family_of(model) is family_of(model.config) is family_of(model.config.model_type) is spec
    assert (
        family_of(spec.name) is spec and type(model).__name__ == spec.stock_classes[model.config.model_type]
    )
    assert supported_model_types() == [
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_vl",
        "qwen3_vl_moe",
    ]
    with pytest.raises(ValueError, match="unsupported model type 'llava'.*qwen2_5_vl"):
        family_of("llava")


def test_family_geometry():
    assert FAMILIES["qwen2_5_vl"].geometry.factor == 28 and FAMILIES["qwen3_vl"].geometry.factor == 32
    assert FAMILIES["qwen3_vl"].geometry.image_mean == (0.5, 0.5, 0.5)
    settings = FAMILIES["qwen3_vl"].video_settings(num_frames=8)
    assert (settings.patch_size, settings.factor, settings.min_pixels) == (16, 32, 128 * 32 * 32)
    assert settings.total_pixels == int(128000 * 32 * 32 * 0.9) and settings.num_frames == 8
    assert FAMILIES["qwen2_5_vl"].video_settings().max_pixels == 768 * 28 * 28


def test_group_timestamps_follow_the_sampled_frames_exactly():
    # uneven spacing (an annotated frame kept): each group's time is the mean of its two frames' source times
    assert group_timestamps([0, 2, 5, 9, 10, 10], source_fps=2.0, groups=3) == (0.5, 3.5, 5.0)
    span = FAMILIES["qwen3_vl"].video_span((2, 4, 6), [0, 3, 6, 9], source_fps=3.0)
    assert span.timestamps == (0.5, 2.5) and span.tokens_per_group == 6 and span.num_tokens == 12
    assert FAMILIES["qwen2_5_vl"].video_span((2, 4, 6)).timestamps is None
    with pytest.raises(ValueError, match="timestamps need the 4 sampled frame indices"):
        FAMILIES["qwen3_vl"].video_span((2, 4, 6), [0, 3], source_fps=3.0)


def test_timestamped_layout_by_hand(tiny_checkpoints):
    """Qwen3-VL: per temporal group '<t seconds>' + its own vision_start .. vision_end; only the pads are video."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints("qwen3_vl"))
    span = FAMILIES["qwen3_vl"].video_span((2, 2, 4), [0, 1, 4, 4], source_fps=2.0)  # 2 tokens per group
    text = build_text(tokenizer, TURNS, media=[span], n_objects=1, system_prompt=None)
    ids = text.input_ids.tolist()
    start, end, pad = (
        tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
    )
    stamps = [tokenizer(f"<{t:.1f} seconds>", add_special_tokens=False)["input_ids"] for t in (0.2, 2.0)]
    block = stamps[0] + [start, pad, pad, end] + stamps[1] + [start, pad, pad, end]
    first = ids.index(stamps[0][0])
    assert ids[first : first + len(block)] == block and ids.count(start) == 2
    assert text.mm_token_type_ids.tolist() == [2 if i == pad else 0 for i in ids]
    # the tags still point at ' dog' after the expansion, and only the answer is labelled
    assert all(tokenizer.decode([ids[p]]).strip() == "dog" for p in text.query_positions)
    labelled = [i for i, lab in zip(ids, text.labels.tolist()) if lab != -100]
    assert tokenizer.decode(labelled) == "The dog runs.<|im_end|>"


def _stock_processor(spec, tokenizer):
    g = spec.geometry
    common = dict(patch_size=g.patch_size, merge_size=g.merge_size, image_mean=list(g.image_mean),
                  image_std=list(g.image_std))  # fmt: skip
    video = getattr(transformers, spec.video_processor_type)(
        **common, temporal_patch_size=g.temporal_patch_size, do_resize=False, do_sample_frames=False
    )
    image = transformers.Qwen2VLImageProcessor(**common)
    processor_class = getattr(transformers, spec.processor_class)
    return processor_class(image_processor=image, tokenizer=tokenizer, video_processor=video,
                           chat_template=tokenizer.chat_template)  # fmt: skip


def test_ids_pixels_and_grid_equal_the_stock_processor(family_ckpt, tmp_path):
    """A real mp4 through our loader and `build_text` vs the family's stock processor on the same frames.

    For Qwen3-VL / Qwen3.5 the processor gets the prompt with a bare `<|video_pad|>`: transformers 5.23's
    `Qwen3VLProcessor` replaces only the pad, so given the template's vision_start/vision_end triplet it nests
    the markers (a processor bug our builder does not copy); with the bare pad its layout is the right one.
    """
    spec = family_of(family_ckpt)
    tokenizer = AutoTokenizer.from_pretrained(family_ckpt)
    path = write_clip(tmp_path / "clip.mp4", n_frames=12, hw=(64, 96))
    settings = spec.video_settings(num_frames=6, max_frames=6, min_pixels=4 * spec.geometry.factor**2,
                                   max_pixels=64 * 96)  # fmt: skip
    clip = load_video(path, settings, keep=[5])  # an annotated frame: uneven spacing
    span = spec.video_span(clip.grid_thw, clip.frame_indices, clip.source_fps)
    ours = build_text(
        tokenizer, TURNS, media=[span], n_objects=1, system_prompt="You are a helpful assistant."
    )
    frames = resize_frames(read_frames(path, clip.frame_indices), clip.resized_hw).to(torch.uint8)
    prompt = ours.text
    kwargs = {}
    if spec.timestamps:
        prompt = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=12, fps=clip.source_fps,
                                                  frames_indices=clip.frame_indices)]  # fmt: skip
    stock = _stock_processor(spec, tokenizer)(
        text=[prompt], videos=[frames.permute(0, 2, 3, 1).numpy()], return_tensors="pt", **kwargs
    )
    assert torch.equal(stock["input_ids"][0], ours.input_ids)
    assert torch.equal(stock["mm_token_type_ids"][0], ours.mm_token_type_ids)
    assert stock["video_grid_thw"].tolist() == [list(clip.grid_thw)]
    torch.testing.assert_close(stock["pixel_values_videos"], clip.pixel_values, atol=1e-5, rtol=0)


def test_tiny_checkpoints_load_with_the_stock_class_and_auto_processor(family_ckpt):
    spec = family_of(family_ckpt)
    config = json.loads((Path(family_ckpt) / "config.json").read_text())
    assert config["architectures"] == [spec.stock_classes[config["model_type"]]]
    processor = AutoProcessor.from_pretrained(family_ckpt)
    assert type(processor).__name__ == spec.processor_class
    assert processor.video_processor.patch_size == spec.geometry.patch_size
    assert list(processor.video_processor.image_mean) == pytest.approx(spec.geometry.image_mean)


def test_dataset_builds_each_family_layout_and_targets(family_ckpt, tmp_path):
    spec = family_of(family_ckpt)
    paths = generate(tmp_path / "data", SynthConfig(), seed=2, counts={"val": 3})
    records, _ = load_records(paths["val"])
    settings = spec.video_settings(num_frames=8, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
    dataset = SwimDataset(records, settings, AutoTokenizer.from_pretrained(family_ckpt), supervise_qa=True,
                          strict=True, family=spec)  # fmt: skip
    sample = dataset[0]
    t, h, w = sample["video_grid_thw"][0].tolist()
    side = 112 // spec.geometry.factor * spec.geometry.factor  # 112 px frames: 4x4 (28 px) or 3x3 tokens
    assert (h * spec.geometry.patch_size, w * spec.geometry.patch_size) == (side, side)
    k = t * h * w // 4
    assert int((sample["mm_token_type_ids"] == 2).sum()) == k == sample["object_targets"].shape[1]
    assert ("second_per_grid_ts" in sample) == spec.second_per_grid_ts
    assert sample["object_group_valid"].all() and (sample["object_targets"].sum(1) > 0).all()
    with pytest.raises(ValueError, match="do not match the .* geometry"):
        other = "qwen2_5_vl" if spec.geometry.factor == 32 else "qwen3_vl"
        SwimDataset(records, FAMILIES[other].video_settings(), dataset.tokenizer, family=spec)


def test_train_eval_vis_and_infer(family_ckpt, tmp_path):
    """The acceptance path for each family: `swim train` with the CPU recipe -> a stock checkpoint ->
    `swim eval grounding`, `swim vis` and `swim infer` on it."""
    from swim.eval.grounding import main as grounding_main
    from swim.eval.infer import run as infer_run
    from swim.train import main as train_main
    from swim.vis.attention import main as vis_main

    ckpt = family_ckpt
    stock = stock_model_class(ckpt)
    data = generate(tmp_path / "data", SynthConfig(), seed=0, counts={"train": 6, "val": 2})
    out = tmp_path / "run"
    trainer = train_main(["--config", str(ROOT / "recipes" / "demo_cpu.yaml"), "--model_name_or_path", str(ckpt),
                          "--data_config", str(data["train"]), "--output_dir", str(out), "--max_steps", "2",
                          "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no",
                          "--warmup_steps", "0", "--attn_layers", "1", "3"])  # fmt: skip
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(e["loss_attn"] > 0 and e["loss_text"] > 0 for e in logs)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [stock.__name__]
    _, info = stock.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_stock_checkpoint(out)

    video_flags = ["--num-frames", "8", "--max-frames", "8", "--min-pixels", "3136", "--max-pixels", "12544"]
    grounding_main(
        ["--model", str(out), "--data", str(data["val"]), "--out", str(tmp_path / "g"), *video_flags]
    )
    fused = json.loads((tmp_path / "g" / "grounding.json").read_text())["metrics"]["fused"]
    assert fused["pairs"] > 0 and 0 <= fused["pointing_game"] <= 1
    written = vis_main(["--model", str(out), "--data", str(data["val"]), "--out", str(tmp_path / "vis"),
                        "--num-frames", "8", "--max-pixels", "12544"])  # fmt: skip
    assert written and all(p.exists() for p in written)
    video = json.loads(Path(data["val"]).read_text())[0]["video"]
    infer_run(["--model", str(out), "--video", str(Path(data["val"]).parent / video), "--question",
               "What does the <ins>square</ins> do?", "--attention", str(tmp_path / "att"),
               "--max-new-tokens", "3", "--dtype", "fp32", "--device", "cpu", *video_flags])  # fmt: skip
    assert list((tmp_path / "att").glob("attention_*.png"))
