"""Mixture YAML: strategies, seeding, data_root defaults, validation errors, the shipped configs."""

import random
from pathlib import Path

import pytest
import yaml
from fixtures_data import llava, write_json

from swim.data.mixture import MixtureConfig, MixtureError, SamplingStrategy, load_mixture, load_mixture_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, total, expected",
    [
        ("all", 5, [0, 1, 2, 3, 4]),
        ("first:2", 5, [0, 1]),
        ("end:2", 5, [3, 4]),
        ("first:10", 3, [0, 1, 2]),
        ("first:50%", 5, [0, 1, 2]),  # ceil(2.5)
        ("end:1%", 5, [4]),  # ceil(0.05)
        ("first:0", 5, []),
    ],
)
def test_strategies(text, total, expected):
    assert SamplingStrategy.parse(text).select(total, random.Random(0)) == expected


def test_random_is_seeded_and_sized():
    s = SamplingStrategy.parse("random:30%")
    a = s.select(100, random.Random("42:0"))
    assert len(a) == 30 and a == sorted(set(a))
    assert a == s.select(100, random.Random("42:0")) and a != s.select(100, random.Random("43:0"))
    assert str(s) == "random:30%" and str(SamplingStrategy.parse("end:7")) == "end:7"


@pytest.mark.parametrize("bad", ["some", "first:", "first:-1", "random:x", "first:120%", "last:3"])
def test_bad_strategy(bad):
    with pytest.raises(ValueError):
        SamplingStrategy.parse(bad)


def test_load_mixture(tmp_path):
    (tmp_path / "a").mkdir()
    write_json(tmp_path / "a" / "one.json", [llava(f"v{i}.mp4") for i in range(10)])
    write_json(tmp_path / "two.json", [llava(f"w{i}.mp4") for i in range(4)])
    cfg = {"datasets": [
        {"json_path": "a/one.json", "sampling_strategy": "random:50%"},
        {"json_path": str(tmp_path / "two.json"), "data_root": "media", "sampling_strategy": "end:1"},
    ]}  # fmt: skip
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(cfg))
    recs, problems = load_mixture(tmp_path / "mix.yaml", seed=1)
    assert len(recs) == 6 and problems == []
    assert all(r.media[1].parent == tmp_path / "a" for r in recs[:5])  # default data_root: the json's folder
    assert (
        recs[5].media[1] == (tmp_path / "media" / "w3.mp4").resolve()
    )  # relative data_root: the YAML's root
    again, _ = load_mixture(tmp_path / "mix.yaml", seed=1)
    assert [r.video for r in again] == [r.video for r in recs]
    other, _ = load_mixture(tmp_path / "mix.yaml", seed=2)
    assert [r.video for r in other[:5]] != [r.video for r in recs[:5]]


@pytest.mark.parametrize(
    "data, match",
    [
        ({}, "datasets: missing"),
        ({"datasets": []}, "datasets: empty"),
        ({"datasets": [{"json_path": "a.json"}, {"sampling_strategy": "all"}]}, r"datasets\[1\]\.json_path"),
        ({"datasets": [{"json_path": "a.txt"}]}, r"datasets\[0\]\.json_path: must end in"),
        (
            {"datasets": [{"json_path": "a.json", "sampling_strategy": "most"}]},
            r"datasets\[0\]\.sampling_strategy",
        ),
        ({"datasets": [{"json_path": "a.json", "data_root": 3}]}, r"datasets\[0\]\.data_root"),
        ({"datasets": [{"json_path": "a.json", "weight": 2}]}, r"datasets\[0\]\.weight: unknown key"),
        ({"datasets": ["a.json"]}, r"datasets\[0\]\.<entry>"),
    ],
)
def test_config_errors_name_entry_and_field(data, match):
    with pytest.raises(MixtureError, match=match):
        MixtureConfig.from_dict(data, source="mix.yaml")


def test_missing_json_named(tmp_path):
    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: nope.json\n")
    with pytest.raises(MixtureError, match=r"datasets\[0\]\.json_path: not found"):
        load_mixture(tmp_path / "mix.yaml")


def test_shipped_configs_parse():
    cfg = load_mixture_config(REPO / "data_config" / "videorefer.yaml")
    names = [e.json_path.name for e in cfg.datasets]
    assert names[:5] == [f"refined-format-videorefer-{s}.json" for s in
                         ("detailed-caption-0-12k", "detailed-caption-12-50k", "detailed-caption-50-100k-fliter",
                          "detailed-caption-100-125k", "qa-0-10k")]  # fmt: skip
    assert names[5].startswith("filtered_valid_llava_video_178k_")
    assert cfg.datasets[0].json_path == REPO / "data" / "NL-Refer" / "train" / names[0]
    assert all(str(e.sampling_strategy) == "all" for e in cfg.datasets)
    syn = load_mixture_config(REPO / "data_config" / "synthetic.yaml")
    assert syn.datasets[0].json_path.name == "train.json"
