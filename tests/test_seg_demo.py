"""The segmentation demo's driver end to end at toy sizes (`--quick`): every arm trains and is scored, and the
reports carry every field the full run writes. The numbers are checked for shape and range, not for value."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from swim.demos.seg_demo import BASELINE, REFERENCES, SegDemoConfig, baseline_above_named_colour, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "seg_demo.yaml"
RUN_FIELDS = {"J", "F", "JF", "expressions", "distractor_share", "pointing_game", "mba_gamma"}
REPORT_FIELDS = {"seed", "runs", "references", "steps", "seconds", "train_seconds", "recipe", "demo_config",
                 "load_average", "train_cpu_seconds", "starts"}  # fmt: skip
SUMMARY_FIELDS = {"J", "F", "JF", "distractor_share", "pointing_game"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick --seeds 0` run of the real driver (training subprocesses included), shared by the checks."""
    out = tmp_path_factory.mktemp("seg_demo")
    summary = main(["--config", str(CONFIG), "--quick", "--seeds", "0", "--out", str(out)])
    return out, summary


def in_unit_range(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_quick_block_shrinks_sizes_and_keeps_the_full_demo_as_it_was():
    full, quick = SegDemoConfig.from_yaml(CONFIG), SegDemoConfig.from_yaml(CONFIG, quick=True)
    assert (full.num_train, full.num_val, full.max_steps, full.parallel, full.seed) == (400, 100, None, 2, 0)
    assert full.base.endswith("demo_base.yaml") and full.sam_base.endswith("seg_sam_base.yaml")
    assert (quick.base, quick.sam_base) == (None, None) and quick.model["hidden_size"] == 64
    assert quick.runs == full.runs and quick.recipe == full.recipe and quick.seed == full.seed
    assert quick.num_train < full.num_train and quick.num_val < full.num_val and quick.max_steps is not None
    assert "quick" not in asdict(full)  # the block never reaches the report's demo_config


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("quick: {num_steps: 2}\n", "unknown settings in quick: ['num_steps']"),
        ("quick: {runs: {seg: {mba_mode: 'off'}}}\n", "may not change `runs`"),
        ("quick: [2]\n", "quick: must be a mapping"),
    ],
)
def test_bad_quick_block_is_refused_naming_the_file(tmp_path, block, message):
    (tmp_path / "seg_demo_cpu.yaml").write_text("{}\n")
    config = tmp_path / "demo.yaml"
    config.write_text("num_train: 4\n" + block)
    with pytest.raises(ValueError, match=str(config).replace(".", r"\.")) as err:
        SegDemoConfig.from_yaml(config)
    assert message in str(err.value)


def test_quick_without_a_quick_block_is_refused(tmp_path):
    (tmp_path / "seg_demo_cpu.yaml").write_text("{}\n")
    config = tmp_path / "demo.yaml"
    config.write_text("num_train: 4\n")
    assert SegDemoConfig.from_yaml(config).num_train == 4
    with pytest.raises(ValueError, match="--quick needs a `quick:` block"):
        SegDemoConfig.from_yaml(config, quick=True)


def test_quick_seed_report_has_every_arm_and_field(quick_run):
    out, _ = quick_run
    quick = SegDemoConfig.from_yaml(CONFIG, quick=True)
    report = json.loads((out / "seed_0" / "report.json").read_text())
    assert set(report) == REPORT_FIELDS and report["seed"] == 0 and report["steps"] == quick.max_steps
    assert report["demo_config"] == asdict(quick) and list(report["runs"]) == list(quick.runs)
    for name, run in report["runs"].items():
        assert set(run) == RUN_FIELDS, name
        assert all(in_unit_range(run[key]) for key in SUMMARY_FIELDS), (name, run)
        assert run["JF"] == pytest.approx((run["J"] + run["F"]) / 2) and run["expressions"] == quick.num_val
        if name == BASELINE:
            assert run["mba_gamma"] is None
        else:
            assert isinstance(run["mba_gamma"], float) and math.isfinite(run["mba_gamma"]), name
    assert set(report["references"]) == set(REFERENCES)
    for name, ref in report["references"].items():
        assert all(in_unit_range(ref[key]) for key in ("J", "F", "JF", "distractor_share")), (name, ref)
    assert 0 < report["train_seconds"] <= report["seconds"] and report["train_cpu_seconds"] > 0


