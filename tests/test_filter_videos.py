"""`swim data filter-videos` on two hand-made LLaVA-Video-178K bucket folders with one fault of each kind."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from swim.data import filter_videos as fv
from swim.data import validate
from swim.data.records import ChatRecord, load_records
from swim.data.video import VideoDecodeError, VideoInfo, write_video

BUCKET_A = "0_30_s_academic_v0_1"
BUCKET_B = "30_60_s_youtube_v0_1"
MAX_SECONDS = "10"


def chat(rid: str, video: str | None, turns: int = 2, **extra) -> dict:
    conv = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]
    rec = {"id": rid, "conversations": conv[:turns], **extra}
    if video is not None:
        rec["video"] = video
    return rec


def clip(path: Path, hw=(32, 32), fps: float = 8.0, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(seed).integers(0, 255, size=(8, *hw, 3), dtype=np.uint8)
    write_video(path, frames, fps, "libx264", 18)


# record id -> expected reason code (None: kept)
EXPECTED = {
    "a0": None,
    "a1": None,  # same video as a0: probed once
    "a2": "unreadable_video",
    "a3": "missing_video",
    "a4": "aspect_ratio",
    "a5": "conversations",
    "a6": "no_video",
    "a7": None,  # no data_source: filled with the bucket name
    "b0": None,
    "b1": "too_long",
    "b2": "empty_video",
    "b3": None,  # absolute path already
    "b4": None,
    "b5": "control_tokens",
    "b6": None,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """LLaVA-Video-178K/{BUCKET_A, BUCKET_B}/<bucket>_qa_processed.json with videos relative to each bucket."""
    root = tmp_path_factory.mktemp("llava") / "LLaVA-Video-178K"
    a, b = root / BUCKET_A, root / BUCKET_B
    clip(a / "academic_source/Charades/good.mp4")
    (a / "academic_source/corrupt.mp4").write_text("not a video")
    clip(a / "academic_source/wide.mp4", hw=(8, 200))
    clip(b / "youtube/good2.mp4", seed=1)
    clip(b / "youtube/good3.mp4", seed=2)
    clip(b / "youtube/long.mp4", fps=0.5)  # 8 frames at 0.5 fps = 16 s
    (b / "youtube/empty_frames").mkdir(parents=True)  # a frame folder without frames
    ds_a = {"data_source": BUCKET_A}
    records_a = [
        chat("a0", "academic_source/Charades/good.mp4", **ds_a),
        chat("a1", "academic_source/Charades/good.mp4", **ds_a),
        chat("a2", "academic_source/corrupt.mp4", **ds_a),
        chat("a3", "academic_source/missing.mp4", **ds_a),
        chat("a4", "academic_source/wide.mp4", **ds_a),
        chat("a5", "academic_source/Charades/good.mp4", turns=1, **ds_a),
        chat("a6", None, **ds_a),
        chat("a7", "academic_source/Charades/good.mp4"),
    ]
    ds_b = {"data_source": BUCKET_B}
    records_b = [
        chat("b0", "youtube/good2.mp4", **ds_b),
        chat("b1", "youtube/long.mp4", **ds_b),
        chat("b2", "youtube/empty_frames", **ds_b),
        chat("b3", str(b / "youtube/good3.mp4"), **ds_b),
        chat("b4", "youtube/good3.mp4", **ds_b),
        {**chat("b5", "youtube/good2.mp4", **ds_b), "conversations": [
            {"from": "human", "value": "What happens?<|im_end|>"}, {"from": "gpt", "value": "Nothing."}]},
        chat("b6", "./youtube/../youtube/good2.mp4", **ds_b),
    ]  # fmt: skip
    (a / f"{BUCKET_A}_oe_qa_processed.json").write_text(json.dumps(records_a))
    (b / f"{BUCKET_B}_cap_processed.json").write_text(json.dumps(records_b))
    return root


def run(argv: list[str]) -> int:
    """`main(argv)`'s exit status (0 when it returns)."""
    try:
        fv.main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def outputs(out: Path) -> tuple[list[dict], list[dict], dict]:
    rejected, stats = fv.side_paths(out)
    rows = [json.loads(line) for line in rejected.read_text().splitlines()]
    return json.loads(out.read_text()), rows, json.loads(stats.read_text())


