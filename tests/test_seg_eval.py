"""Referring-segmentation readers (MeViS, Ref-YouTube-VOS, RefCOCO layouts), `swim validate --layout`, and the
`swim eval rvos` / `swim eval refcoco` pipelines on an untrained head (plumbing, consistency, resume, shards)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from swim.data.masks import decode_segmentation
from swim.data.records import load_records
from swim.data.refcoco import load_refcoco, validate_refcoco
from swim.data.rvos import expression_record, load_layout, validate_layout
from swim.data.rvos import main as rvos_main
from swim.data.synth.shapes import generate
from swim.eval.segmentation import region_similarity
from swim.seg.sam2 import build_tiny_sam2
from tests.fixtures_seg import CFG, mevis_split, refcoco_root, seg_checkpoint, ytvos_root

VIDEO = ["--num-frames", "4", "--max-frames", "4", "--min-pixels", "3136", "--max-pixels", "4096",
         "--system-prompt", "You are a helpful assistant."]  # fmt: skip


def test_mevis_reader_unions_objects_and_converts_to_records(tmp_path):
    split = mevis_split(tmp_path / "mevis" / "train")
    expressions = load_layout(split, "mevis")
    assert [e.key for e in expressions[:3]] == ["vid0/0", "vid0/1", "vid0/2"] and len(expressions) == 6
    one, other, both = (e.masks() for e in expressions[:3])
    assert all((b == (x | y)).all() for b, x, y in zip(both, one, other)) and both[0].any()
    assert validate_layout(split, "mevis") == (6, [])
    rvos_main(["mevis", str(split), str(tmp_path / "mevis.json")])
    records, problems = load_records(tmp_path / "mevis.json")
    assert not problems and len(records) == 6
    assert records[2].conversations[0].text == "Please segment <ins>both shapes</ins>."
    decoded = decode_segmentation(records[2].annotation[0]["1"]["segmentation"]).astype(bool)
    assert (decoded == both[1]).all()
    seg_token = expression_record(expressions[0], query="seg_token")
    assert seg_token["conversations"][1]["value"] == "Sure, [SEG]."


def test_mevis_validation_names_the_problems(tmp_path):
    split = mevis_split(tmp_path / "m")
    meta = json.loads((split / "meta_expressions.json").read_text())
    meta["videos"]["vid0"]["expressions"]["0"]["anno_id"] = [99]
    meta["videos"]["vid1"]["expressions"]["1"]["exp"] = ""
    (split / "meta_expressions.json").write_text(json.dumps(meta))
    (split / "JPEGImages" / "vid1" / "00002.jpg").unlink()
    n, problems = validate_layout(split, "mevis")
    codes = sorted((p.index, p.field, p.code) for p in problems)
    assert n == 6 and codes == [
        (0, "anno_id", "mask_decode"),
        (3, "frames", "missing_video"),
        (4, "exp", "shape"),
    ]
    assert "vid1" in str(problems[1]) and "meta_expressions.json:3: frames:" in str(problems[1])


def test_ytvos_reader_and_validation(tmp_path):
    root = ytvos_root(tmp_path / "ytvos", split="train")
    expressions = load_layout(root, "ytvos", "train")
    assert len(expressions) == 4 and all(e.has_masks for e in expressions)
    ids = np.asarray(Image.open(root / "train" / "Annotations" / "yt0" / "00001.png"))
    assert (expressions[1].masks()[1] == (ids == 2)).all()
    assert validate_layout(root, "ytvos", "train") == (4, [])
    shutil.rmtree(root / "train" / "Annotations" / "yt1")
    assert not load_layout(root, "ytvos", "train")[3].has_masks  # like the server-only valid split


def test_refcoco_reader_and_validation(tmp_path):
    root = refcoco_root(tmp_path / "refer_seg")
    samples = load_refcoco(root, "refcoco", "val")
    assert len(samples) == 8 and samples[1].key == "0/1" and samples[0].mask().any()
    assert validate_refcoco(root, "refcoco", "val") == (8, [])
    (root / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000001.jpg").unlink()
    _, problems = validate_refcoco(root, "refcoco", "val")
    assert {p.code for p in problems} == {"missing_image"} and len(problems) == 4


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_eval")
    sam = build_tiny_sam2(out / "sam2", hidden=32)
    return seg_checkpoint(tiny_ckpt, out / "ckpt", sam, mba_mode="fixed", mba_prior="swim_attn", mba_heads=4,
                          prior_layers=[1, 3])  # fmt: skip


def test_eval_rvos_on_records_and_on_a_mevis_split(checkpoint, tmp_path):
    from swim.eval.rvos import run

    records = generate(tmp_path / "synth", CFG, seed=0, counts={"val": 2})["val"]
    result = run(["--model", str(checkpoint), "--data", str(records), "--out", str(tmp_path / "r"), *VIDEO])
    assert (
        result["summary"]["expressions"] == 2 and 0 <= result["summary"]["JF"] <= 1 and result["missing"] == 0
    )
    # MeViS layout, with the server PNGs: the stored J equals J recomputed from the PNGs
    split = mevis_split(tmp_path / "mevis", n_videos=1)
    out = tmp_path / "m"
    args = [
        "--model",
        str(checkpoint),
        "--data",
        str(split),
        "--layout",
        "mevis",
        "--out",
        str(out),
        "--png",
        *VIDEO,
    ]
    result = run(args)
    assert result["summary"]["expressions"] == 3 and "per expression" in result["protocol"]
    both = load_layout(split, "mevis")[2]
    pngs = [np.asarray(Image.open(out / "Annotations" / "vid0" / "2" / f"{n}.png")) for n in both.frame_names]
    assert {int(v) for p in pngs for v in np.unique(p)} <= {0, 255}
    recomputed = np.mean([region_similarity(p > 0, g) for p, g in zip(pngs, both.masks())])
    stored = next(e for e in result["expressions"] if e["key"] == "vid0/2")
    assert stored["J"] == pytest.approx(recomputed)
    # resumable: a second run evaluates nothing and reproduces the summary; sharded runs merge to the same
    lines = (out / "rvos.jsonl").read_text()
    assert run(args)["summary"] == result["summary"] and (out / "rvos.jsonl").read_text() == lines
    sharded = [*args[: -len(VIDEO) - 1], *VIDEO]  # no PNGs
    sharded[sharded.index(str(out))] = str(tmp_path / "s")
    for index in ("0", "1"):
        assert run([*sharded, "--num-shards", "2", "--shard-index", index]) is None
    assert run([*sharded, "--num-shards", "2", "--merge"])["summary"] == pytest.approx(result["summary"])


def test_eval_rvos_propagates_from_key_frames(checkpoint, tmp_path):
    from swim.eval.rvos import run

    video = build_tiny_sam2(tmp_path / "video", video=True)
    records = generate(tmp_path / "synth", CFG, seed=1, counts={"val": 1})["val"]
    result = run(["--model", str(checkpoint), "--data", str(records), "--out", str(tmp_path / "p"), "--mode",
                  "propagate", "--sam2-video", str(video), "--num-key-frames", "1", *VIDEO])  # fmt: skip
    assert result["summary"]["expressions"] == 1 and result["config"]["mode"] == "propagate"


def test_eval_refcoco(checkpoint, tmp_path):
    from swim.eval.refcoco import run

    root = refcoco_root(tmp_path / "refer_seg", n_images=1)
    result = run(["--model", str(checkpoint), "--data", str(root), "--out", str(tmp_path / "c"), *VIDEO])
    rows = [json.loads(line) for line in (tmp_path / "c" / "refcoco.jsonl").read_text().splitlines()[1:]]
    assert result["samples"] == len(rows) == 4 and result["missing"] == 0
    assert result["cIoU"] == pytest.approx(
        sum(r["intersection"] for r in rows) / sum(r["union"] for r in rows)
    )


def test_eval_rvos_on_a_split_without_masks_writes_the_server_format(checkpoint, tmp_path):
    from swim.eval.rvos import run

    split = mevis_split(
        tmp_path / "valid", n_videos=1, masks=False
    )  # like MeViS `valid`: scored on the server only
    with pytest.raises(ValueError, match="no masks to train on"):
        rvos_main(["mevis", str(split), str(tmp_path / "train.json")])
    result = run(["--model", str(checkpoint), "--data", str(split), "--layout", "mevis", "--out", str(tmp_path / "v"),
                  "--png", "--limit", "1", *VIDEO])  # fmt: skip
    assert result["summary"]["expressions"] == 0 and result["missing"] == 0
    assert sorted(p.name for p in (tmp_path / "v" / "Annotations" / "vid0" / "0").iterdir()) == [
        f"{t:05d}.png" for t in range(4)
    ]


def test_infer_segment_writes_mask_overlays(checkpoint, tmp_path):
    from swim.eval.infer import run

    video = (
        generate(tmp_path / "synth", CFG, seed=2, counts={"val": 1})["val"].parent
        / "videos"
        / "val_00000.mp4"
    )
    run(["--model", str(checkpoint), "--video", str(video), "--question", "Describe the red <ins>circle</ins>.",
         "--max-new-tokens", "4", "--segment", str(tmp_path / "overlays"), *VIDEO])  # fmt: skip
    grid = np.asarray(Image.open(tmp_path / "overlays" / "masks.png"))
    gif = Image.open(tmp_path / "overlays" / "masks.gif")
    assert grid.ndim == 3 and gif.n_frames == 4 and gif.size == (64, 64)
