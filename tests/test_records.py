"""Record readers: every format, validation errors naming file/index/field, .json/.jsonl, path resolution."""

import json
from pathlib import Path

import pytest
from fixtures_data import llava, nl_refer, object_annotation, write_json

from swim.data.records import (
    BenchDRecord,
    BenchQRecord,
    ChatRecord,
    NLReferRecord,
    RecordError,
    Turn,
    load_records,
    record_from_json,
    with_data_root,
)

RLE = object_annotation([0])["0"]["segmentation"]


def good_nl():
    return nl_refer(
        "v/a.mp4", "<video>\nWhat is the <ins>dog</ins> doing?", "It sits.", [object_annotation([0, 3])]
    )


def test_nl_refer_record():
    r = record_from_json(good_nl(), source="f.json", index=4)
    assert isinstance(r, NLReferRecord) and r.kind == "nl_refer"
    assert r.turns() == (Turn("user", "What is the <ins>dog</ins> doing?"), Turn("assistant", "It sits."))
    assert r.media == ("video", Path("v/a.mp4"))
    assert len(r.annotation) == 1 and set(r.annotation[0]) == {"0", "3"}
    assert not r.text_only()


def test_qa_and_empty_annotation_records_are_text_only():
    qa = dict(good_nl(), index="videorefer_qa_17")
    r = record_from_json(qa, source="f.json", index=0)
    assert r.text_only() and not r.text_only(supervise_qa=True)
    empty = dict(good_nl(), annotation=[])
    assert record_from_json(empty, source="f.json", index=0).text_only(supervise_qa=True)


def test_chat_records_video_and_image():
    r = record_from_json(llava("/abs/LLaVA-Video-178K/x.mp4"), source="f.json", index=0)
    assert isinstance(r, ChatRecord) and r.media == ("video", Path("/abs/LLaVA-Video-178K/x.mp4"))
    assert r.turns()[0].text == "What happens?" and r.text_only()
    img = {"image": "img/1.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                   {"from": "gpt", "value": "A cat."}]}  # fmt: skip
    r = record_from_json(img, source="/data/f.json", index=1)
    assert r.media == ("image", Path("/data/img/1.jpg"))


def test_bench_q_original_and_refined():
    obj = {"id": 0, "video": "DAVIS/JPEGImages/480p/aerobatics", "Question": "What is <object3><region> not wearing?",
           "type": "Basic Questions", "options": ["(A) A helmet", "(B) A hat"], "Answer": "(A) A helmet",
           "frame_idx": "57", "annotation": [object_annotation([0, 3])]}  # fmt: skip
    r = record_from_json(obj, source="q.json", index=0)
    assert isinstance(r, BenchQRecord) and r.answer_letter == "A" and r.frame_idx == "57"
    assert r.prompt().splitlines() == [
        obj["Question"],
        "(A) A helmet",
        "(B) A hat",
        r.prompt().splitlines()[-1],
    ]
    refined = dict(obj, Question="What is the <ins>man</ins> not wearing?")
    assert (
        record_from_json(refined, source="q.json", index=1).turns()[0].text.startswith("What is the <ins>man")
    )


def test_bench_d_original_and_refined():
    orig = {"id": 0, "video": "clip.mp4", "caption": "A man walks.", "frame_idx": "36",
            "annotation": [object_annotation([2, 6])]}  # fmt: skip
    r = record_from_json(orig, source="d.json", index=0)
    assert isinstance(r, BenchDRecord) and r.question is None and r.caption == "A man walks."
    assert "<ins>" in r.turns()[0].text
    refined = {"video": "clip.mp4", "annotation": orig["annotation"],
               "conversations": [{"from": "human", "value": "Describe the <ins>man</ins>."},
                                 {"from": "gpt", "value": "A man walks."}]}  # fmt: skip
    r = record_from_json(refined, source="d.json", index=1, kind="bench_d")
    assert r.question == "Describe the <ins>man</ins>." and r.caption == "A man walks."


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda o: o.pop("video"), "video"),
        (lambda o: o.update(video=3), "video"),
        (lambda o: o.update(conversations=[]), "conversations"),
        (lambda o: o["conversations"].reverse(), "conversations[0].from"),
        (lambda o: o["conversations"][1].update(value="  "), "conversations[1].value"),
        (lambda o: o["conversations"][0].update({"from": "bot"}), "conversations[0].from"),
        (lambda o: o.update(annotation={"0": {}}), "annotation"),
        (lambda o: o.update(annotation=[{}]), "annotation[0]"),
        (lambda o: o["annotation"][0].update({"x": {"segmentation": RLE}}), "annotation[0]['x']"),
        (lambda o: o["annotation"][0].update({"5": {"mask": RLE}}), "annotation[0]['5']"),
        (lambda o: o["annotation"][0].update({"5": {"segmentation": {"counts": "x"}}}),
         "annotation[0]['5'].segmentation"),
        (lambda o: o["annotation"][0].update({"5": {"segmentation": [[1, 2, 3]]}}),
         "annotation[0]['5'].segmentation"),
        (lambda o: o.update(height="720"), "height"),
    ],
)  # fmt: skip
def test_nl_refer_errors_name_the_field(mutate, field):
    obj = good_nl()
    mutate(obj)
    with pytest.raises(RecordError) as e:
        record_from_json(obj, source="train.json", index=7, kind="nl_refer")
    assert (e.value.source, e.value.index, e.value.field) == ("train.json", 7, field)
    assert str(e.value).startswith(f"train.json:7: {field}: ")


def test_null_segmentation_is_an_unannotated_frame():
    obj = good_nl()
    obj["annotation"][0]["9"] = {"segmentation": None}
    assert "9" in record_from_json(obj, source="f", index=0).annotation[0]
    obj["annotation"] = [{"1": {"segmentation": None}}]
    with pytest.raises(RecordError, match="no annotated frame"):
        record_from_json(obj, source="f", index=0)


def test_load_json_and_jsonl_resolve_paths(tmp_path):
    write_json(tmp_path / "r.json", [good_nl(), llava("b.mp4")])
    recs, problems = load_records(tmp_path / "r.json")
    assert [r.kind for r in recs] == ["nl_refer", "chat"] and problems == []
    assert recs[0].media[1] == tmp_path / "v/a.mp4"  # default data_root: the file's folder
    recs, _ = load_records(tmp_path / "r.json", data_root="/videos")
    assert recs[1].media[1] == Path("/videos/b.mp4")
    assert with_data_root(recs[1], "/other").media[1] == Path("/other/b.mp4")

    lines = [json.dumps(good_nl()), "", "{not json", json.dumps({"video": "x.mp4"})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines))
    recs, problems = load_records(tmp_path / "r.jsonl", errors="collect")
    assert len(recs) == 1
    assert [(p.index, p.field) for p in problems] == [(1, "<line>"), (2, "conversations")]
    with pytest.raises(RecordError, match="r.jsonl:1: <line>: invalid JSON"):
        load_records(tmp_path / "r.jsonl")


def test_file_level_errors(tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(RecordError, match="bad.json: <file>: invalid JSON") as e:
        load_records(tmp_path / "bad.json")
    assert e.value.index is None
    (tmp_path / "num.json").write_text("3")
    with pytest.raises(RecordError, match="expected a JSON array"):
        load_records(tmp_path / "num.json")
    with pytest.raises(RecordError, match="cannot read"):
        load_records(tmp_path / "absent.json")
