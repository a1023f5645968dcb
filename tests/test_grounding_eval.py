"""Grounding metrics on hand-made maps with known answers."""

import math

import pytest
import torch

from swim.eval.grounding import GroundingMetricsConfig, MetricAccumulator, map_metrics, pair_metrics

CFG = GroundingMetricsConfig(min_cover=0.05, top_k=2)
TARGET = torch.tensor([0.0, 1.0, 0.5, 0.0, 0.02, 0.0])  # inside: tokens 1, 2; touched: 1, 2, 4


def test_perfect_and_wrong_maps():
    perfect = map_metrics(torch.tensor([0, 5.0, 3, 0, 0, 0]), TARGET, CFG)
    assert perfect["pointing_game"] == 1 and perfect["pointing_game_at_k"] == 1 and perfect["auc"] == 1
    assert perfect["mask_mass"] == pytest.approx(1.0)
    wrong = map_metrics(torch.tensor([5.0, 0, 0, 3, 0, 1]), TARGET, CFG)
    assert wrong["pointing_game"] == 0 and wrong["pointing_game_at_k"] == 0 and wrong["auc"] < 0.5
    assert wrong["nss"] < 0


def test_uniform_map_scores_chance():
    m = map_metrics(torch.ones(6), TARGET, CFG)
    assert m["pointing_game"] == pytest.approx(2 / 6) == pytest.approx(m["chance_pointing_game"])
    assert m["pointing_game_at_k"] == pytest.approx(2 / 6)
    assert m["auc"] == pytest.approx(0.5) and m["nss"] == 0
    assert m["mask_mass"] == pytest.approx(3 / 6) == pytest.approx(m["chance_mask_mass"])


def test_nss_and_auc_values():
    attn = torch.tensor([1.0, 4, 2, 1, 1, 3])
    m = map_metrics(attn, TARGET, CFG)
    p = attn / attn.sum()
    z = (p - p.mean()) / p.std(unbiased=False)
    assert m["nss"] == pytest.approx(float(z[1:3].mean()))
    # inside scores {4, 2} vs outside {1, 1, 1, 3}: 4 beats all 4, 2 beats 3 of 4 -> 7/8
    assert m["auc"] == pytest.approx(7 / 8)


def test_pair_metrics_and_accumulator_skip_undefined_pairs():
    groups = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    target = torch.tensor([[[0, 1.0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]]])  # row 1 group 0: all inside
    attn = torch.tensor([[[0.1, 0.8, 0.1, 0.3, 0.3, 0.4, 9.0], [1, 1, 1, 1, 1, 1, 1.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    pairs = pair_metrics(attn, target, groups, valid, CFG)
    assert len(pairs) == 2  # row 0 group 1 has no inside token: not scored
    acc = MetricAccumulator()
    acc.add("fused", pairs)
    summary = acc.summary()["fused"]
    assert summary["pairs"] == 2 and summary["auc_undefined"] == 1 and not math.isnan(summary["auc"])
    assert summary["pointing_game"] == pytest.approx(1.0)


def test_swim_eval_grounding_writes_metrics(tiny_ckpt, tmp_path):
    import json

    from swim.data.synth.shapes import SynthConfig, generate
    from swim.eval.grounding import main

    paths = generate(tmp_path / "data", SynthConfig(), seed=3, counts={"val": 3})
    main(["--model", str(tiny_ckpt), "--data", str(paths["val"]), "--out", str(tmp_path / "g"), "--layers", "1", "3",
          "--num-frames", "8", "--max-frames", "8", "--min-pixels", "3136", "--max-pixels", str(112 * 112)])  # fmt: skip
    result = json.loads((tmp_path / "g" / "grounding.json").read_text())
    assert set(result["metrics"]) == {"fused", "layer 1", "layer 3"}
    fused = result["metrics"]["fused"]
    assert fused["pairs"] == 12 and 0 <= fused["pointing_game"] <= 1 and 0 < fused["chance_pointing_game"] < 1
