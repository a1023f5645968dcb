"""KLAL mode end to end: the synthetic tasks, the answer scorers, training on image records with boxes and
answer-token rows, generation on images, and the demo's report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swim.data.masks import object_group_targets
from swim.data.records import load_records
from swim.data.synth.cli import main as synth_main
from swim.data.synth.klal import TASKS, KlalSynthConfig, cell_name, generate_task, segment_crossings
from swim.demos.klal_demo import TARGETS, most_common_answer, moved_targets, seed_targets
from swim.eval.answers import chance_levels, score_answers
from swim.modeling.capture import find_decoder_layers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("klal_tasks")
    return {
        task: generate_task(out / task, task, KlalSynthConfig(), 0, {"train": 6, "val": 3}) for task in TASKS
    }


def test_every_task_writes_valid_image_records_with_annotations_on_the_answer(tasks):
    for task, paths in tasks.items():
        records, problems = load_records(paths["train"])
        assert not problems and len(records) == 6 and all(r.media_files[0] == "image" for r in records)
        raw = json.loads(paths["train"].read_text())
        assert {r["task"] for r in raw} == {task}
    for raw in json.loads(tasks["grid_patch"]["train"].read_text()):
        (x, y), target = raw["annotation"][0]["0"]["points"][0], raw["scene"][0]
        assert (
            raw["conversations"][1]["value"]
            == cell_name(int(y // 28), int(x // 28))
            == cell_name(*target["cell"])
        )
        assert target["colour"] in raw["conversations"][0]["value"] and raw["choices"] == 64
        pixels = np.asarray(Image.open(tasks["grid_patch"]["train"].parent / raw["image"]))
        x0, y0, x1, y1 = target["box"]
        assert (pixels[y0:y1, x0:x1] > 100).any(-1).mean() > 0.3  # the shape is drawn where the scene says
    for raw in json.loads(tasks["grid_size"]["train"].read_text()):
        target, answer = raw["scene"][0], raw["conversations"][1]["value"]
        assert answer == target["size"] and raw["answer_key"] == "size" and raw["choices"] == 2
        for other in raw["scene"][1:]:  # a distractor sharing the colour or the shape has the other size
            if other["colour"] == target["colour"] or other["shape"] == target["shape"]:
                assert other["size"] != answer
        for obj in raw["scene"]:  # drawn at its size: large 16 px, small 10 px
            x0, y0, x1, y1 = obj["box"]
            assert max(x1 - x0, y1 - y0) in ((15, 16, 17) if obj["size"] == "large" else (9, 10, 11))
    for raw in json.loads(tasks["line_intersection"]["train"].read_text()):
        lines = [np.array(o["polyline"]) for o in raw["scene"]]
        points = raw["annotation"][0]["0"]["points"] if raw["annotation"] else []
        assert int(raw["conversations"][1]["value"]) == len(segment_crossings(*lines)) == len(points)
    for raw in json.loads(tasks["line_tracing"]["train"].read_text()):
        start = raw["conversations"][0]["value"].split("from ")[1][0]
        traced = next(o for o in raw["scene"] if o["start"] == start)
        assert raw["conversations"][1]["value"] == str(traced["end"])
        assert raw["annotation"][0]["0"]["polyline"] == traced["polyline"]


def test_tasks_are_byte_identical_for_a_seed(tasks, tmp_path):
    for task, paths in tasks.items():
        again = generate_task(tmp_path / task, task, KlalSynthConfig(), 0, {"train": 6})
        assert again["train"].read_text() == paths["train"].read_text()
        for name in ("00000", "00005"):
            image = f"images/{task}_train_{name}.png"
            assert (tmp_path / task / image).read_bytes() == (paths["train"].parent / image).read_bytes()


def test_line_crossings_by_hand():
    a = np.array([[0, 0], [10, 10]])
    assert segment_crossings(a, np.array([[0, 10], [10, 0]])) == [(5.0, 5.0)]
    assert segment_crossings(a, np.array([[0, 1], [10, 11]])) == []  # parallel
    zigzag = np.array([[0, 10], [4, 0], [8, 10]])
    assert len(segment_crossings(np.array([[0, 5], [10, 5]]), zigzag)) == 2


def test_cli_writes_a_task(tmp_path):
    synth_main([str(tmp_path), "--task", "rec", "--num-train", "2", "--num-val", "1", "--size", "112"])
    raw = json.loads((tmp_path / "train.json").read_text())
    assert len(raw) == 2 and raw[0]["width"] == 112 and raw[0]["scorer"] == "box"
    assert json.loads((tmp_path / "synth_config.json").read_text())["task"] == "rec"


def _record(answer, scorer, box=(10, 10, 30, 40), scene=None, choices=None):
    record = {"conversations": [{"value": "q"}, {"value": answer}], "scorer": scorer, "width": 100, "height": 100,
              "annotation": [{"0": {"box": list(box)}}]}  # fmt: skip
    if scene is not None:
        record["scene"] = scene
    if choices is not None:
        record["choices"] = choices
    return record


def test_scorers_count_parse_failures_and_errors():
    records = [
        _record("C5", "exact"),
        _record("3", "count"),
        _record("(20, 25)", "point"),
        _record("[12, 10, 30, 42]", "box"),
        _record("C5", "exact"),
        _record("3", "count"),
        _record("(31, 25)", "point"),
        _record("[0, 0, 5]", "box"),
        _record("A1", "exact"),
    ]
    answers = {"0": " c5. ", "1": "There are 3.", "2": "(20.5, 39)", "3": "[10, 10, 30, 40]", "4": "C 5",
               "5": "three", "6": "31, 25", "7": "[50, 50, 70, 80]"}  # fmt: skip  # 8: a generation error
    summary = score_answers(records, answers)
    assert [row["status"] for row in summary["rows"]] == [
        "correct", "correct", "correct", "correct", "wrong", "parse_failure", "wrong", "wrong", "error",
    ]  # fmt: skip
    assert summary["correct"] == 4 and summary["parse_failures"] == 1 and summary["errors"] == 1
    assert summary["accuracy"] == pytest.approx(4 / 9)


def test_chance_levels_by_hand():
    scene = [{"colour": "red", "shape": "circle"}, {"colour": "red", "shape": "square"},
             {"colour": "blue", "shape": "circle"}]  # fmt: skip
    records = [_record("C5", "exact", scene=scene, choices=64), _record("C5", "exact", scene=scene[:1], choices=64),
               _record("A1", "exact", scene=scene, choices=64), _record("B2", "exact", scene=scene, choices=64)]  # fmt: skip
    chance = chance_levels(records)
    assert chance["majority answer"] == 0.5 and chance["uniform guess"] == pytest.approx(1 / 64)
    assert chance["question only"] == 0.5  # one question text: its most common answer, C5
    assert chance["colour only"] == pytest.approx((0.5 + 1 + 0.5 + 0.5) / 4)
    assert chance["shape only"] == pytest.approx((0.5 + 1 + 0.5 + 0.5) / 4)
    sized = [dict(o, size=size) for o, size in zip(scene, ("small", "large", "small"))]
    by_size = [dict(_record("small", "exact", scene=sized, choices=2), answer_key="size"),
               dict(_record("large", "exact", scene=sized[1:], choices=2), answer_key="size")]  # fmt: skip
    # a shortcut answers with the size of a random object that shares one attribute with the named one
    chance = chance_levels(by_size)
    assert chance["colour only"] == pytest.approx((1 / 2 + 1) / 2)  # red: small, large | red: large
    assert chance["shape only"] == pytest.approx((2 / 2 + 1) / 2)  # circle: small, small | square: large
    point = chance_levels([_record("(1, 1)", "point", box=(0, 0, 50, 20))])
    assert point["random point"] == pytest.approx(0.1)
    box = chance_levels([_record("[0, 0, 100, 100]", "box", box=(0, 0, 100, 100))])
    assert box["random box of the right size"] == 1.0  # a box as large as the image can only be right


def test_control_targets_move_to_a_wrong_cell_inside_the_image():
    rng = np.random.default_rng(0)
    record = {"width": 224, "height": 224, "annotation": [{"0": {"points": [[14.0, 14.0]]}}]}
    for _ in range(20):
        (x, y) = moved_targets(record, rng, 28, 2)["annotation"][0]["0"]["points"][0]
        assert 0 <= x <= 224 and 0 <= y <= 224 and max(abs(x - 14), abs(y - 14)) >= 56 and (x - 14) % 28 == 0
    box = {"width": 84, "height": 56, "annotation": [{"0": {"box": [0, 0, 28, 28]}}]}
    assert moved_targets(box, rng, 28, 2)["annotation"][0]["0"]["box"] == [56, 0, 84, 28]  # the only place


def _box_records(tmp_path, n=8):
    """Image records with box annotations and no <ins> tags: which cell holds the bright square?"""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        image = np.zeros((112, 112, 3), np.uint8)
        row, col = (int(v) for v in rng.integers(0, 4, 2))
        image[row * 28 + 4 : row * 28 + 24, col * 28 + 4 : col * 28 + 24] = 230
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        box = [col * 28 + 4, row * 28 + 4, col * 28 + 24, row * 28 + 24]
        records.append({"image": f"{i}.png", "annotation": [{"0": {"box": box}}],
                        "conversations": [{"from": "human", "value": "Which cell has the square?"},
                                          {"from": "gpt", "value": cell_name(row, col)}]})  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(records))
    return tmp_path / "train.json"


def test_image_records_with_boxes_and_answer_last_train_both_losses(tiny_ckpt, tmp_path):
    """`swim train --config recipes/klal_cpu.yaml` on image records with boxes: the attention loss is computed
    on the last answer token and moves the supervised layers' q/k away from an NTP-only run."""
    from swim.modeling.model import stock_model_class
    from swim.train import main as train_main

    data = _box_records(tmp_path)
    common = ["--config", str(ROOT / "recipes" / "klal_cpu.yaml"), "--model_name_or_path", str(tiny_ckpt),
              "--data_config", str(data), "--max_steps", "2", "--per_device_train_batch_size", "4",
              "--logging_steps", "1", "--min_pixels", "3136", "--max_pixels", str(112 * 112)]  # fmt: skip
    klal = train_main([*common, "--output_dir", str(tmp_path / "klal")])
    ntp = train_main([*common, "--output_dir", str(tmp_path / "ntp"), "--attn_weight", "0"])
    assert klal.grounding.target == "klal" and klal.probe.layers == [0, 1, 2, 3]  # `all`
    first_klal, first_ntp = klal.state.log_history[0], ntp.state.log_history[0]
    assert first_klal["loss_text"] == pytest.approx(first_ntp["loss_text"], rel=1e-6)  # same data, same start
    assert first_klal["loss_attn"] > 0 and first_klal["loss_attn"] == pytest.approx(
        first_ntp["loss_attn"], rel=1e-6
    )
    assert first_klal["loss"] > first_ntp["loss"]
    start = stock_model_class(tiny_ckpt).from_pretrained(tiny_ckpt)
    layers = {name: find_decoder_layers(run.model) for name, run in (("klal", klal), ("ntp", ntp))}
    for i, layer in find_decoder_layers(start).items():
        for name in ("q_proj", "k_proj"):
            w0 = getattr(layer.self_attn, name).weight
            wk, wn = (getattr(layers[run][i].self_attn, name).weight for run in ("klal", "ntp"))
            assert not torch.equal(wk, w0) and not torch.equal(wk, wn), f"layer {i} {name}"


