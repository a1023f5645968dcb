"""`<ins>` parsing and tag → token alignment with the tiny Qwen-style tokenizer (hand-made cases)."""

import numpy as np
import pytest
import torch
from fixtures_data import SMALL, tokenizer, write_json
from PIL import Image

from swim.data.collator import SwimCollator
from swim.data.dataset import SwimDataset
from swim.data.records import Turn, load_records
from swim.data.tags import (
    SWIM_SYSTEM_PROMPT,
    TagError,
    assign_objects,
    build_text,
    distinct_phrases,
    parse_tags,
)


def align(question, answer, n_objects=1, media=(("video", 4),), **kw):
    return build_text(tokenizer(), [Turn("user", question), Turn("assistant", answer)], media=media,
                      n_objects=n_objects, **kw)  # fmt: skip


def query_tokens(ts):
    """[(token string, object)] at the query positions."""
    tok = tokenizer()
    return [
        (tok.decode([int(ts.input_ids[p])]), int(o)) for p, o in zip(ts.query_positions, ts.query_objects)
    ]


# ---- parsing -----------------------------------------------------------------------------------------------


def test_parse_tags_removes_tags_and_records_spans():
    clean, spans = parse_tags("The <ins>red dog</ins>, and <ins>cat</ins>.")
    assert clean == "The red dog, and cat."
    assert [(s.start, s.end, s.phrase) for s in spans] == [(4, 11, "red dog"), (17, 20, "cat")]
    assert clean[4:11] == "red dog"


@pytest.mark.parametrize(
    "text, match",
    [
        ("the <ins>dog", "unclosed"),
        ("the <ins>big <ins>dog</ins></ins>", "nested"),
        ("the dog</ins>", "without <ins>"),
        ("the <ins> </ins> dog", "empty"),
    ],
)
def test_parse_tags_errors(text, match):
    with pytest.raises(TagError, match=match):
        parse_tags(text)


def test_bad_tag_error_names_the_turn():
    with pytest.raises(TagError, match="turn 1: unclosed"):
        align("the <ins>dog</ins>?", "a <ins>dog")


def test_distinct_phrases_case_insensitive_first_appearance():
    assert distinct_phrases(["Dog", "ball", " dog ", "BALL", "cat"]) == ["dog", "ball", "cat"]
    assert assign_objects(["Dog", "ball", "dog"], 2) == ([0, 1, 0], None)
    objects, reason = assign_objects(["dog", "ball"], 1)
    assert objects is None and "2 distinct tagged phrase(s), 1 object(s)" in reason


# ---- alignment ---------------------------------------------------------------------------------------------


def test_single_word_with_leading_space():
    ts = align("What is the <ins>dog</ins> doing?", "It sits.")
    assert query_tokens(ts) == [(" dog", 0)]  # the BPE token carries the space; it belongs to the span


def test_word_split_into_several_tokens_labels_every_sub_token():
    ts = align("Where is the <ins>doggedly</ins> one?", "Here.")
    toks = query_tokens(ts)
    assert len(toks) > 1 and "".join(t for t, _ in toks) == " doggedly"
    assert all(o == 0 for _, o in toks)
    assert ts.query_positions.tolist() == list(
        range(ts.query_positions[0], ts.query_positions[0] + len(toks))
    )


def test_repeated_word_both_occurrences_labelled():
    ts = align("Is the <ins>dog</ins> near the <ins>dog</ins>?", "The <ins>dog</ins> is alone.")
    assert query_tokens(ts) == [(" dog", 0), (" dog", 0), (" dog", 0)]
    assert len(set(ts.query_positions.tolist())) == 3


def test_tagged_word_in_system_prompt_only_tagged_occurrence_labelled():
    assert " object " in SWIM_SYSTEM_PROMPT
    ts = align("Describe the <ins>object</ins>.", "It is red.")
    assert query_tokens(ts) == [(" object", 0)]
    pos = int(ts.query_positions[0])
    video = (ts.input_ids == tokenizer().convert_tokens_to_ids("<|video_pad|>")).nonzero().max()
    assert pos > video  # the question's "object", not the system prompt's