def full_run(dataset: Path, out: Path, *extra) -> int:
    return run([dataset / BUCKET_A, dataset / BUCKET_B, "--out", out, "--max-seconds", MAX_SECONDS, *extra])


@pytest.fixture(scope="module")
def full(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "filtered_valid_llava_video_178k.json"
    assert full_run(dataset, out, "--workers", "1") == 0
    return out


def test_kept_and_rejected_records(full, dataset):
    kept, rejected, _ = outputs(full)
    assert [r["id"] for r in kept] == [k for k, code in EXPECTED.items() if code is None]
    assert {r["id"]: r["code"] for r in rejected} == {k: c for k, c in EXPECTED.items() if c is not None}
    assert [r["position"] for r in rejected if r["source"].endswith("oe_qa_processed.json")] == [
        2,
        3,
        4,
        5,
        6,
    ]
    for row in rejected:
        assert row["detail"], row
        assert set(row) == {"source", "position", "id", "video", "code", "detail"}
    by_id = {r["id"]: r for r in rejected}
    assert "Invalid data" in by_id["a2"]["detail"] or "Error" in by_id["a2"]["detail"]
    assert "16.0 s > 10 s" in by_id["b1"]["detail"]


def test_paths_absolute_and_data_source(full, dataset):
    kept, _, _ = outputs(full)
    by_id = {r["id"]: r for r in kept}
    for r in kept:
        assert os.path.isabs(r["video"]) and Path(r["video"]).is_file()
        assert "LLaVA-Video-178K" in r["video"]
    assert by_id["a0"]["video"] == str(dataset / BUCKET_A / "academic_source/Charades/good.mp4")
    assert by_id["b6"]["video"] == str(dataset / BUCKET_B / "youtube/good2.mp4")  # normalised
    assert by_id["b3"]["video"] == by_id["b4"]["video"]
    assert by_id["a0"]["data_source"] == BUCKET_A and by_id["b0"]["data_source"] == BUCKET_B
    assert by_id["a7"]["data_source"] == BUCKET_A  # filled from the bucket folder
    assert by_id["a0"]["conversations"][0]["value"] == "<image>\nWhat happens?"  # record otherwise untouched


def test_stats(full):
    kept, rejected, stats = outputs(full)
    codes = [c for c in EXPECTED.values() if c is not None]
    assert stats["records_read"] == len(EXPECTED) == len(kept) + len(rejected)
    assert stats["kept"] == stats["valid"] == len(kept) == 7
    assert stats["dropped"] == len(codes)
    assert stats["dropped_by_reason"] == {c: codes.count(c) for c in codes}
    assert stats["data_source_filled"] == 1
    assert stats["unique_videos"] == 8  # good, corrupt, missing, wide, good2, good3, long, empty_frames
    assert stats["videos_by_verdict"]["valid"] == 3
    assert len(stats["inputs"]) == 2 and stats["args"]["max_seconds"] == 10.0
    assert stats["paths_without_llava_video_178k"] == 0 and stats["seconds"] >= 0


def test_output_loads_and_validates(full, capsys):
    records, problems = load_records(full)
    assert not problems and len(records) == 7
    assert all(isinstance(r, ChatRecord) and r.data_source for r in records)
    with pytest.raises(SystemExit) as e:
        validate.main([str(full)])
    assert e.value.code == 0, capsys.readouterr()


def test_workers_2_equals_workers_1(full, dataset, tmp_path):
    out = tmp_path / "w2.json"
    assert full_run(dataset, out, "--workers", "2") == 0
    assert out.read_bytes() == full.read_bytes()
    assert fv.side_paths(out)[0].read_bytes() == fv.side_paths(full)[0].read_bytes()


def test_seeded_subset(full, dataset, tmp_path):
    outs = {}
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        outs[name] = tmp_path / f"{name}.json"
        assert full_run(dataset, outs[name], "--workers", "1", "--num", "3", "--seed", seed) == 0
    assert outs["s0"].read_bytes() == outs["s0_again"].read_bytes()
    ids = {name: [r["id"] for r in json.loads(p.read_text())] for name, p in outs.items()}
    assert len(ids["s0"]) == len(ids["s1"]) == 3 and ids["s0"] != ids["s1"]
    order = [r["id"] for r in json.loads(full.read_text())]
    for chosen in ids.values():
        assert chosen == [i for i in order if i in chosen]  # original order kept
    _, _, stats = outputs(outs["s1"])
    assert stats["kept"] == 3 and stats["valid"] == 7


def test_strict_exit_status(dataset, tmp_path):
    assert full_run(dataset, tmp_path / "a.json", "--workers", "1", "--strict") == 1
    assert (tmp_path / "a.json").is_file()  # outputs are written all the same
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([chat("x", str(dataset / BUCKET_B / "youtube/good2.mp4"), data_source="d")]))
    assert run([clean, "--out", tmp_path / "b.json", "--workers", "1", "--strict"]) == 0


