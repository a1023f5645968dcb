"""Every recipe parses into the training dataclasses, and names only existing files and valid settings."""

from pathlib import Path

import pytest
import yaml

from swim.demos.seg_demo import SegDemoConfig
from swim.demos.swim_demo import DemoConfig
from swim.train import make_parser

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = (
    "demo.yaml",
    "demo_base.yaml",
    "klal_demo.yaml",
    "seg_demo.yaml",
    "seg_sam_base.yaml",
)  # demo drivers' configs, not training recipes
TRAIN_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name not in DEMO_CONFIGS)


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_training_recipe_parses(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(recipe.read_text())
    # Hardware-specific keys are checked for what they name, then left out: parsing a DeepSpeed config or bf16
    # on this CPU machine would initialise (global) DeepSpeed / device state.
    if ds := raw.pop("deepspeed", None):
        assert (ROOT / ds).exists()
    raw.update(bf16=False, use_cpu=True)
    if raw["data_config"].startswith("data_config/"):
        assert (ROOT / raw["data_config"]).exists()
    cpu_recipe = tmp_path / recipe.name
    cpu_recipe.write_text(yaml.safe_dump(raw))
    data, training, model, seg = make_parser().parse_args_and_config(["--config", str(cpu_recipe)])
    assert seg.seg_head == raw.get("seg_head", False)
    assert training.grounding_config().loss_type == raw["attn_loss"]
    assert model.model_name_or_path == raw["model_name_or_path"]
    assert data.num_frames == raw.get("num_frames", 32)


def test_paper_recipe_matches_the_paper():
    raw = yaml.safe_load((ROOT / "recipes" / "swim_7b.yaml").read_text())
    assert raw["model_name_or_path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert raw["attn_layers"] == [2, 7, 12, 17, 22, 27]
    assert (raw["learning_rate"], raw["lr_scheduler_type"], raw["num_train_epochs"]) == (2e-5, "cosine", 1)
    assert (raw["per_device_train_batch_size"], raw["gradient_accumulation_steps"]) == (1, 4)
    assert raw["bf16"] and raw["attn_implementation"] == "flash_attention_2" and raw["num_frames"] == 32


def test_demo_configs_parse():
    cfg = DemoConfig.from_yaml(ROOT / "recipes" / "demo.yaml")
    assert (ROOT / cfg.recipe).exists()
    seg = SegDemoConfig.from_yaml(ROOT / "recipes" / "seg_demo.yaml")
    assert list(seg.runs) == ["seg", "mba_prepass", "mba_none", "mba_swim_attn"]
    assert {r.get("mba_mode") for r in list(seg.runs.values())[1:]} == {
        "fixed"
    }  # they differ by the prior only


def test_segmentation_recipe_has_sa2va_and_seed_settings():
    raw = yaml.safe_load((ROOT / "recipes" / "sa2va_mba_qwen7b.yaml").read_text())
    assert (
        raw["model_name_or_path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
        and raw["seg_sam"] == "facebook/sam2.1-hiera-large"
    )
    sa2va = (
        raw["learning_rate"],
        raw["weight_decay"],
        raw["lora_r"],
        raw["lora_alpha"],
        raw["bce_weight"],
        raw["dice_weight"],
    )
    assert sa2va == (4e-5, 0.05, 128, 256, 2.0, 0.5) and raw["seg_freeze_encoder"]
    seed = (raw["tmc_weight"], raw["tmc_tau"], raw["boundary_weight"], raw["mba_tau"])
    assert seed == (0.1, 0.15, 0.05, 1.0)


def test_klal_recipes_have_klal_settings(tmp_path, monkeypatch):
    from swim.demos.klal_demo import KlalDemoConfig

    demo = KlalDemoConfig.from_yaml(ROOT / "recipes" / "klal_demo.yaml")
    assert Path(demo.recipe).name == "klal_cpu.yaml" and len(demo.seeds) >= 3 and demo.task == "grid_size"
    quick = KlalDemoConfig.from_yaml(ROOT / "recipes" / "klal_demo.yaml", quick=True)
    assert quick.max_steps is not None and quick.num_train < demo.num_train
    monkeypatch.chdir(ROOT)
    data, training, _, _ = make_parser().parse_args_and_config(
        ["--config", "recipes/klal_cpu.yaml", "--output_dir", str(tmp_path)]
    )
    g = training.grounding_config()
    assert data.attn_query == "answer_last" and g.layers == "all" and g.layer_fusion == "per_layer"
    assert (g.head_fusion, g.target, g.loss_type, g.attn_weight, g.text_weight) == (
        "renorm_mean",
        "klal",
        "kl",
        1,
        1,
    )


def test_qwen3_vl_recipe_keeps_the_official_relative_depths():
    from swim.modeling.capture import default_supervised_layers

    raw = yaml.safe_load((ROOT / "recipes" / "swim_qwen3_vl_8b.yaml").read_text())
    assert raw["model_name_or_path"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert raw["attn_layers"] == default_supervised_layers(36)  # Qwen3-VL-8B has 36 decoder layers
    assert (raw["min_pixels"], raw["max_pixels"]) == (128 * 32 * 32, 768 * 32 * 32)
    assert raw["activation_checkpointing_kwargs"] == {"use_reentrant": False}
