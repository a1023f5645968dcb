"""Attention overlays and the demo pipeline end to end (a few steps: the figures are checked, not the numbers)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from swim.data.dataset import SwimDataset
from swim.data.records import load_records
from swim.data.synth.shapes import SynthConfig, generate
from swim.data.video import VideoSettings
from swim.demos.cli import main as demo_main
from swim.vis.attention import draw_grid, record_maps, save_gif

ROOT = Path(__file__).resolve().parents[1]


def test_record_maps_and_overlays(tiny_ckpt, tmp_path):
    paths = generate(tmp_path / "data", SynthConfig(), seed=1, counts={"val": 2})
    records, _ = load_records(paths["val"])
    settings = VideoSettings(num_frames=8, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
    dataset = SwimDataset(
        records, settings, AutoTokenizer.from_pretrained(tiny_ckpt), supervise_qa=True, strict=True
    )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    maps = record_maps(model, dataset, 0, layers=[1, 3])
    assert maps.frames.shape == (4, 112, 112, 3) and maps.frames.dtype == np.uint8
    assert set(maps.maps) == {"layer 1", "layer 3", "fused"}
    for m in maps.maps.values():
        assert m.shape == (4, 4, 4)
        np.testing.assert_allclose(m.sum((1, 2)), 1.0, atol=1e-5)
    assert maps.valid.all() and (maps.target > 0).any()
    png = draw_grid({"layer 1": (maps, "layer 1"), "fused": maps}, tmp_path / "grid.png", title="t")
    assert Image.open(png).size[0] > 300
    gif = save_gif(maps, tmp_path / "a.gif")
    assert Image.open(gif).n_frames == 4


def test_demo_over_seeds_writes_reports_with_both_splits(tmp_path, monkeypatch):
    """Two seeds of the whole demo at toy size: per-seed reports (both held-out splits) and the seeds summary."""
    monkeypatch.chdir(ROOT)
    summary = demo_main(["--config", "recipes/demo.yaml", "--out", str(tmp_path / "demo"), "--max-steps", "2",
                         "--num-train", "8", "--num-val", "6", "--num-shifted-val", "3", "--seeds", "0", "1",
                         "--cache-dir", str(tmp_path / "cache"), "--base-num-videos", "6", "--base-max-steps", "2"])  # fmt: skip
    out = tmp_path / "demo"
    gapped = 0  # splits with distractor-dependent shade answers, where the paired gap is a number
    for seed in (0, 1):
        saved = json.loads((out / f"seed_{seed}" / "report.json").read_text())
        assert saved["seed"] == seed and set(saved["splits"]) == {"val", "val_shifted"}
        for split in saved["splits"].values():
            for run in (
                "base",
                "baseline",
                "swim",
            ):  # the pretrained base's zero-shot figures beside the arms
                assert {"pointing_game", "mask_mass", "text_loss", "answers"} <= set(split[run])
                assert 0 <= split[run]["pointing_game"] <= 1
                answers = split[run]["answers"]
                assert answers["chance"] == 0.5 and 0 <= answers["accuracy"] <= 1
                assert 0 < answers["records"] <= 6
            assert 0 < split["chance"] < 1 and 0 < split["chance_colour_only"] <= 1
            gap, answers = split["answers_gap"], (split["swim"]["answers"], split["baseline"]["answers"])
            assert gap["n"] == answers[0]["dependent_records"] == len(answers[1]["dependent_correct"])
            difference = answers[0]["dependent_accuracy"] - answers[1]["dependent_accuracy"]
            assert gap["gap"] == pytest.approx(difference, nan_ok=True)  # nan for both when no record depends
            gapped += gap["n"] > 0
        assert saved["splits"]["val_shifted"]["records"] == 3 and saved["steps"] == 2
        text = (out / f"seed_{seed}" / "report.md").read_text()
        assert saved["verdict"] in text and "held-out, shifted" in text
        overlays = sorted(p.name for p in (out / f"seed_{seed}" / "overlays").glob("*.png"))
        assert len(overlays) == 6 and overlays[0].startswith("val_00000")
        assert (out / f"seed_{seed}" / "loss_curves.png").exists()
    assert gapped > 0
    # the summary: one row per seed, mean ± std, paired gaps, per-seed chance levels
    assert summary["seeds"] == [0, 1] and len(summary["values"]["SWIM − NTP"]) == 2
    table = (out / "report.md").read_text()
    assert "| 0 |" in table and "| 1 |" in table and "mean ± std" in table and "shifted: colour-only" in table
    assert (
        "base zero-shot" in table and "answers dep.: SWIM" in table and "answers dep.: SE of the gap" in table
    )
    bases = list((tmp_path / "cache").glob("base-*"))
    assert len(bases) == 1 and (bases[0] / "base.json").exists()  # built once, shared by both seeds
    # both arms start from the base with its vision tower frozen (recipe_overrides), the language model trained
    from safetensors.torch import load_file

    base = load_file(bases[0] / "model.safetensors")
    for arm in ("baseline", "swim"):
        tuned = load_file(out / "seed_0" / arm / "model.safetensors")
        visual = [k for k in base if k.startswith("visual.")]
        assert visual and all(torch.equal(base[k], tuned[k]) for k in visual)
        assert any(not torch.equal(base[k], tuned[k]) for k in base if not k.startswith("visual."))
    values = summary["values"]
    gap = [s - b for s, b in zip(values["SWIM"], values["NTP-only"])]
    assert values["SWIM − NTP"] == pytest.approx(gap)


def test_unpatchify_inverts_patchify():
    from swim.data.video import patchify
    from swim.vis.attention import unpatchify

    settings = VideoSettings()
    frames = torch.randint(0, 256, (4, 56, 84, 3), dtype=torch.uint8)
    pixels, grid = patchify(frames.permute(0, 3, 1, 2).float(), settings)
    np.testing.assert_array_equal(unpatchify(pixels, grid, settings), frames.numpy())


def test_infer_writes_tagged_word_overlays(tiny_ckpt, tmp_path, capsys):
    from swim.eval.infer import main as infer_main

    paths = generate(tmp_path / "data", SynthConfig(), seed=2, counts={"val": 1})
    video = paths["val"].parent / json.loads(paths["val"].read_text())[0]["video"]
    infer_main(["--model", str(tiny_ckpt), "--video", str(video), "--question", "Where does the red <ins>circle</ins> go?",
                "--max-new-tokens", "4", "--num-frames", "8", "--max-frames", "8", "--min-pixels", "3136", "--max-pixels", str(112 * 112),
                "--attention", str(tmp_path / "att"), "--attention-layers", "1", "3"])  # fmt: skip
    written = sorted((tmp_path / "att").glob("*.png"))
    assert [p.name for p in written] == ["attention_0_circle.png"]
    assert Image.open(written[0]).size[0] > 300
