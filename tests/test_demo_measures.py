"""The SWIM demo's task-level measure and the pretrained base's pieces: hand-made records with known answers."""

import json

import numpy as np
import pytest

from swim.data.synth.shapes import SceneObject, SynthConfig, inventory_record, sample_scene, shape_mask
from swim.demos.swim_demo import distractor_dependence, paired_gap, shade_variants


def _scene(*objects):
    return [{"colour": c, "shape": s, "shade": d, "annotation": {}} for c, s, d in objects]


def test_distractor_dependence_and_colour_only_chance():
    # a same-colour distractor of the other shade: dependent; a colour-only guess is right 1 time in 2
    scene = _scene(("red", "ring", "dark"), ("red", "cross", "bright"), ("blue", "ring", "dark"))
    assert distractor_dependence(scene) == (True, 0.5)
    # two same-colour distractors, one of the same shade: still dependent, 2 of 3 right
    dep, p = distractor_dependence(
        _scene(("red", "ring", "dark"), ("red", "cross", "dark"), ("red", "square", "bright"))
    )
    assert dep and p == pytest.approx(2 / 3)
    # the distractor has the same shade, or there is none: the colour alone answers right
    assert distractor_dependence(_scene(("red", "ring", "dark"), ("red", "cross", "dark"))) == (False, 1.0)
    assert distractor_dependence(_scene(("red", "ring", "dark"), ("blue", "ring", "bright"))) == (False, 1.0)
    # any attribute of the scene metadata
    moving = [dict(o, direction=d) for o, d in zip(_scene(("red", "ring", "x"), ("red", "cross", "x")), "ul")]
    assert distractor_dependence(moving, "direction") == (True, 0.5)


def _record(question: str, answer: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_shade_variants_of_a_description_and_of_a_shade_question():
    shades = ("bright", "dark")
    description = _record("Describe the red <ins>ring</ins>.", "The red ring is dark and moves to the left.")
    variants = shade_variants(description, shades)
    assert {k: v["conversations"][1]["value"] for k, v in variants.items()} == {
        "bright": "The red ring is bright and moves to the left.",
        "dark": "The red ring is dark and moves to the left.",
    }
    assert (
        description["conversations"][1]["value"] == "The red ring is dark and moves to the left."
    )  # untouched
    question = (
        "Is the red <ins>ring</ins> bright or dark?\n(A) Dark\n(B) Bright\nAnswer with the option's letter."
    )
    answers = {
        k: v["conversations"][1]["value"]
        for k, v in shade_variants(_record(question, "(A) Dark"), shades).items()
    }
    assert answers == {"bright": "(B) Bright", "dark": "(A) Dark"}
    # records that do not state the shade are not scored
    motion = "Which way does the red <ins>ring</ins> move?\n(A) Up\n(B) Down\n(C) To the left\n(D) To the right\nAnswer."
    assert shade_variants(_record(motion, "(A) Up"), shades) == {}
    assert (
        shade_variants(_record("Describe the red <ins>ring</ins>.", "The red ring moves up."), shades) == {}
    )


def test_ring_and_cross_masks():
    ring = shape_mask("ring", 0, 0, 30, 30)
    cross = shape_mask("cross", 0, 0, 30, 30)
    assert not ring[15, 15] and ring[15, 1] and ring[1, 15]  # hollow centre, the outline on the box's sides
    assert cross[15, 15] and cross[15, 1] and not cross[2, 2]  # the bars meet in the centre; corners empty
    assert 0.25 < ring.mean() < 0.6 and 0.25 < cross.mean() < 0.6  # far from a filled square's 1.0
    with pytest.raises(ValueError, match="unknown shapes"):
        SynthConfig(shapes=("ring", "hexagon"))


def test_inventory_record_names_every_object_in_a_fixed_order():
    cfg = SynthConfig(shapes=("square", "ring", "cross"), colours=("red", "green", "blue", "yellow"))
    objects = [
        SceneObject("cross", "blue", "up", 0, 0),
        SceneObject("square", "blue", "left", 0, 0),
        SceneObject("ring", "red", "down", 0, 0),
    ]
    record = inventory_record(objects, "videos/p.mp4", "pretrain_00003", cfg)
    assert record["conversations"][1]["value"] == (
        "A red ring moving down, a blue square moving to the left and a blue cross moving up."
    )
    assert record["index"] == "synth_inventory_pretrain_00003" and "annotation" not in record
    assert record["conversations"][0]["value"].startswith("<video>\n")
    single = inventory_record(objects[:1], "v.mp4", "x", cfg)["conversations"][1]["value"]
    assert single == "A blue cross moving up."
    json.dumps(record)


def test_shades_draw_the_colour_darker_and_are_stated_in_the_answers(tmp_path):
    from swim.data.synth.shapes import PALETTE, SHADES, generate

    cfg = SynthConfig(shapes=("square", "ring", "cross"), shades=("bright", "dark"), qa_fraction=0.5)
    path = generate(tmp_path, cfg, seed=3, counts={"val": 12})["val"]
    records = json.loads(path.read_text())
    stated = 0
    for record in records:
        target = record["scene"][0]
        assert target["shade"] in SHADES
        answer = record["conversations"][1]["value"]
        if answer.startswith("The "):
            assert f" is {target['shade']} and moves " in answer
            stated += 1
        elif "bright or dark" in record["conversations"][0]["value"]:
            assert answer.endswith(target["shade"].capitalize())
            stated += 1
        assert "bright" not in record["conversations"][0]["value"].split("?")[0].replace("bright or dark", "")
    assert stated >= 6
    rng = np.random.default_rng(0)
    objects, video = sample_scene(rng, cfg)
    for obj in objects:
        frame0 = video[0][obj.masks[0]]
        expected = np.round(np.array(PALETTE[obj.colour]) * SHADES[obj.shade])
        np.testing.assert_allclose(frame0, np.broadcast_to(expected, frame0.shape))
    with pytest.raises(ValueError, match="shades"):
        SynthConfig(shades=("bright",))


def test_demo_config_without_shades_fails_before_training(tmp_path):
    from pathlib import Path

    from swim.demos.swim_demo import DemoConfig

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    text = (recipes / "demo.yaml").read_text().replace("  shades: [bright, dark]", "")
    for name in ("demo_cpu.yaml", "demo_base.yaml"):
        (tmp_path / name).write_text((recipes / name).read_text())
    (tmp_path / "demo.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"demo\.yaml: synth\.shades"):
        DemoConfig.from_yaml(tmp_path / "demo.yaml")


def test_paired_gap_counts_only_the_items_the_arms_disagree_on():
    # 10 items: both right on 5, first alone right on 3, second alone on 1, both wrong on 1
    first = [True] * 5 + [True] * 3 + [False] + [False]
    second = [True] * 5 + [False] * 3 + [True] + [False]
    result = paired_gap(first, second)
    assert (result["first_only"], result["second_only"], result["n"]) == (3, 1, 10)
    assert result["gap"] == pytest.approx(0.2)
    differences = np.array(first, float) - np.array(second, float)
    assert result["se"] == pytest.approx(differences.std() / np.sqrt(10))  # SE of the per-item difference
    assert paired_gap([True, False], [True, False]) == {
        "gap": 0.0,
        "se": 0.0,
        "first_only": 0,
        "second_only": 0,
        "n": 2,
    }
    assert paired_gap([True, True], [False, False])["se"] == 0.0  # always apart by one: no spread
    with pytest.raises(ValueError, match="same items"):
        paired_gap([True], [True, False])
