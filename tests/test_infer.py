"""`swim infer` and the shared generation code: prompt and model inputs, left-padded batching, flags."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_eval import CPU_FLAGS, talkative_checkpoint

from swim.data.tags import SWIM_SYSTEM_PROMPT
from swim.data.video import VideoSettings, load_video, write_video
from swim.eval import generate as G
from swim.eval import infer

SETTINGS = VideoSettings(
    num_frames=4, max_frames=4, min_pixels=28 * 28, max_pixels=84 * 84, total_pixels=10**7
)
FLAGS = ["--num-frames", "4", "--max-frames", "4", "--min-pixels", "784", "--max-pixels", str(84 * 84),
         "--total-pixels", str(10**7), *CPU_FLAGS]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tiny_ckpt, tmp_path_factory):
    return talkative_checkpoint(tiny_ckpt, tmp_path_factory.getbasetemp() / "tiny-talkative")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return G.load_model(model_dir, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Three clips of different sizes and lengths, so a batch has different prompt lengths (real padding)."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (n, h, w) in enumerate([(8, 56, 84), (6, 84, 84), (8, 56, 56)]):
        paths.append(root / f"v{i}.mp4")
        write_video(paths[-1], rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8), fps=4.0, codec="mpeg4")
    return paths


def test_prompt_and_model_inputs(loaded, videos):
    tok = loaded.tokenizer
    text = G.render_prompt(tok, "What does the red circle do?")
    assert text.startswith(
        f"<|im_start|>system\n{SWIM_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    )
    assert text.endswith("<|vision_end|>What does the red circle do?<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful assistant." in G.render_prompt(tok, "Q?", system_prompt=None)

    clip = load_video(videos[0], SETTINGS)
    enc = G.encode_prompt(tok, text, clip)
    t, h, w = clip.grid_thw
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    is_video = enc.input_ids == video_id
    assert int(is_video.sum()) == t * h * w // 4
    assert torch.equal(enc.mm_token_type_ids, is_video.long() * 2)
    pos = is_video.nonzero().flatten()
    assert torch.equal(pos, torch.arange(pos[0], pos[-1] + 1))  # one contiguous run
    assert enc.input_ids[pos[0] - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert enc.input_ids[pos[-1] + 1] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert enc.second_per_grid_ts == pytest.approx(clip.second_per_grid_ts)


def test_collate_pads_on_the_left(loaded, videos):
    tok = loaded.tokenizer
    encs = [G.encode_prompt(tok, G.render_prompt(tok, q), load_video(v, SETTINGS)) for q, v in
            zip(["Short?", "A much longer question about the moving blue square?"], videos[:2])]  # fmt: skip
    batch = G.collate_left(encs, tok.pad_token_id)
    lengths = [e.input_ids.numel() for e in encs]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, e in enumerate(encs):
        pad = max(lengths) - e.input_ids.numel()
        assert batch["attention_mask"][row, :pad].sum() == 0 and batch["attention_mask"][row, pad:].all()
        assert torch.equal(batch["input_ids"][row, pad:], e.input_ids)
        assert torch.equal(batch["mm_token_type_ids"][row, pad:], e.mm_token_type_ids)
    assert batch["video_grid_thw"].tolist() == [list(e.video_grid_thw) for e in encs]
    assert batch["pixel_values_videos"].shape[0] == sum(int(np.prod(e.video_grid_thw)) for e in encs)


def test_batched_generation_matches_one_at_a_time(loaded, videos):
    items = [G.GenItem(str(i), v, f"What happens to the {c} circle?") for i, (v, c) in
             enumerate(zip(videos, ["red", "blue", "green"]))]  # fmt: skip
    items.append(G.GenItem("bad", videos[0].with_name("missing.mp4"), "?"))
    answers = {}
    for batch_size in (1, 3):
        outs: list[G.GenOutput] = []
        settings = G.GenerationSettings(
            max_new_tokens=8, batch_size=batch_size, decode_workers=batch_size - 1
        )
        n_errors = G.Generator(loaded, SETTINGS, settings).run(items, outs.append)
        assert n_errors == 1 and [o.key for o in outs] == ["0", "1", "2", "bad"]
        assert not outs[-1].ok and "VideoDecodeError" in outs[-1].error
        answers[batch_size] = [o.text for o in outs[:3]]
    assert answers[1] == answers[3]
    assert len(set(answers[1])) == 3  # the answers depend on the input (not a constant)


def test_a_failing_batch_is_retried_item_by_item(loaded, videos, monkeypatch):
    real = G.generate_batch

    def flaky(model, tokenizer, batch, config):
        if batch["input_ids"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, tokenizer, batch, config)

    monkeypatch.setattr(G, "generate_batch", flaky)
    outs: list[G.GenOutput] = []
    items = [G.GenItem(str(i), v, "What moves?") for i, v in enumerate(videos)]
    gen = G.Generator(
        loaded, SETTINGS, G.GenerationSettings(max_new_tokens=4, batch_size=3, decode_workers=0)
    )
    assert gen.run(items, outs.append) == 0
    assert [o.key for o in outs] == ["0", "1", "2"] and all(o.ok for o in outs)


def test_infer_cli_prints_the_answer(model_dir, videos, capsys):
    result = infer.run(["--model", str(model_dir), "--video", str(videos[1]), "--question",
                        "Where does the <ins>square</ins> go?", "--max-new-tokens", "5", *FLAGS])  # fmt: skip
    assert capsys.readouterr().out == result.answer + "\n"
    assert result.question == "Where does the square go?"
    assert 0 < len(result.answer_ids) <= 5
    assert result.inputs["input_ids"].shape[0] == 1 and "mm_token_type_ids" in result.inputs


def test_infer_rejects_a_missing_video(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        infer.run(
            ["--model", str(model_dir), "--video", str(tmp_path / "nope.mp4"), "--question", "?", *FLAGS]
        )


def test_load_model_names_a_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        G.load_model(tmp_path)


def test_dtype_and_attention_flags(monkeypatch, caplog):
    import transformers.utils

    assert G.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert G.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert G.resolve_attn_implementation("flash_attention_2", torch.bfloat16) == "sdpa"
    assert "falling back to sdpa" in caplog.text
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert G.resolve_attn_implementation("flash_attention_2", torch.bfloat16) == "flash_attention_2"
    with pytest.raises(ValueError, match="bf16 or fp16"):
        G.resolve_attn_implementation("flash_attention_2", torch.float32)
    with pytest.raises(ValueError, match="must be one of"):
        G.resolve_attn_implementation("flex", torch.float32)


def test_greedy_config_drops_sampling_and_keeps_repetition_penalty(loaded):
    loaded.model.generation_config.update(do_sample=True, temperature=0.1, top_k=1, repetition_penalty=1.05)
    try:
        cfg = G.greedy_generation_config(loaded.model, loaded.tokenizer, 7, None)
        assert not cfg.do_sample and cfg.temperature is None and cfg.max_new_tokens == 7
        assert cfg.repetition_penalty == 1.05
        assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in cfg.eos_token_id
        assert G.greedy_generation_config(loaded.model, loaded.tokenizer, 7, 1.0).repetition_penalty == 1.0
    finally:
        loaded.model.generation_config.update(
            do_sample=False, temperature=None, top_k=None, repetition_penalty=1.0
        )


@pytest.mark.gpu
def test_bf16_batched_generation_on_gpu(model_dir, videos):
    loaded = G.load_model(model_dir, dtype="auto", device="cuda")
    assert loaded.dtype == torch.bfloat16
    outs: list[G.GenOutput] = []
    items = [G.GenItem(str(i), v, "What moves?") for i, v in enumerate(videos)]
    G.Generator(loaded, SETTINGS, G.GenerationSettings(max_new_tokens=4, batch_size=3)).run(
        items, outs.append
    )
    assert all(o.ok for o in outs)