def test_answers_are_generated_on_images_and_scored(tiny_ckpt, tmp_path):
    from swim.eval.answers import main as answers_main

    generate_task(tmp_path, "grid_patch", KlalSynthConfig(size=112), 0, {"val": 3})
    summary = answers_main(["--model", str(tiny_ckpt), "--data", str(tmp_path / "val.json"), "--out", str(tmp_path),
                            "--max-new-tokens", "3", "--batch-size", "2", "--min-pixels", "3136",
                            "--max-pixels", str(112 * 112)])  # fmt: skip
    assert (
        summary["records"] == 3
        and summary["errors"] == 0
        and all(r["answer"] is not None for r in summary["rows"])
    )
    assert summary["chance"]["uniform guess"] == pytest.approx(1 / 16)
    assert json.loads((tmp_path / "answers.json").read_text())["accuracy"] == summary["accuracy"]


def test_infer_on_an_image_and_the_answer_token_overlay(tiny_ckpt, tmp_path, capsys):
    from dataclasses import replace

    from swim.eval.generate import load_model
    from swim.eval.infer import attention_overlays
    from swim.eval.infer import run as infer_run

    image = tmp_path / "a.png"
    Image.fromarray(np.full((56, 84, 3), 90, np.uint8)).save(image)
    args = ["--model", str(tiny_ckpt), "--image", str(image), "--question", "Which cell?", "--max-new-tokens", "3",
            "--min-pixels", "3136", "--max-pixels", str(56 * 84)]  # fmt: skip
    result = infer_run(args)
    assert result.encoded.image_grid_thw == [(1, 4, 6)] and result.inputs["pixel_values"].shape[0] == 24
    assert capsys.readouterr().out == result.answer + "\n"
    # the overlay of a fixed answer (a random model's own answer may be empty)
    loaded = load_model(tiny_ckpt, dtype="fp32", device="cpu")
    settings = loaded.family.video_settings(min_pixels=3136, max_pixels=56 * 84)
    written = attention_overlays(loaded, replace(result, answer="C5"), "Which cell?", video_settings=settings,
                                 system_prompt=None, layers="all", out_dir=tmp_path / "att", query="answer_last",
                                 query_offset=-1, head_fusion="renorm_mean")  # fmt: skip
    assert [p.name for p in written] == ["attention_0_answer.png"] and Image.open(written[0]).size[0] > 150