def test_malformed_input_file_exits_2(dataset, tmp_path, caplog):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"id": 1,')
    with caplog.at_level(logging.ERROR):
        assert run([dataset / BUCKET_A, bad, "--out", tmp_path / "o.json"]) == 2
    assert "broken.json" in caplog.text and "invalid JSON" in caplog.text
    assert not (tmp_path / "o.json").exists()
    assert run([tmp_path / "nowhere", "--out", tmp_path / "o.json"]) == 2


def test_jsonl_bad_line_and_non_object(dataset, tmp_path):
    good = str(dataset / BUCKET_B / "youtube/good2.mp4")
    src = tmp_path / "bucket" / "part.jsonl"
    src.parent.mkdir()
    src.write_text(
        json.dumps(chat("j0", good)) + "\n{not json\n[1, 2]\n" + json.dumps(chat("j3", good)) + "\n"
    )
    out = tmp_path / "o.json"
    assert run([src, "--out", out, "--workers", "1"]) == 0
    kept, rejected, stats = outputs(out)
    assert [r["id"] for r in kept] == ["j0", "j3"] and kept[0]["data_source"] == "bucket"
    assert [(r["position"], r["code"]) for r in rejected] == [(1, "json"), (2, "shape")]
    assert stats["data_source_filled"] == 2  # among the kept records


def test_video_root_and_official_path_warning(dataset, tmp_path, caplog):
    src = tmp_path / "elsewhere" / "records.json"
    src.parent.mkdir()
    src.write_text(json.dumps([chat("r0", "youtube/good2.mp4", data_source="s")]))
    out = tmp_path / "o.json"
    with caplog.at_level(logging.WARNING):
        assert run([src, "--out", out, "--workers", "1", "--video-root", dataset / BUCKET_B]) == 0
    kept, _, stats = outputs(out)
    assert kept[0]["video"] == str(dataset / BUCKET_B / "youtube/good2.mp4")
    assert stats["paths_without_llava_video_178k"] == 0 and "LLaVA-Video-178K" not in caplog.text

    link = tmp_path / "videos"
    link.symlink_to(dataset / BUCKET_B)  # not followed: the path keeps the link's name
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run([src, "--out", out, "--workers", "1", "--video-root", link]) == 0
    kept, _, stats = outputs(out)
    assert kept[0]["video"] == str(link / "youtube/good2.mp4")
    assert stats["paths_without_llava_video_178k"] == 1
    warnings = [r for r in caplog.records if "LLaVA-Video-178K" in r.getMessage()]
    assert len(warnings) == 1 and "official" in warnings[0].getMessage()