def test_two_objects_follow_first_appearance():
    ts = align("What does the <ins>man</ins> give the <ins>dog</ins>?", "The <ins>Dog</ins> gets a ball.", 2)
    assert query_tokens(ts) == [(" man", 0), (" dog", 1), (" Dog", 1)]  # "Dog" == "dog": same object
    assert ts.skip_reason is None


def test_tag_next_to_punctuation():
    ts = align("Is the <ins>dog</ins>, or the <ins>cat</ins>? moving", "No.", 2)
    assert query_tokens(ts) == [(" dog", 0), (" cat", 1)]  # "," and "?" are not labelled


def test_tag_with_inner_spaces_is_trimmed():
    ts = align("Is the<ins> dog </ins>here?", "Yes.")
    assert query_tokens(ts) == [(" dog", 0)]


def test_tag_at_start_of_answer():
    ts = align("Who runs?", "<ins>Dog</ins> runs.")
    toks = query_tokens(ts)
    assert "".join(t for t, _ in toks) == "Dog"
    first_label = int((ts.labels != -100).nonzero()[0])
    assert int(ts.query_positions[0]) == first_label  # the answer's first token is both target and query


def test_count_mismatch_keeps_text_drops_queries():
    ts = align("Is the <ins>dog</ins> near the <ins>cat</ins>?", "Yes.", 1)
    assert ts.query_positions.numel() == 0 and "count mismatch" in ts.skip_reason
    assert (ts.labels != -100).any()
    ts = align("No tags here?", "Yes.", 1)  # untagged: the reason names both ways out
    assert ts.query_positions.numel() == 0 and "no <ins>-tagged phrase" in ts.skip_reason
    assert "attn_query: answer_last" in ts.skip_reason


def test_unsupervised_and_zero_objects_have_no_queries_and_no_reason():
    ts = align("the <ins>dog</ins>?", "Yes.", 1, supervise=False)
    assert ts.query_positions.numel() == 0 and ts.skip_reason is None
    assert "<ins>" not in ts.text


# ---- labels, token types, expansion ------------------------------------------------------------------------


def test_labels_are_answer_and_im_end_only():
    tok = tokenizer()
    ts = align("What is the <ins>dog</ins> doing?", "It <ins>sits</ins> down.", 1)
    labelled = [int(t) for t in ts.labels if t != -100]
    assert tok.decode(labelled) == "It sits down.<|im_end|>"
    lab_pos = (ts.labels != -100).nonzero().flatten()
    assert torch.equal(ts.input_ids[lab_pos], ts.labels[lab_pos])
    assert "<|im_start|>system\n" + SWIM_SYSTEM_PROMPT in ts.text


def test_multi_turn_labels_every_answer():
    tok = tokenizer()
    turns = [
        Turn("user", "Q1?"),
        Turn("assistant", "A one."),
        Turn("user", "Q2?"),
        Turn("assistant", "A two."),
    ]
    ts = build_text(tok, turns, media=[("video", 2)])
    assert tok.decode([int(t) for t in ts.labels if t != -100]) == "A one.<|im_end|>A two.<|im_end|>"


def test_video_expansion_matches_tokenizing_k_copies():
    tok = tokenizer()
    k = 7
    ts = align("What is the <ins>dog</ins> doing?", "It sits.", media=(("video", k),))
    vid = tok.convert_tokens_to_ids("<|video_pad|>")
    assert int((ts.input_ids == vid).sum()) == k
    assert torch.equal(ts.mm_token_type_ids, (ts.input_ids == vid).long() * 2)
    full = tok(ts.text.replace("<|video_pad|>", "<|video_pad|>" * k), add_special_tokens=False)["input_ids"]
    assert ts.input_ids.tolist() == full
    assert tok.decode([int(ts.input_ids[ts.query_positions[0]])]) == " dog"