def test_three_level_target_of_a_synthetic_record_by_hand(tasks):
    raw = json.loads(tasks["grid_patch"]["train"].read_text())[0]
    cover, valid = object_group_targets(raw["annotation"][0], [0], (224, 224), (224, 224), temporal_patch=1)
    row, col = raw["scene"][0]["cell"]
    assert valid.tolist() == [True] and np.flatnonzero(cover[0]).tolist() == [row * 8 + col]


def test_klal_demo_targets_per_seed_by_hand():
    def arm(accuracy):
        return {"accuracy": accuracy, "chance": {"majority answer": 0.55}}

    met = seed_targets({"ntp": arm(0.60), "klal": arm(0.65), "control": arm(0.64)})
    assert met == dict.fromkeys(TARGETS, True)
    # an NTP arm at the majority level, a gain short of 5 points, a control that gains as much as KLAL
    missed = seed_targets({"ntp": arm(0.55), "klal": arm(0.59), "control": arm(0.61)})
    assert missed == dict.fromkeys(TARGETS, False)
    rows = [{"answer": " large"}, {"answer": "large"}, {"answer": "small"}, {"answer": None}]
    assert most_common_answer(rows) == {"most_common_answer": "large", "most_common_answer_share": 0.5}


def test_klal_demo_quick_writes_the_report(tmp_path, monkeypatch):
    from swim.demos.cli import main as demo_main

    monkeypatch.chdir(ROOT)
    result = demo_main(["--config", "recipes/klal_demo.yaml", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["seeds"] == [0] and set(report["per_seed"]["0"]) == {"ntp", "klal", "control"}
    runs = report["per_seed"]["0"]
    for arm in runs.values():
        assert 0 <= arm["accuracy"] <= 1 and arm["attn_ratio"] > 0 and set(arm["attn_ratio_per_layer"]) == {
            "layer 0", "layer 1"}  # fmt: skip
    assert report["gaps"]["klal - ntp: accuracy"]["per_seed"] == [
        runs["klal"]["accuracy"] - runs["ntp"]["accuracy"]
    ]
    assert report["chance"]["uniform guess"] == pytest.approx(1 / 2) and result["seeds"] == [0]
    assert report["steps"] == 2 and set(report["targets"]["0"]) == set(TARGETS)
    text = (tmp_path / "report.md").read_text()
    assert "above the majority-answer chance, in every seed" in text and "| 0 |" in text
    for figure in ("attention_ratio_and_accuracy.png", "loss_curves.png", "overlays/val_attention.png"):
        assert Image.open(tmp_path / figure).size[0] > 300


def test_grid_size_prior_tilts_the_named_shape_and_question_only_chance_finds_it(tmp_path):
    cfg = KlalSynthConfig(size=112, min_objects=3, max_objects=5, size_prior=0.3)
    records = json.loads(generate_task(tmp_path, "grid_size", cfg, 0, {"train": 400})["train"].read_text())
    large = {shape: [r["conversations"][1]["value"] == "large" for r in records if r["scene"][0]["shape"] == shape]
             for shape in cfg.shapes}  # fmt: skip
    assert np.mean(large["circle"] + large["square"]) == pytest.approx(0.8, abs=0.06)
    assert np.mean(large["triangle"] + large["diamond"]) == pytest.approx(0.2, abs=0.06)
    chance = chance_levels(records)
    assert chance["question only"] >= 0.8 - 0.06 and chance["majority answer"] == pytest.approx(0.5, abs=0.06)
    with pytest.raises(ValueError, match="size_prior"):
        KlalSynthConfig(size_prior=0.7)