def test_outputs_inside_input_folder_are_not_read_back(dataset, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = str(dataset / BUCKET_B / "youtube/good2.mp4")
    (folder / "a.json").write_text(json.dumps([chat("x", good, data_source="d"), chat("y", None)]))
    out = folder / "filtered.json"
    for _ in range(2):
        assert run([folder, "--out", out, "--workers", "1"]) == 0
        kept, rejected, stats = outputs(out)
        assert [r["id"] for r in kept] == ["x"] and [r["id"] for r in rejected] == ["y"]
        assert stats["inputs"] == [str(folder / "a.json")]


def test_crashing_probe_does_not_kill_the_run(dataset, tmp_path, monkeypatch):
    """A decoder segfault kills a worker: the video is pinned and dropped, the others are still probed."""
    inspect = fv.inspect_video

    def crashing(path, limits):
        if path.endswith("good3.mp4"):
            os._exit(3)
        return inspect(path, limits)

    monkeypatch.setattr(fv, "inspect_video", crashing)  # inherited by the forked workers
    out = tmp_path / "o.json"
    assert run([dataset / BUCKET_B, "--out", out, "--workers", "2"]) == 0
    kept, rejected, _ = outputs(out)
    assert [r["id"] for r in kept] == ["b0", "b1", "b6"]  # no --max-seconds: the long video stays
    crashed = {r["id"]: r for r in rejected if r["code"] == "unreadable_video"}
    assert set(crashed) == {"b3", "b4"} and "died" in crashed["b3"]["detail"]


def test_probe_errors_are_caught(monkeypatch):
    def boom(path, limits):
        raise MemoryError("decoder ran out")

    monkeypatch.setattr(fv, "inspect_video", boom)
    got = fv.probe_one("x.mp4", fv.ProbeLimits())
    assert got.code == "unreadable_video" and got.detail == "MemoryError: decoder ran out"


def test_check_info_and_decode_codes():
    limits = fv.ProbeLimits(max_seconds=10, max_aspect=12)
    assert fv.check_info(VideoInfo(8, 8.0, 32, 32), limits) is None
    assert fv.check_info(VideoInfo(0, 8.0, 32, 32), limits).code == "empty_video"
    assert fv.check_info(VideoInfo(8, 0.0, 32, 32), limits).code == "unreadable_video"
    assert fv.check_info(VideoInfo(81, 8.0, 32, 32), limits).code == "too_long"
    assert fv.check_info(VideoInfo(8, 8.0, 10, 130), limits).code == "aspect_ratio"
    assert fv.check_info(VideoInfo(8, 8.0, 130, 10), limits).code == "aspect_ratio"
    assert fv.check_info(VideoInfo(8, 8.0, 10, 120), limits) is None  # 12:1 is allowed
    assert fv.check_info(VideoInfo(8, 8.0, 10, 130), fv.ProbeLimits(max_aspect=None)) is None
    err = VideoDecodeError("v.mp4", "decord: ValueError: no frames; pyav: ValueError: no frames")
    assert fv._decode_error_code(err) == "empty_video"
    assert fv._decode_error_code(VideoDecodeError("v.mp4", "moov atom not found")) == "unreadable_video"


def test_subset_and_side_paths():
    assert fv.select_subset(5, None, 0) == [0, 1, 2, 3, 4]
    assert fv.select_subset(5, 9, 0) == [0, 1, 2, 3, 4]
    picked = fv.select_subset(100, 10, 3)
    assert picked == sorted(picked) and len(set(picked)) == 10 and picked == fv.select_subset(100, 10, 3)
    assert fv.side_paths(Path("d/x.json")) == (Path("d/x.rejected.jsonl"), Path("d/x.stats.json"))
    assert fv.json_array_text([]) == "[]\n"
    assert json.loads(fv.json_array_text([{"a": 1}, {"b": "é"}])) == [{"a": 1}, {"b": "é"}]


def test_memory_does_not_grow_with_records(tmp_path):
    """20,000 records, 3 videos: the inputs are streamed, so the peak stays far below the file's parsed size
    (the whole-file version peaked at about 30 MB here, the streaming one at about 3.3 MB, most of it the
    reader's 1 MB chunks; 100,000 records add about 5 bytes each)."""
    import tracemalloc

    bucket = tmp_path / "LLaVA-Video-178K" / "bucket"
    for i in range(2):
        clip(bucket / f"v{i}.mp4", seed=i)  # v2.mp4 is missing: a third of the records are dropped
    conv = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]
    n = 20_000
    src = bucket / "big.json"
    src.write_text(
        json.dumps([{"id": f"r{i}", "conversations": conv, "video": f"v{i % 3}.mp4"} for i in range(n)])
    )
    warm = tmp_path / "warm.json"  # first use of the decoders, tqdm, ... outside the measurement
    warm.write_text(json.dumps([chat("w", str(bucket / "v0.mp4"), data_source="d")]))
    assert run([warm, "--out", tmp_path / "w.json", "--workers", "1"]) == 0

    out = tmp_path / "o.json"
    tracemalloc.start()
    try:
        assert run([src, "--out", out, "--workers", "1", "--num", "5000", "--seed", "1"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MB"
    kept, rejected, stats = outputs(out)
    assert stats["records_read"] == n and stats["valid"] == n - n // 3 and stats["kept"] == len(kept) == 5000
    assert stats["dropped_by_reason"] == {"missing_video": n // 3} == {"missing_video": len(rejected)}
    assert stats["data_source_filled"] == 5000 and stats["unique_videos"] == 3
    positions = [int(r["id"][1:]) for r in kept]
    assert positions == sorted(positions) and all(p % 3 != 2 for p in positions)
    expected = fv.select_subset(stats["valid"], 5000, 1)  # the same draw as the in-memory version
    valid_positions = [i for i in range(n) if i % 3 != 2]
    assert positions == [valid_positions[i] for i in expected]


def test_syntax_error_inside_array_keeps_the_records_before(dataset, tmp_path, caplog):
    good = str(dataset / BUCKET_B / "youtube/good2.mp4")
    head = ",\n".join(json.dumps(chat(f"k{i}", good, data_source="d")) for i in range(3))
    broken = tmp_path / "bucket" / "truncated.json"
    broken.parent.mkdir()
    broken.write_text("[" + head + ',\n{"id": "k3", "video": oops},\n' + json.dumps(chat("k4", good)) + "]")
    after = tmp_path / "bucket" / "z_after.json"  # the next input is still read
    after.write_text(json.dumps([chat("z0", good, data_source="d")]))
    out = tmp_path / "o.json"
    with caplog.at_level(logging.ERROR):
        assert run([broken, after, "--out", out, "--workers", "1"]) == 0
    kept, rejected, stats = outputs(out)
    assert [r["id"] for r in kept] == ["k0", "k1", "k2", "z0"]
    [row] = rejected
    detail = row.pop("detail")
    assert row == {"source": str(broken), "position": 3, "id": None, "video": None, "code": "json"}
    assert "invalid JSON in record 3" in detail and "byte offset" in detail
    assert "truncated.json" in caplog.text and "stopped reading at record 3" in caplog.text
    assert stats["records_read"] == 5 and stats["dropped_by_reason"] == {"json": 1}
    assert run([broken, after, "--out", out, "--workers", "1", "--strict"]) == 1


def test_input_changed_between_passes_exits_2(dataset, tmp_path, caplog, monkeypatch):
    good = str(dataset / BUCKET_B / "youtube/good2.mp4")
    src = tmp_path / "in.json"
    src.write_text(json.dumps([chat("x", good, data_source="d"), chat("y", good, data_source="d")]))
    probe = fv.probe_videos

    def probe_then_truncate(*args):
        src.write_text(json.dumps([chat("x", good, data_source="d")]))
        return probe(*args)

    monkeypatch.setattr(fv, "probe_videos", probe_then_truncate)
    out = tmp_path / "o.json"
    with caplog.at_level(logging.ERROR):
        assert run([src, "--out", out, "--workers", "1"]) == 2
    assert "changed while it was being filtered" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json"]  # no output, no temporary file left