def test_image_media_and_custom_system_prompt():
    tok = tokenizer()
    ts = build_text(tok, [Turn("user", "What?"), Turn("assistant", "A dog.")], media=[("image", 3)],
                    system_prompt="You are a helpful assistant.")  # fmt: skip
    img = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((ts.input_ids == img).sum()) == 3 and int((ts.mm_token_type_ids == 1).sum()) == 3
    assert "You are a helpful assistant." in ts.text and "Qwen" not in ts.text


# ---- answer-token rows (KLAL) ------------------------------------------------------------------------------


def test_answer_rows_need_no_tags_and_skip_the_end_of_turn_token():
    last = align("Where is the red circle?", "The red circle", query="answer_last")
    assert query_tokens(last) == [(" circle", 0)]
    every = align("Where is the red circle?", "The red circle", query="answer_all")
    assert query_tokens(every) == [("T", 0), ("he", 0), (" red", 0), (" circle", 0)]
    # every answer row is a row of the labels, and the end-of-turn token (also labelled) is never one
    labelled = (every.labels != -100).nonzero().flatten().tolist()
    assert every.query_positions.tolist() == labelled[:-1]
    assert tokenizer().decode([int(every.input_ids[labelled[-1]])]) == "<|im_end|>"


def test_answer_rows_pair_each_row_with_every_object_and_keep_tags_optional():
    ts = align("Where are the <ins>dog</ins> and the cat?", "Left.", n_objects=2, query="answer_last")
    assert query_tokens(ts) == [(".", 0), (".", 1)] and ts.skip_reason is None  # 1 tag, 2 objects: fine here
    multi = build_text(tokenizer(), [Turn("user", "A?"), Turn("assistant", "C5"), Turn("user", "B?"),
                                     Turn("assistant", "Red.")], media=(("image", 4),), n_objects=1,
                       query="answer_last")  # fmt: skip
    assert query_tokens(multi) == [("5", 0), (".", 0)]  # the last token of each answer
    with pytest.raises(ValueError, match="query must be one of"):
        align("Q?", "A.", query="answer_first")


def test_answer_last_rows_of_a_padded_batch(tmp_path):
    """Answers of different lengths, right padding: each row is the sample's last labelled token before
    <|im_end|>, found independently from the collated labels."""
    Image.fromarray(np.zeros((56, 84, 3), np.uint8)).save(tmp_path / "a.png")
    answers = ["C5", "It is a blue square.", "The red circle"]
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": a}],
                "annotation": [{"0": {"points": [[10, 10]]}}]} for a in answers]  # fmt: skip
    write_json(tmp_path / "r.json", records)
    records = load_records(tmp_path / "r.json")[0]
    tok = tokenizer()
    last = SwimDataset(records, SMALL, tok, query="answer_last", strict=True)
    batch = SwimCollator(tok.pad_token_id)([last[i] for i in range(3)])
    rows = batch["grounding"]["query_positions"]
    assert rows.shape == (3, 1) and (batch["attention_mask"] == 0).any()  # padded
    assert [tok.decode([int(batch["input_ids"][b, rows[b, 0]])]) for b in range(3)] == ["5", ".", " circle"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for b in range(3):
        labelled = (batch["labels"][b] != -100).nonzero().flatten()
        content = labelled[batch["labels"][b, labelled] != im_end]
        assert rows[b].tolist() == [int(content.max())]
    every = SwimDataset(records, SMALL, tok, query="answer_all", strict=True)
    rows = SwimCollator(tok.pad_token_id)([every[i] for i in range(3)])["grounding"]["query_positions"]
    assert [int((r >= 0).sum()) for r in rows] == [2, 7, 4]  # padded with -1 to the longest answer
    assert rows[0, 2:].tolist() == [-1] * 5
