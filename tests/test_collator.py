"""`SwimCollator` on hand-made samples, and `SwimDataset` → collator end to end on tiny real mp4s."""

import logging

import numpy as np
import pytest
import torch
from fixtures_data import SMALL, llava, nl_refer, object_annotation, tokenizer, write_clip, write_json

from swim.data.collator import SwimCollator
from swim.data.dataset import SwimDataset
from swim.data.records import RecordError, load_records

VID = 13  # <|video_pad|> in the tiny tokenizer (Qwen order)


def sample(length, video_at, groups, cells, queries=(), n_obj=0, seed=0):
    """A contract sample: `length` tokens, a video of `groups` x `cells` tokens starting at `video_at`."""
    g = torch.Generator().manual_seed(seed)
    k = groups * cells
    ids = torch.randint(20, 100, (length,), generator=g)
    ids[video_at : video_at + k] = VID
    labels = torch.full((length,), -100)
    labels[-3:] = ids[-3:]
    s = {
        "input_ids": ids,
        "labels": labels,
        "mm_token_type_ids": (ids == VID).long() * 2,
        "pixel_values_videos": torch.randn(k * 4, 1176, generator=g),
        "video_grid_thw": torch.tensor([[2 * groups // 2, 2, 2 * cells // 2]]),
        "second_per_grid_ts": torch.tensor([0.5]),
        "query_positions": torch.tensor([p for p, _ in queries], dtype=torch.long),
        "query_objects": torch.tensor([o for _, o in queries], dtype=torch.long),
        "object_targets": torch.rand(n_obj, k, generator=g),
        "object_group_valid": torch.ones(n_obj, groups, dtype=torch.bool),
        "vision_token_group": torch.arange(groups).repeat_interleave(cells),
    }
    return s


def test_batch_of_three_with_a_maskless_sample():
    a = sample(20, 2, groups=2, cells=3, queries=[(12, 0), (13, 0), (15, 1)], n_obj=2, seed=1)
    b = sample(14, 1, groups=1, cells=4, seed=2)  # no masks: text loss only
    c = sample(25, 3, groups=3, cells=2, queries=[(18, 0)], n_obj=1, seed=3)
    c["object_group_valid"][0, 1] = False
    batch = SwimCollator(pad_token_id=0)([a, b, c])

    assert batch["input_ids"].shape == (3, 25)
    assert batch["input_ids"][1, 14:].eq(0).all() and batch["attention_mask"][1].sum() == 14
    assert batch["labels"][0, 20:].eq(-100).all() and batch["mm_token_type_ids"][0, 20:].eq(0).all()
    assert batch["pixel_values_videos"].shape == (4 * (6 + 4 + 6), 1176)
    assert torch.equal(batch["pixel_values_videos"][:24], a["pixel_values_videos"])
    assert batch["video_grid_thw"].shape == (3, 3) and batch["second_per_grid_ts"].shape == (3,)

    g = batch["grounding"]
    assert g["query_positions"].tolist() == [[12, 13, 15], [-1, -1, -1], [18, -1, -1]]
    assert g["query_objects"].tolist() == [[0, 0, 1], [-1, -1, -1], [0, -1, -1]]
    assert g["object_targets"].shape == (3, 2, 6) and g["object_group_valid"].shape == (3, 2, 3)
    assert torch.equal(g["object_targets"][0], a["object_targets"])
    assert g["object_targets"][1].eq(0).all() and not g["object_group_valid"][1].any()
    assert g["object_group_valid"][2].tolist() == [[True, False, True], [False, False, False]]
    assert g["vision_token_group"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1], [0, 0, 1, 1, 2, 2]]
    _check_alignment(batch)


def test_no_queries_gives_grounding_none():
    batch = SwimCollator(0)([sample(10, 1, 1, 4), sample(12, 2, 1, 4, seed=5)])
    assert batch["grounding"] is None and batch["input_ids"].shape == (2, 12)


def _check_alignment(batch):
    """Per sample: K video tokens in input_ids == non-padded length of vision_token_group / object_targets;
    queries point at text tokens inside the sequence and at existing objects."""
    g = batch["grounding"]
    for b in range(batch["input_ids"].shape[0]):
        k = int((batch["input_ids"][b] == VID).sum())
        assert int((g["vision_token_group"][b] >= 0).sum()) == k
        assert (batch["mm_token_type_ids"][b] == 2).sum() == k
        qp = g["query_positions"][b][g["query_positions"][b] >= 0]
        assert (batch["attention_mask"][b, qp] == 1).all() and (batch["input_ids"][b, qp] != VID).all()
        qo = g["query_objects"][b][g["query_objects"][b] >= 0]
        if len(qo):
            assert g["object_group_valid"][b, qo].any(-1).all()  # every queried object has a real target row


# ---- end to end: records -> SwimDataset -> SwimCollator ----------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    write_clip(d / "a.mp4", n_frames=8)
    write_clip(d / "b.mp4", n_frames=6, seed=1)
    (d / "corrupt.mp4").write_bytes(b"\x00not a video" * 50)
    good = nl_refer("a.mp4", "What is the <ins>dog</ins> doing?", "The <ins>dog</ins> runs to the <ins>ball</ins>.",
                    [object_annotation([1, 5]), object_annotation([2], box=(28, 28, 56, 84))])  # fmt: skip
    records = [
        good,  # 0
        llava("b.mp4"),  # 1 text only
        nl_refer("missing.mp4", "a <ins>dog</ins>?", "x", [object_annotation([1])]),  # 2 missing video
        nl_refer(
            "a.mp4", "the <ins>dog</ins> and <ins>cat</ins>?", "Yes.", [object_annotation([1])]
        ),  # 3 mismatch
        nl_refer(
            "a.mp4", "the <ins>dog</ins>?", "Yes.", [object_annotation([1], hw=(28, 28))]
        ),  # 4 mask size
        nl_refer("corrupt.mp4", "the <ins>dog</ins>?", "Yes.", [object_annotation([1])]),  # 5 corrupt
        nl_refer("a.mp4", "the <ins>dog</ins>?", "Yes.", [object_annotation([40])]),  # 6 frame out of range
        nl_refer(
            "b.mp4",
            "the <ins>dog</ins>?",
            "It is a <ins>dog</ins>.",
            [object_annotation([4])],
            index="videorefer_qa_3",
        ),  # fmt: skip  # 7 QA: text only
    ]
    write_json(d / "train.json", records)
    return load_records(d / "train.json")[0]


def test_dataset_sample_matches_contract(data):
    ds = SwimDataset(data, SMALL, tokenizer())
    s = ds[0]
    ids = s["input_ids"]
    video_pos = (ids == VID).nonzero().flatten()
    k = len(video_pos)
    t, h, w = s["video_grid_thw"][0].tolist()
    assert k == t * h * w // 4 == 12 and s["pixel_values_videos"].shape == (t * h * w, 1176)
    assert torch.equal(s["mm_token_type_ids"], (ids == VID).long() * 2)
    assert video_pos.tolist() == list(range(int(video_pos[0]), int(video_pos[0]) + k))
    assert s["second_per_grid_ts"].tolist() == [pytest.approx(1.0)]  # 4 of 8 frames at 4 fps -> 2 fps
    tok = tokenizer()
    assert [tok.decode([int(ids[p])]) for p in s["query_positions"]] == [" dog", " dog", " ball"]
    assert s["query_objects"].tolist() == [0, 0, 1]
    assert s["object_targets"].shape == (2, k) and s["object_group_valid"].shape == (2, t)
    assert s["vision_token_group"].tolist() == [0] * 6 + [1] * 6
    # Frames [0, 1, 2, 5]: object 0 (frames 1, 5) in both groups at cell (0, 0); object 1 (frame 2) in group 1
    # at cells (1, 1) and (1, 2) of the 2x3 grid.
    assert s["object_group_valid"].tolist() == [[True, True], [False, True]]
    expected = np.zeros((2, 12), np.float32)
    expected[0, [0, 6]] = 1
    expected[1, [10, 11]] = 1
    assert np.allclose(s["object_targets"].numpy(), expected)
    assert tok.decode([int(x) for x in s["labels"] if x != -100]) == "The dog runs to the ball.<|im_end|>"


def test_dataset_skips_bad_records_and_counts(data, caplog):
    ds = SwimDataset(data, SMALL, tokenizer())
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == len(data)
    # Bad records 2, 4, 5, 6 are replaced by the next good record.
    assert torch.equal(samples[2]["input_ids"], samples[3]["input_ids"])
    assert torch.equal(samples[4]["input_ids"], samples[7]["input_ids"])
    assert ds.skips.counts == {
        "missing_video": 1,
        "mask_size": 1,
        "unreadable_video": 1,
        "frame_range": 1,
        "supervision_dropped:tag_count": 2,  # record 3, served for index 2 and for index 3
    }
    assert samples[3]["query_positions"].numel() == 0 and (samples[3]["labels"] != -100).any()
    assert samples[7]["query_positions"].numel() == 0  # QA record: text only
    assert samples[1]["object_targets"].shape == (0, 12) and samples[1]["object_group_valid"].shape == (0, 2)
    assert "corrupt.mp4" in caplog.text


def test_dataset_strict_raises_with_location(data):
    ds = SwimDataset(data, SMALL, tokenizer(), strict=True)
    with pytest.raises(RecordError) as e:
        ds[2]
    assert e.value.index == 2 and e.value.field == "video" and "missing.mp4" in e.value.reason


def test_dataset_gives_up_after_bounded_attempts(data):
    ds = SwimDataset([data[2], data[5]], SMALL, tokenizer())
    with pytest.raises(RuntimeError, match="bad records in a row"):
        ds[0]


def test_dataset_to_collator_end_to_end(data):
    ds = SwimDataset(data, SMALL, tokenizer(), supervise_qa=True)
    batch = SwimCollator(tokenizer().pad_token_id)([ds[0], ds[1], ds[7]])
    g = batch["grounding"]
    assert batch["input_ids"].shape[0] == 3 and batch["video_grid_thw"].shape == (3, 3)
    assert g["query_positions"][1].eq(-1).all()  # the LLaVA sample
    assert (g["query_positions"][2] >= 0).sum() == 2  # QA record supervised with supervise_qa
    _check_alignment(batch)
    tok_vid = batch["input_ids"] == VID
    assert batch["pixel_values_videos"].shape[0] == int(tok_vid.sum()) * 4


def test_image_record(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(tmp_path / "im.png")
    rec = {"image": "im.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                {"from": "gpt", "value": "Black."}]}  # fmt: skip
    write_json(tmp_path / "r.json", [rec])
    s = SwimDataset(load_records(tmp_path / "r.json")[0], SMALL, tokenizer())[0]
    t, h, w = s["image_grid_thw"][0].tolist()
    assert t == 1 and int((s["mm_token_type_ids"] == 1).sum()) == h * w // 4
    # the image is one group of vision tokens, laid out row-major on its merged grid
    assert "pixel_values_videos" not in s and s["vision_token_group"].tolist() == [0] * (h * w // 4)
    assert s["vision_token_cell"].tolist() == [[r, c] for r in range(h // 2) for c in range(w // 2)]
    batch = SwimCollator(0)([s, s])
    assert batch["grounding"] is None and batch["image_grid_thw"].shape == (2, 3)