def test_quick_seed_report_md_has_the_table_and_overlays(quick_run):
    out, _ = quick_run
    report = json.loads((out / "seed_0" / "report.json").read_text())
    text = (out / "seed_0" / "report.md").read_text()
    for name, run in report["runs"].items():
        assert f"| `{name}` | {run['J']:.3f} | {run['F']:.3f} | **{run['JF']:.3f}** |" in text
    for label in REFERENCES.values():
        assert f"| reference: {label} |" in text
    met = report["runs"][BASELINE]["JF"] > report["references"]["named_colour"]["JF"]
    assert f"**{'met' if met else 'not met'}** (J&F {report['runs'][BASELINE]['JF']:.3f} against" in text
    overlays = sorted((out / "seed_0" / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["val_00000.png", "val_00001.png"]
    assert all(f"]({p.relative_to(out / 'seed_0')})" in text for p in overlays)
    assert all(Image.open(p).size[0] > 100 for p in overlays)
    for name in report["runs"]:
        state = json.loads((out / "seed_0" / name / "trainer_state.json").read_text())
        assert state["global_step"] == report["steps"] and (out / "seed_0" / name / "seg_head").is_dir()


def test_quick_seeds_report_has_the_per_seed_table(quick_run):
    out, summary = quick_run
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["seeds"] == [0]
    seed = json.loads((out / "seed_0" / "report.json").read_text())
    arms = list(seed["runs"])
    assert list(saved["summary"]) == arms and set(saved["criterion"]) == set(arms) - {BASELINE}
    for name, fields in saved["summary"].items():
        assert set(fields) == SUMMARY_FIELDS
        for key, (mean, std) in fields.items():
            assert mean == pytest.approx(seed["runs"][name][key]) and std == 0, (name, key)
    for verdict in saved["criterion"].values():  # one seed never meets the criterion (it needs three)
        assert math.isfinite(verdict["gain"]) and verdict["met"] is False
    assert set(saved["references"]) == set(REFERENCES)
    assert all(in_unit_range(mean) and std == 0 for mean, std in saved["references"].values())
    text = (out / "report.md").read_text()
    assert "| run | seed 0 | J&F mean ± std |" in text and saved["answer"] in text
    for name in arms:
        jf = seed["runs"][name]["JF"]
        assert f"| `{name}` | {jf:.3f} | {jf:.3f} ± 0.000 |" in text
    assert "[seed 0](seed_0/report.md)" in text
    met = seed["runs"][BASELINE]["JF"] > seed["references"]["named_colour"]["JF"]
    assert (
        saved["baseline_above_named_colour"] == [met]
        and f"in every seed: **{'met' if met else 'not met'}**" in text
    )


def test_baseline_target_by_hand():
    references = {"named_colour": {"JF": 0.58}}
    assert baseline_above_named_colour({BASELINE: {"JF": 0.63}}, references)
    assert not baseline_above_named_colour({BASELINE: {"JF": 0.58}}, references)  # equal is not above


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: none.yaml\n", "base config .*none.yaml not found"),
        ("sam_base: none.yaml\n", "sam_base config .*none.yaml not found"),
        ("base: base.yaml\nmodel: {hidden_size: 64}\n", "`model` and `base` both set"),
        ("sam_base: sam.yaml\nsam: {size: 128}\n", "`sam` and `sam_base` both set"),
    ],
)
def test_pretrained_starts_are_checked_naming_the_file(tmp_path, text, message):
    for name in ("seg_demo_cpu.yaml", "base.yaml", "sam.yaml"):
        (tmp_path / name).write_text("{}\n")
    config = tmp_path / "demo.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=str(config).replace(".", r"\.") + ".*" + message):
        SegDemoConfig.from_yaml(config)


def test_demo_starts_from_the_cached_pretrained_llm_and_sam(tmp_path):
    """The shipped demo's path: the LLM from `swim pretrain`'s base, SAM-2 from `swim seg pretrain-sam2`'s, both
    built into the cache once (toy sizes here) and named in the report; the trained head holds that SAM-2."""
    import shutil

    import yaml
    from transformers import Sam2Config

    for name in ("seg_demo_cpu.yaml", "demo_base.yaml", "demo_base_cpu.yaml", "seg_sam_base.yaml"):
        shutil.copy(ROOT / "recipes" / name, tmp_path / name)
    base = yaml.safe_load((tmp_path / "demo_base.yaml").read_text())
    base |= {"num_videos": 4, "max_steps": 2}
    (tmp_path / "demo_base.yaml").write_text(yaml.safe_dump(base))
    sam = yaml.safe_load((tmp_path / "seg_sam_base.yaml").read_text())
    sam |= {"num_scenes": 4, "num_val": 4, "steps": 2, "batch_size": 2, "hidden": 32}
    (tmp_path / "seg_sam_base.yaml").write_text(yaml.safe_dump(sam))
    shipped = yaml.safe_load(CONFIG.read_text())
    config = {k: shipped[k] for k in ("recipe", "base", "sam_base", "synth")}
    config |= {"cache_dir": str(tmp_path / "cache"), "num_train": 4, "num_val": 2, "max_steps": 2,
               "runs": {BASELINE: {"mba_mode": "off"}}}  # fmt: skip
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))

    report = main(["--config", str(tmp_path / "demo.yaml"), "--out", str(tmp_path / "out")])
    llm_base = next((tmp_path / "cache").glob("base-*"))
    sam_base = next((tmp_path / "cache").glob("sam2-*"))
    assert str(llm_base) in report["starts"]["llm"] and "vision tower frozen" in report["starts"]["llm"]
    assert str(sam_base) in report["starts"]["sam"] and "image encoder frozen" in report["starts"]["sam"]
    assert "colour_shape of each embedding cell, held-out accuracy" in report["starts"]["sam"]
    head_sam = Sam2Config.from_pretrained(tmp_path / "out" / BASELINE / "seg_head" / "sam2")
    assert (
        head_sam.mask_decoder_config.hidden_size == 32
    )  # the toy SAM-2 base's width, not the random default
    assert report["starts"]["llm"] in (tmp_path / "out" / "report.md").read_text()
