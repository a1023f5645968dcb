"""`swim validate` on hand-made good and faulty files: one fault of each kind, every faulty record named."""

import json
import logging

import pytest
import yaml
from fixtures_data import llava, nl_refer, object_annotation, write_clip, write_json

from swim.data import validate
from swim.data.control_tokens import QWEN_CONTROL_TOKENS, find_control_tokens
from swim.data.validate import main

GOOD_Q, GOOD_A = "What is the <ins>dog</ins> doing?", "The <ins>dog</ins> runs."


def faulty_records():
    """(record, expected code) pairs; code None = valid."""
    ann = [object_annotation([1, 3])]
    bad_rle = [{"1": {"segmentation": {"size": [56, 84], "counts": "!!!"}}}]
    return [
        (nl_refer("a.mp4", GOOD_Q, GOOD_A, ann), None),
        (llava("a.mp4"), None),
        (nl_refer("a.mp4", "Is the <ins>dog</ins> here?", "Yes.", ann, index="videorefer_qa_1"), None),
        ({"conversations": [], "annotation": ann}, "shape"),  # no video key
        (nl_refer("a.mp4", GOOD_Q, "   ", ann), "conversations"),  # empty answer
        (nl_refer("missing.mp4", GOOD_Q, GOOD_A, ann), "missing_video"),
        (nl_refer("corrupt.mp4", GOOD_Q, GOOD_A, ann), "unreadable_video"),
        (nl_refer("a.mp4", GOOD_Q, GOOD_A, bad_rle), "mask_decode"),
        (nl_refer("a.mp4", GOOD_Q, GOOD_A, [object_annotation([1], hw=(28, 28))]), "mask_size"),
        (nl_refer("a.mp4", GOOD_Q, GOOD_A, [object_annotation([1, 99])]), "frame_range"),
        (nl_refer("a.mp4", "What is the <ins>dog doing?", GOOD_A, ann), "tags"),  # unclosed
        (nl_refer("a.mp4", GOOD_Q, "The <ins>big <ins>dog</ins></ins>.", ann), "tags"),  # nested
        (nl_refer("a.mp4", "Is the <ins>dog</ins> on the <ins>sofa</ins>?", "Yes.", ann), "tag_count"),
        (
            nl_refer("a.mp4", GOOD_Q, GOOD_A, [{"2": {"segmentation": [[0, 0, 10, 0, 10, 10]]}}]),
            None,
        ),  # polygon
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("validate")
    write_clip(d / "a.mp4", n_frames=8)
    (d / "corrupt.mp4").write_bytes(b"\x00garbage" * 64)
    cases = faulty_records()
    write_json(d / "mixed.json", [r for r, _ in cases])
    write_json(d / "good.json", [r for r, code in cases if code is None])
    return d, cases


def test_report_names_every_faulty_record_and_no_valid_one(files, capsys):
    d, cases = files
    with pytest.raises(SystemExit) as e:
        main([str(d / "mixed.json"), "--json"])
    assert e.value.code == 1
    report = json.loads(capsys.readouterr().out)
    expected = {i: code for i, (_, code) in enumerate(cases) if code is not None}
    assert {p["index"] for p in report} == set(expected)
    for p in report:
        assert p["code"] == expected[p["index"]], p
        assert p["file"].endswith("mixed.json") and p["field"] and p["reason"]
    by_index = {p["index"]: p for p in report}
    assert by_index[8]["field"] == "annotation[0]['1'].segmentation" and "28x28" in by_index[8]["reason"]
    assert by_index[9]["field"] == "annotation[0]['99']"
    assert by_index[10]["field"] == "conversations[0].value" and "unclosed" in by_index[10]["reason"]
    assert by_index[11]["field"] == "conversations[1].value" and "nested" in by_index[11]["reason"]


def test_text_output_and_good_file(files, capsys):
    d, cases = files
    with pytest.raises(SystemExit) as e:
        main([str(d / "mixed.json")])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == sum(code is not None for _, code in cases)
    assert any(line.startswith(f"{d / 'mixed.json'}:5: video: not found") for line in lines)
    assert "14 records checked, 10 problem(s) in 10 record(s)" in err and e.value.code == 1
    with pytest.raises(SystemExit) as e:
        main([str(d / "good.json")])
    assert e.value.code == 0 and capsys.readouterr().out == ""


def test_strict_stops_at_first(files, capsys):
    d, _ = files
    with pytest.raises(SystemExit):
        main([str(d / "mixed.json"), "--strict", "--json"])
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_each_video_probed_once(files, monkeypatch, capsys):
    d, _ = files
    calls = []
    real = validate.probe_video
    monkeypatch.setattr(validate, "probe_video", lambda p, s=None: calls.append(p) or real(p, s))
    with pytest.raises(SystemExit):
        main([str(d / "mixed.json")])
    assert sorted(p.name for p in calls) == ["a.mp4", "corrupt.mp4"]


def test_mixture_yaml_and_data_root(files, tmp_path, capsys):
    d, _ = files
    (tmp_path / "mix.yaml").write_text(
        yaml.safe_dump(
            {"datasets": [{"json_path": str(d / "good.json")}, {"json_path": str(d / "mixed.json")}]}
        )
    )
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "mix.yaml"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert e.value.code == 1 and {p["file"] for p in report} == {str(d / "mixed.json")}
    # --data-root elsewhere: every video-backed record is missing its video
    with pytest.raises(SystemExit):
        main([str(d / "good.json"), "--data-root", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert {p["code"] for p in report} == {"missing_video"} and len(report) == 4


def test_invalid_json_file(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[{,")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "x.json"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert e.value.code == 1 and report[0]["index"] is None and "invalid JSON" in report[0]["reason"]


# ---------------------------------------------------------------------------------------------------------
# Qwen control-token strings in the text


def test_find_control_tokens():
    assert find_control_tokens("a <|im_end|> b <|video_pad|> c <|im_end|>") == ["<|im_end|>", "<|video_pad|>"]
    assert find_control_tokens("".join(reversed(QWEN_CONTROL_TOKENS))) == list(reversed(QWEN_CONTROL_TOKENS))
    assert len(QWEN_CONTROL_TOKENS) == 22
    plain = "The <ins>dog</ins> runs. <video> <image> <|dog|> < |im_end| > <tool-call> <|IM_END|>"
    assert find_control_tokens(plain) == []


def test_control_tokens_reported_per_turn(files, capsys):
    """Each turn that contains a control-token string is one line naming the file, the record and the turn."""
    d, _ = files
    bench_q = {
        "video": "a.mp4",
        "Question": "What is the <ins>dog</ins> doing?",
        "options": ["(A) Running", "(B) <|box_start|>Sitting"],
        "Answer": "(A) Running",
    }
    multi_turn = nl_refer("a.mp4", GOOD_Q, GOOD_A, [object_annotation([1])])
    multi_turn["conversations"] += [
        {"from": "human", "value": "Call <tool_call>f()</tool_call> now."},
        {"from": "gpt", "value": "Done.<|vision_end|>"},
    ]
    records = [
        nl_refer("a.mp4", GOOD_Q, GOOD_A, [object_annotation([1])]),  # clean
        nl_refer(
            "a.mp4", "What is <|video_pad|> the <ins>dog</ins> doing?", GOOD_A, [object_annotation([1])]
        ),
        llava("a.mp4", answer="It sits.<|im_end|> More.<|im_end|>"),
        multi_turn,
        bench_q,
    ]
    path = write_json(d / "control_tokens.json", records)
    with pytest.raises(SystemExit) as e:
        main([str(path)])
    out, err = capsys.readouterr()
    found, hint = "contains Qwen control token(s)", "; the tokenizer reads them as control tokens, not text"
    assert out.splitlines() == [
        f"{path}:1: conversations[0].value: {found} '<|video_pad|>'{hint}",
        f"{path}:2: conversations[1].value: {found} '<|im_end|>'{hint}",
        f"{path}:3: conversations[2].value: {found} '<tool_call>', '</tool_call>'{hint}",
        f"{path}:3: conversations[3].value: {found} '<|vision_end|>'{hint}",
        f"{path}:4: options: {found} '<|box_start|>'{hint}",
    ]
    assert "5 records checked, 5 problem(s) in 4 record(s) (control_tokens: 5)" in err and e.value.code == 1


# ---------------------------------------------------------------------------------------------------------
# Annotated records without <ins> tags: KLAL-style answer supervision, or SWIM data that lost its tags

KLAL_Q, KLAL_A = "Which cell has the red square? Answer with the row letter and column number.", "C4"


def klal_image(image: str, entry: dict) -> dict:
    """A KLAL-style image record (as `swim data synth --task grid_patch` writes them): geometry, no tags."""
    turns = [{"from": "human", "value": KLAL_Q}, {"from": "gpt", "value": KLAL_A}]
    return {"image": image, "conversations": turns, "annotation": [{"0": entry}], "height": 64, "width": 64}


@pytest.fixture(scope="module")
def untagged(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("untagged")
    Image.new("RGB", (64, 64), (40, 80, 120)).save(d / "a.png")
    write_clip(d / "a.mp4", n_frames=8)
    return d


def run_validate(path, capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(path), *args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_klal_records_get_one_note_naming_the_query_instead_of_a_mismatch_per_record(untagged, capsys):
    records = [klal_image("a.png", {"box": [8, 8, 24, 24]}), klal_image("a.png", {"points": [[30.0, 31.0]]}),
               klal_image("a.png", {"box": [0, 0, 10, 10]})]  # fmt: skip
    path = write_json(untagged / "klal.json", records)
    code, out, err = run_validate(path, capsys)
    assert code == 1 and len(out.splitlines()) == 1 and "tag/object count mismatch" not in out
    note = out.strip()
    assert note.startswith(
        f"{path}: annotation: 3 record(s) carry boxes, points but no <ins> tags (record(s) 0, 1, 2)"
    )
    assert "--query answer_last (attn_query: answer_last: the last token of each assistant answer" in note
    assert "--query answer_all (every token of the answer)" in note and "as in KLAL" in note
    assert "wrap each object's phrase in <ins>...</ins>" in note and "are tagged" not in note
    assert "3 records checked, 3 problem(s) in 3 record(s) (tag_count: 3); 3 of them annotated without <ins> tags: " \
           "--query answer_last for answer-supervised (KLAL) records, or add the tags" in err  # fmt: skip
    for query in ("answer_last", "answer_all"):
        assert run_validate(path, capsys, "--query", query)[:2] == (0, "")


def test_untagged_masks_point_to_both_the_tags_and_the_query(untagged, capsys):
    """SWIM data that lost its tags is a real error: the note must offer adding the tags as well as --query."""
    two_objects = [object_annotation([2]), object_annotation([5])]
    records = [nl_refer("a.mp4", "What is the dog doing?", "The dog runs.", [object_annotation([1, 3])]),
               nl_refer("a.mp4", "Where is the cat and the dog?", "On the sofa.", two_objects)]  # fmt: skip
    path = write_json(untagged / "masks.json", records)
    code, out, _ = run_validate(path, capsys)
    assert code == 1 and out.splitlines() == [out.strip()]
    assert out.startswith(f"{path}: annotation: 2 record(s) carry masks but no <ins> tags (record(s) 0, 1); ")
    assert (
        "needs one tagged phrase per object" in out
        and "--query answer_last" in out
        and "<ins>...</ins>" in out
    )


def test_json_keeps_one_entry_per_record_and_puts_the_note_on_stderr(untagged, capsys):
    records = [klal_image("a.png", {"box": [8, 8, 24, 24]}) for _ in range(7)]
    path = write_json(untagged / "klal7.json", records)
    code, out, err = run_validate(path, capsys, "--json")
    report = json.loads(out)
    assert code == 1 and [p["index"] for p in report] == list(range(7))
    for p in report:
        assert p["code"] == "tag_count" and p["field"] == "annotation"
        assert (
            p["reason"].startswith("1 annotated object(s) but no <ins>-tagged phrase")
            and "--query answer_last" in p["reason"]
        )
    assert (
        err.count(f"{path}: annotation: 7 record(s) carry boxes") == 1
        and "(record(s) 0, 1, 2, 3, 4 and 2 more)" in err
    )


def test_mixed_file_keeps_other_problems_and_says_the_rest_is_tagged(untagged, capsys):
    ann = [object_annotation([1, 3])]
    records = [
        nl_refer("a.mp4", GOOD_Q, GOOD_A, ann),  # tagged, good
        nl_refer("a.mp4", "What is the dog doing?", "It runs.", ann),  # untagged
        nl_refer(
            "a.mp4", "Is the <ins>dog</ins> on the <ins>sofa</ins>?", "Yes.", ann
        ),  # a real count mismatch
        nl_refer("a.mp4", GOOD_Q, GOOD_A, [object_annotation([1, 99])]),  # tagged, frame out of range
        klal_image("a.png", {"points": [[3.0, 4.0]]}),  # untagged
        llava("a.mp4"),  # no annotation: needs no tags
    ]
    path = write_json(untagged / "mixed_tags.json", records)
    code, out, err = run_validate(path, capsys)
    lines = out.splitlines()
    assert code == 1 and len(lines) == 3
    assert lines[0].startswith(
        f"{path}: annotation: 2 record(s) carry masks, points but no <ins> tags (record(s) 1, 4)"
    )
    assert (
        "The other 3 annotated record(s) of this file are tagged, so these may be SWIM records that lost their tags"
        in lines[0]
    )
    assert "--query answer_last" in lines[0] and "<ins>...</ins>" in lines[0]
    assert (
        lines[1]
        == f"{path}:2: annotation: tag/object count mismatch: 2 distinct tagged phrase(s), 1 object(s)"
    )
    assert lines[2].startswith(f"{path}:3: annotation[0]['99']: frame index 99")
    assert "4 problem(s) in 4 record(s) (tag_count: 3, frame_range: 1); 2 of them annotated without" in err


def test_strict_and_mixtures_give_one_note_per_file(untagged, tmp_path, capsys):
    a = write_json(untagged / "klal_a.json", [klal_image("a.png", {"box": [8, 8, 24, 24]})] * 2)
    b = write_json(untagged / "klal_b.json", [klal_image("a.png", {"points": [[3.0, 4.0]]})])
    code, out, _ = run_validate(a, capsys, "--strict")
    assert code == 1 and out.startswith(
        f"{a}: annotation: 1 record(s) carry boxes but no <ins> tags (record(s) 0)"
    )
    (tmp_path / "mix.yaml").write_text(
        yaml.safe_dump({"datasets": [{"json_path": str(a)}, {"json_path": str(b)}]})
    )
    code, out, _ = run_validate(tmp_path / "mix.yaml", capsys)
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith(f"{a}: annotation: 2 record(s)") and lines[1].startswith(
        f"{b}: annotation: 1 record(s)"
    )


def test_training_checks_stay_quiet_and_count_the_dropped_supervision(untagged, caplog):
    """`check_record` (shared with `swim train`'s dataset) logs nothing; the dataset keeps the text, drops the
    attention supervision of each untagged record, counts it and warns once."""
    from fixtures_data import SMALL, tokenizer

    from swim.data.dataset import SwimDataset
    from swim.data.records import load_records

    path = write_json(untagged / "klal_train.json", [klal_image("a.png", {"box": [8, 8, 24, 24]})] * 3)
    records, _ = load_records(path)
    with caplog.at_level(logging.WARNING):
        problems = [p for rec in records for p in validate.check_record(rec, None, decode_masks=False)]
        assert [p.code for p in problems] == ["tag_count"] * 3 and caplog.records == []
        dataset = SwimDataset(records, SMALL, tokenizer())
        samples = [dataset[i] for i in range(len(dataset))]
    assert all(len(s["query_positions"]) == 0 for s in samples)
    assert dataset.skips.counts == {"supervision_dropped:tag_count": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        len(warnings) == 1 and "attn_query: answer_last" in warnings[0]
    )  # the training log names the fix too
