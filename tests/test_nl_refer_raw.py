"""swim.data.nl_refer.raw: raw VideoRefer-700K / Bench records -> placeholders, checks, "format" step."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from swim.data.masks import decode_segmentation, encode_mask
from swim.data.nl_refer.raw import (
    BENCH_D_SOURCE_QUESTION,
    CODES,
    KINDS,
    InputProblem,
    RawRecord,
    RawRecordError,
    check_raw,
    formatted,
    iter_raw,
    make_index,
    parse_placeholders,
    read_raw,
)
from swim.data.video import VideoInfo, write_video

H, W, T = 16, 24, 4


def _mask(y0=2, x0=3, size=5) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0 : y0 + size, x0 : x0 + size] = 1
    return m


RLE = encode_mask(_mask())
RLE2 = encode_mask(_mask(8, 12, 4))


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [H, W], "counts": runs}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    (d / "videos").mkdir()
    frames = np.zeros((T, H, W, 3), np.uint8)
    frames[:, 2:7, 3:8] = 200
    write_video(d / "videos" / "a.mp4", frames, fps=2.0)
    (d / "videos" / "broken.mp4").write_bytes(b"not a video at all")
    return d


def _train(question: str, answer: str, n: int = 1, **extra) -> dict:
    ann = [{"0": {"segmentation": RLE}, "2": {"segmentation": None}} for _ in range(n)]
    return {
        "id": "r1",
        "video": "videos/a.mp4",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "annotation": ann,
        "ratio": 0.8,
        **extra,
    }


def _bench_q(question: str, n: int = 2, **extra) -> dict:
    return {
        "id": 0,
        "video": "videos/a.mp4",
        "Question": question,
        "type": "Basic Questions",
        "options": ["(A) A helmet", "(B) A hat"],
        "Answer": "(A) A helmet",
        "frame_idx": "1",
        "annotation": [{"0": {"segmentation": RLE}, "3": {"segmentation": RLE2}} for _ in range(n)],
        **extra,
    }


def _read(obj, kind="qa", data_dir=None, **kw):
    source = str((data_dir or Path("/data")) / "videorefer-qa-75k.json")
    return read_raw(obj, kind=kind, source=source, position=7, **kw)


def _spans(rec: RawRecord) -> list[tuple[int, str, bool]]:
    return [(m.object, rec.text(m.turn)[m.start : m.end], m.intro) for m in rec.mentions]


def _codes(obj, kind="qa", data_dir=None, probe=None, max_objects=5) -> list[str]:
    try:
        rec = _read(obj, kind, data_dir)
    except RawRecordError as e:
        return list(e.codes)
    return [c for c, _ in check_raw(rec, probe=probe, max_objects=max_objects)]


# ---------------------------------------------------------------------------------------------------------
# Placeholders


def test_parse_placeholders_grammar():
    text = "<object0><region>, <object1> [<region>], <object2> <region>, <region>; <object1> <object>"
    got = [(p.text, p.object_id, p.intro, p.malformed) for p in parse_placeholders(text, "question")]
    assert got == [
        ("<object0><region>", 0, True, False),
        ("<object1> [<region>]", 1, True, False),
        ("<object2> <region>", 2, True, False),
        ("<region>", None, True, False),
        ("<object1>", 1, False, False),
        ("<object>", None, False, True),
    ]
    assert all(text[p.start : p.end] == p.text for p in parse_placeholders(text, "question"))


def test_single_region_detailed_caption(data_dir):
    rec = _read(_train("<video>\nWhat is <region> doing?", "It runs."), "detailed", data_dir)
    assert rec.question == "What is <region> doing?" and rec.answer == "It runs."
    assert rec.n_objects == 1 and rec.object_ids() == [None]
    assert _spans(rec) == [(0, "<region>", True)]
    assert rec.video == str(data_dir / "videos" / "a.mp4") and Path(rec.video).is_absolute()
    assert rec.id == "r1" and rec.position == 7 and rec.kind == "detailed"
    # "\n<video>" at the end is a media placeholder too; video_root overrides the file's folder
    rec = _read(_train("What is <region> doing?\n<video>", "It runs."), "detailed", video_root="/media")
    assert rec.question == "What is <region> doing?" and rec.video == "/media/videos/a.mp4"


def test_multi_object_qa_with_back_references():
    q = "<video>\nThere are 2 objects in the video: <object0><region>, <object1><region>.\nWhat is <object1> doing to <object0>?"
    rec = _read(_train(q, "<object1> pushes <object0> away.", n=2))
    assert rec.object_ids() == [0, 1]
    assert _spans(rec) == [
        (0, "<object0><region>", True),
        (1, "<object1><region>", True),
        (1, "<object1>", False),
        (0, "<object0>", False),
        (1, "<object1>", False),
        (0, "<object0>", False),
    ]
    assert [m.turn for m in rec.mentions] == ["question"] * 4 + ["answer"] * 2


def test_bracketed_and_spaced_introductions():
    q = "<video>\nThere are two objects: <object0> [<region>], <object1> <region>. Is <object0> taller?"
    rec = _read(_train(q, "Yes, <object0> is.", n=2))
    assert _spans(rec)[:2] == [(0, "<object0> [<region>]", True), (1, "<object1> <region>", True)]
    assert _spans(rec)[2:] == [(0, "<object0>", False), (0, "<object0>", False)]


def test_bench_q_object_ids_are_not_annotation_indices():
    rec = _read(_bench_q("Is <object3><region> left of <object1><region>? Look at <object3>."), "bench_q")
    assert rec.object_ids() == [3, 1]
    assert _spans(rec) == [
        (0, "<object3><region>", True),
        (1, "<object1><region>", True),
        (0, "<object3>", False),
    ]
    assert rec.answer == "(A) A helmet" and "qa" not in rec.index


def test_bench_d_source_question():
    obj = {"id": 0, "video": "x.mp4", "caption": "The cub rests.", "frame_idx": "2",
           "annotation": [{"2": {"segmentation": RLE}}]}  # fmt: skip
    rec = _read(obj, "bench_d")
    assert rec.question == BENCH_D_SOURCE_QUESTION and rec.answer == "The cub rests."
    assert _spans(rec) == [(0, "<region>", True)]


# ---------------------------------------------------------------------------------------------------------
# Reason codes

ONE = "<video>\nWhat is <region> doing?"


def _with_seg(seg, **extra):
    return _train(ONE, "It runs.", annotation=[{"0": {"segmentation": seg}}], **extra)


@pytest.mark.parametrize(
    ("kind", "obj"),
    [
        ("qa", _train(ONE, "x") | {"conversations": [{"from": "human", "value": ONE}]}),
        (
            "qa",
            _train(ONE, "x")
            | {
                "conversations": [
                    {"from": "human", "value": ONE},
                    {"from": "gpt", "value": "a"},
                    {"from": "human", "value": "more?"},
                ]
            },
        ),  # fmt: skip
        (
            "qa",
            _train(ONE, "x")
            | {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": ONE}]},
        ),
        ("bench_q", {k: v for k, v in _bench_q("What is <object3><region>?", 1).items() if k != "options"}),
        ("bench_q", {k: v for k, v in _bench_q("What is <object3><region>?", 1).items() if k != "Answer"}),
        ("bench_d", {"id": 0, "video": "x.mp4", "annotation": [{"0": {"segmentation": RLE}}]}),
    ],
)
def test_code_turns(kind, obj):
    assert _codes(obj, kind) == ["turns"]


def test_code_placeholder_count():
    assert _codes(_train("<video>\n<region> and <region>?", "x", n=1)) == ["placeholder_count"]
    assert _codes(_train(ONE, "x", n=2)) == ["placeholder_count"]
    assert _codes(_train(ONE, "It is near <region>.", n=1)) == ["placeholder_count"]  # <region> in the answer
    obj = {"id": 0, "video": "x.mp4", "caption": "x", "annotation": [{"0": {"segmentation": RLE}}] * 2}
    assert _codes(obj, "bench_d") == ["placeholder_count"]


def test_code_unknown_object():
    q = "<video>\nThere are 2 objects: <object0><region>, <object1><region>.\nIs <object2> near?"
    assert _codes(_train(q, "x", n=2)) == ["unknown_object"]
    assert _codes(_train(ONE, "Yes, <object4> is.")) == ["unknown_object"]  # answer back-reference
    assert _codes(_train("<video>\nWhat is <object><region> doing?", "x")) == ["unknown_object"]  # leftover


def test_code_duplicate_object():
    q = "<video>\nThere are 2 objects: <object0><region>, <object0><region>."
    assert _codes(_train(q, "x", n=2)) == ["duplicate_object"]


def test_code_options_placeholder():
    obj = _bench_q("What is <object3><region>?", 1)
    obj["options"] = ["(A) <object3>", "(B) nothing"]
    assert _codes(obj, "bench_q") == ["options_placeholder"]


def test_code_shape():
    assert _codes(["not", "an", "object"]) == ["shape"]
    assert _codes(_train(ONE, "x") | {"annotation": {"0": {}}}) == ["shape"]
    assert _codes({k: v for k, v in _train(ONE, "x").items() if k != "video"}) == ["shape"]


def test_code_no_objects_and_too_many(data_dir):
    assert _codes(_train("<video>\nWhat happens?", "x", n=0)) == ["no_objects"]
    intro = ", ".join(f"<object{i}><region>" for i in range(6))
    obj = _train(f"<video>\nThere are 6 objects: {intro}.\nWhich is largest?", "x", n=6)
    assert _codes(obj) == ["too_many_objects"]
    assert _codes(obj, max_objects=6) == []


def test_code_frame_key():
    assert _codes(
        _train(ONE, "x", annotation=[{"zero": {"segmentation": RLE}, "1": {"segmentation": RLE}}])
    ) == ["frame_key"]
    assert _codes(_with_seg(RLE) | {"frame_idx": "middle"}) == ["frame_key"]
    assert _codes(
        _train(ONE, "x", annotation=[{"-1": {"segmentation": RLE}, "1": {"segmentation": RLE}}])
    ) == ["frame_key"]


def test_code_mask_decode():
    assert _codes(_with_seg({"size": [H, W], "counts": "zz"})) == ["mask_decode"]  # corrupt RLE
    assert _codes(_with_seg([[1, 2, 3]], height=H, width=W)) == ["mask_decode"]  # 3 polygon coordinates
    assert _codes(_with_seg([[1, 1, 5, 1, 5, 5]])) == ["mask_decode"]  # polygon, no size known (no probe)
    assert _codes(_train(ONE, "x", annotation=[{"0": RLE}])) == ["mask_decode"]  # no {"segmentation": ...}


def test_code_mask_size(data_dir):
    small = encode_mask(np.ones((8, 8), np.uint8))
    assert _codes(_with_seg(small, height=H, width=W)) == ["mask_size"]
    assert _codes(_with_seg(small), data_dir=data_dir, probe=_probe) == ["mask_size"]  # against the video
    assert _codes(_with_seg(RLE, height=32, width=32), data_dir=data_dir, probe=_probe) == ["mask_size"]


def test_code_empty_masks():
    empty = encode_mask(np.zeros((H, W), np.uint8))
    assert _codes(
        _train(ONE, "x", annotation=[{"0": {"segmentation": empty}, "1": {"segmentation": None}}])
    ) == ["empty_masks"]
    assert _codes(_train(ONE, "x", annotation=[{"0": {"segmentation": None}}])) == ["empty_masks"]
    assert _codes(_train(ONE, "x", annotation=[{}])) == ["empty_masks"]


def _probe(path: str) -> VideoInfo:
    from swim.data.video import probe_video

    return probe_video(path)


def test_codes_missing_and_unreadable_video(data_dir):
    assert _codes(_with_seg(RLE) | {"video": "videos/nope.mp4"}, data_dir=data_dir, probe=_probe) == [
        "missing_video"
    ]
    assert _codes(_with_seg(RLE) | {"video": "videos/broken.mp4"}, data_dir=data_dir, probe=_probe) == [
        "unreadable_video"
    ]
    assert _codes(_with_seg(RLE), data_dir=data_dir, probe=_probe) == []


def test_code_frame_range(data_dir):
    late = _train(ONE, "x", annotation=[{"0": {"segmentation": RLE}, str(T): {"segmentation": RLE}}])
    assert _codes(late, data_dir=data_dir, probe=_probe) == ["frame_range"]
    assert _codes(_with_seg(RLE) | {"frame_idx": str(T + 5)}, data_dir=data_dir, probe=_probe) == [
        "frame_range"
    ]
    assert _codes(late) == []  # without a probe the frame count is unknown


def test_every_code_is_documented():
    assert set(CODES) == {
        "turns", "shape", "json", "placeholder_count", "unknown_object", "duplicate_object",
        "options_placeholder", "no_objects", "too_many_objects", "frame_key", "mask_decode", "mask_size",
        "empty_masks", "missing_video", "unreadable_video", "frame_range",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# "format"


def test_formatted_normalises_segmentations_and_keeps_the_rest(data_dir):
    polygon = [[3.0, 2.0, 12.0, 2.0, 12.0, 9.0, 3.0, 9.0]]
    uncompressed = _uncompressed(_mask(1, 1, 6))
    obj = _train(
        ONE,
        "It runs.",
        annotation=[
            {
                "0": {"segmentation": RLE},
                "1": {"segmentation": polygon},
                "2": {"segmentation": uncompressed},
                "3": {"segmentation": None},
            }
        ],  # fmt: skip
        height=H,
        width=W,
        frame_idx="1",
    )
    original = copy.deepcopy(obj)
    rec = _read(obj, "detailed", data_dir)
    assert check_raw(rec, probe=_probe) == []
    out = formatted(rec)
    assert obj == original  # the input is untouched
    assert list(out)[:3] == ["index", "id", "video"]
    assert out["index"] == rec.index and out["id"] == "r1" and out["video"] == rec.video
    assert out["conversations"] == original["conversations"]
    assert (out["ratio"], out["frame_idx"], out["height"], out["width"]) == (0.8, "1", H, W)
    ann = out["annotation"][0]
    assert list(ann) == ["0", "1", "2", "3"]
    for entry in ann.values():
        seg = entry["segmentation"]
        assert seg["size"] == [H, W] and isinstance(seg["counts"], str)
    decode = lambda s: mask_utils.decode({"size": s["size"], "counts": s["counts"].encode()})  # noqa: E731
    assert np.array_equal(decode(ann["0"]["segmentation"]), _mask())
    assert np.array_equal(decode(ann["1"]["segmentation"]), decode_segmentation(polygon, H, W))
    assert np.array_equal(decode(ann["2"]["segmentation"]), _mask(1, 1, 6))
    assert not decode(ann["3"]["segmentation"]).any()  # null -> an all-zero mask of the frame size
    json.dumps(out)


def test_formatted_null_without_height_uses_probed_video(data_dir):
    obj = _train(
        ONE, "x", annotation=[{"1": {"segmentation": None}, "2": {"segmentation": [[3, 2, 8, 2, 8, 7]]}}]
    )
    source = data_dir / "videorefer-detailed-caption.json"
    source.write_text(json.dumps([obj]))
    (rec,) = list(iter_raw([source], "detailed"))
    assert rec.video_info is not None and (rec.video_info.height, rec.video_info.width) == (H, W)
    ann = formatted(rec)["annotation"][0]
    assert ann["1"]["segmentation"]["size"] == [H, W] and ann["2"]["segmentation"]["size"] == [H, W]
    assert "height" not in formatted(rec)


def test_formatted_bench_q_fields():
    rec = _read(_bench_q("Is <object3><region> left of <object1><region>?"), "bench_q")
    out = formatted(rec)
    for key in ("Question", "type", "options", "Answer", "frame_idx"):
        assert out[key] == rec.obj[key]
    assert out["annotation"][1]["3"]["segmentation"] == RLE2


# ---------------------------------------------------------------------------------------------------------
# Files and indices


def test_iter_raw_reports_problems_with_positions_and_probes_once(data_dir):
    good = _with_seg(RLE)
    rows = [good, _train(ONE, "x", n=2), "garbage", good | {"video": "videos/nope.mp4"}, good,
            good | {"video": "videos/broken.mp4"}]  # fmt: skip
    source = data_dir / "mixed.json"
    source.write_text(json.dumps(rows))
    calls = []

    def probe(path):
        calls.append(path)
        return _probe(path)

    got = list(iter_raw([source], "qa", probe=probe))
    assert [type(g).__name__ for g in got] == ["RawRecord", "InputProblem", "InputProblem", "InputProblem",
                                               "RawRecord", "InputProblem"]  # fmt: skip
    problems = {g.position: g for g in got if isinstance(g, InputProblem)}
    assert {p: g.codes for p, g in problems.items()} == {
        1: ("placeholder_count",),
        2: ("shape",),
        3: ("missing_video",),
        5: ("unreadable_video",),
    }
    assert (
        problems[1].source == str(source)
        and problems[1].id == "r1"
        and "annotation" in problems[1].reasons[0]
    )
    assert problems[1].index == make_index("qa", source, 1)
    assert sorted(calls) == sorted(
        {str(data_dir / "videos" / "a.mp4"), str(data_dir / "videos" / "broken.mp4")}
    )
    # without video checks nothing is opened
    got = list(iter_raw(str(source), "qa", check_videos=False))
    assert [g.position for g in got if isinstance(g, InputProblem)] == [1, 2]


def test_iter_raw_jsonl_bad_line_and_broken_array(data_dir):
    good = json.dumps(_with_seg(RLE))
    source = data_dir / "lines.jsonl"
    source.write_text(f"{good}\n{{oops\n{good}\n")
    got = list(iter_raw([source], "qa", check_videos=False))
    assert [(type(g).__name__, g.position) for g in got] == [
        ("RawRecord", 0),
        ("InputProblem", 1),
        ("RawRecord", 2),
    ]
    assert got[1].codes == ("json",) and "line 2" in got[1].reasons[0]
    broken = data_dir / "broken.json"
    broken.write_text(f"[{good}, {{oops}}, {good}]")
    got = list(iter_raw([broken], "qa", check_videos=False))
    assert (
        isinstance(got[0], RawRecord) and got[1].codes == ("json",) and got[1].position == 1 and len(got) == 2
    )


def test_index_is_stable_and_qa_only_for_qa():
    for kind in KINDS:
        for name in ("videorefer-qa-75k.json", "squad_qa.json", "VideoRefer-Bench-Q.json", "x.jsonl"):
            index = make_index(kind, f"/data/{name}", 12)
            assert "videorefer" in index
            assert ("qa" in index) == (kind == "qa"), (kind, name, index)
            assert index == make_index(kind, Path("/elsewhere") / name, 12)  # folder-independent
            assert index.endswith("_12")
    assert make_index("qa", "a.json", 1) != make_index("qa", "a.json", 2)
    assert make_index("qa", "a.json", 1) != make_index("qa", "b.json", 1)
    assert make_index("detailed", "a.json", 0) != make_index("short", "a.json", 0)


# ---------------------------------------------------------------------------------------------------------
# swim data synth --format videorefer


def test_synth_videorefer_reads_back_without_problems(tmp_path):
    from swim.data.synth.cli import main

    args = ["--format", "videorefer", "--seed", "1", "--num-train", "2", "--num-val", "4", "--num-bench-q", "5",
            "--num-bench-d", "1", "--size", "32", "--frames", "4", "--object-size", "10", "--speed", "2",
            "--max-distractors", "1"]  # fmt: skip
    main([str(tmp_path / "a"), *args])
    out = tmp_path / "a"
    scenes = json.loads((out / "scenes.json").read_text())
    files = {"detailed": "videorefer-detailed-caption.json", "qa": "videorefer-qa.json",
             "bench_d": "VideoRefer-Bench-D.json", "bench_q": "VideoRefer-Bench-Q.json"}  # fmt: skip
    seen = {}
    for kind, name in files.items():
        got = list(iter_raw([out / name], kind))
        assert all(isinstance(g, RawRecord) for g in got), [g for g in got if isinstance(g, InputProblem)]
        seen[kind] = got
        for rec in got:
            assert len(scenes[rec.id]) == rec.n_objects
            assert rec.obj["ratio"] == 1.0 and (rec.obj["height"], rec.obj["width"]) == (32, 32)
            json.dumps(formatted(rec))
    assert [len(seen[k]) for k in files] == [2, 4, 1, 5]
    ids = [r.id for rs in seen.values() for r in rs]
    assert len(set(ids)) == len(ids) == len(scenes) and all(isinstance(i, str) for i in ids)
    assert all("<" not in r.answer for r in seen["detailed"])
    multi = [r for r in seen["qa"] if r.n_objects == 2]
    assert len(multi) == 2 and all(any(m.turn == "answer" for m in r.mentions) for r in multi)
    assert all(r.object_ids() != list(range(r.n_objects)) for r in seen["bench_q"])
    assert {r.obj["type"] for r in seen["bench_q"]} == {
        "Basic Questions", "Sequential Questions", "Relationship Questions", "Reasoning Questions",
        "Future Predictions",
    }  # fmt: skip
    # deterministic per seed
    main([str(tmp_path / "b"), *args])
    for name in [*files.values(), "scenes.json"]:
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
