"""`swim validate` on hand-made good and faulty files: one fault of each kind, every faulty record named."""

import json

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
