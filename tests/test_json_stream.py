"""swim.data.json_stream: streaming JSON array / JSONL reader (flat memory, exact results, located errors)."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from swim.data.json_stream import iter_json_records
from swim.data.records import RecordError

TRICKY = [
    {"a": "caf\u00e9 \u2713 \U0001f600 \u6f22\u5b57", "b": 'quote " and \\ backslash \\" ]},[{'},
    [],
    {},
    [[], [[[]]], {"x": [1, {"y": "]"}]}],
    "a string with , and ] and [ and } and {",
    -12345678901234567890,
    3.5e-10,
    0,
    True,
    False,
    None,
    {"\u00e9\U0001f600": ["\u00e9" * 11, "\U0001f600" * 5, "\n\t\r\\/\b\f"]},
    {"segmentation": {"size": [480, 640], "counts": "PPYo0e0k0O2N1O1N2" * 20}},
]


def _write(tmp_path, text: str, name="data.json"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


def _read(path, **kw):
    return [obj for _, obj in iter_json_records(path, **kw)]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("style", ["compact", "spaced", "ascii"])
def test_equals_json_load_on_tricky_input(tmp_path, chunk_size, style):
    if style == "compact":
        text = json.dumps(TRICKY, ensure_ascii=False, separators=(",", ":"))
    elif style == "spaced":  # whitespace and newlines around every token
        text = "\n \t" + json.dumps(TRICKY, ensure_ascii=False, separators=(" \r\n ,  ", " :\t ")) + "\n\n"
    else:
        text = json.dumps(TRICKY)  # \uXXXX escapes, surrogate pairs split across chunks
    path = _write(tmp_path, text)
    expected = json.loads(text)
    got = list(iter_json_records(path, chunk_size=chunk_size))
    assert [p for p, _ in got] == list(range(len(expected)))
    assert [o for _, o in got] == expected


@pytest.mark.parametrize("text", ["[]", " [ \n ] \n", "\ufeff[]"])
def test_empty_array(tmp_path, text):
    assert _read(_write(tmp_path, text), chunk_size=1) == []


def test_single_object_is_position_0(tmp_path):
    obj = {"id": 3, "video": "v.mp4", "annotation": [{"0": {"segmentation": None}}]}
    assert list(iter_json_records(_write(tmp_path, " " + json.dumps(obj) + "\n"), chunk_size=5)) == [(0, obj)]


def test_numbers_split_across_chunks(tmp_path):
    values = [1234567, -0.000123, 1e300, 98765432109876543210, -7]
    text = json.dumps(values).replace(" ", "")
    for chunk in range(1, 12):
        assert _read(_write(tmp_path, text), chunk_size=chunk) == values


def test_jsonl(tmp_path):
    lines = [json.dumps(o, ensure_ascii=False) for o in TRICKY[:4]]
    path = _write(tmp_path, lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n  \n", "data.jsonl")
    assert list(iter_json_records(path)) == list(enumerate(TRICKY[:4]))


def test_jsonl_bad_line_raises_or_is_yielded(tmp_path):
    path = _write(tmp_path, '{"a": 1}\n\n{"b": \n[3]\n', "data.jsonl")
    with pytest.raises(RecordError) as e:
        list(iter_json_records(path))
    assert e.value.index == 1 and e.value.code == "json" and "line 3" in e.value.reason
    assert "byte offset 10" in e.value.reason and str(path) in str(e.value)
    got = list(iter_json_records(path, bad_lines="yield"))
    assert [p for p, _ in got] == [0, 1, 2]
    assert got[0][1] == {"a": 1} and isinstance(got[1][1], RecordError) and got[2][1] == [3]


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ('[{"a": 1}, {"b": }, {"c": 3}]', 1, "invalid JSON in record 1"),
        ('[{"a": 1} {"b": 2}]', 1, "expected ',' or ']'"),
        ('[{"a": 1}, ]', 1, "trailing comma"),
        ('[{"a": 1}, {"b": 2}', 2, "file ends inside the array"),
        ('[{"a": 1}, {"b": [1, 2', 1, "invalid JSON in record 1"),
        ('[{"a": 1}, "unterminated', 1, "Unterminated string"),
        ("[1] x", 1, "after the end"),
        ("42", None, "expected a JSON array"),
        ("", None, "empty file"),
    ],
)
def test_errors_name_file_position_and_offset(tmp_path, text, position, fragment):
    path = _write(tmp_path, text)
    for chunk_size in (3, 1 << 20):
        with pytest.raises(RecordError) as e:
            list(iter_json_records(path, chunk_size=chunk_size))
        assert e.value.index == position and e.value.code == "json" and e.value.field == "<file>"
        assert fragment in e.value.reason and "byte offset" in e.value.reason
        assert str(path) in str(e.value)


def test_error_byte_offset_counts_bytes_not_characters(tmp_path):
    text = '[{"é": "\U0001f600"}, {"b": }]'
    path = _write(tmp_path, text)
    with pytest.raises(RecordError) as e:
        list(iter_json_records(path, chunk_size=2))
    assert f"byte offset {text.encode().index(b'}]')}" in e.value.reason


def test_invalid_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"a": "\xff\xfe"}]')
    for chunk_size in (1, 4, 1 << 20):
        with pytest.raises(RecordError, match=r"invalid UTF-8.*byte offset 8\)"):
            list(iter_json_records(path, chunk_size=chunk_size))
    with pytest.raises(RecordError) as e:
        list(iter_json_records(tmp_path / "missing.json"))
    assert e.value.code == "file" and e.value.index is None


def test_huge_single_record_costs_linear_time(tmp_path):
    big = {"counts": "x" * (8 << 20), "n": list(range(1000))}
    path = _write(tmp_path, json.dumps([big, {"small": 1}]))
    start = time.perf_counter()
    got = _read(path, chunk_size=1024)  # 8 MB from 1 KB chunks: quadratic re-reading would take minutes
    assert time.perf_counter() - start < 3.0
    assert got == [big, {"small": 1}]


def test_corrupt_record_early_does_not_read_the_rest(tmp_path):
    record = json.dumps({"counts": "y" * 10_000})
    path = tmp_path / "corrupt.json"
    with path.open("w") as f:
        f.write('[{"a": 1}, {"b": 2,, "c": 3}')
        for _ in range(2000):  # 20 MB after the bad record
            f.write("," + record)
        f.write("]")
    tracemalloc.start()
    try:
        with pytest.raises(RecordError) as e:
            list(iter_json_records(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.index == 1
    assert peak < 8 << 20


def test_streaming_50mb_array_with_flat_memory(tmp_path):
    record = {
        "id": "x",
        "video": "videos/\u00e9t\u00e9.mp4",
        "conversations": [{"from": "human", "value": "<video>\nWhat is <region> doing? [\u2713]"}],
        "annotation": [
            {str(t): {"segmentation": {"size": [480, 640], "counts": "ab\\]c" * 200}} for t in range(4)}
        ],
        "ratio": 0.8,
    }
    line = json.dumps(record, ensure_ascii=False)
    n = (50 << 20) // len(line.encode()) + 1
    path = tmp_path / "big.json"
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            f.write(("," if i else "") + line + "\n")
        f.write("]\n")
    assert path.stat().st_size > 50 << 20
    start = time.perf_counter()
    tracemalloc.start()
    try:
        count, last = 0, None
        for position, obj in iter_json_records(path):
            assert position == count
            count, last = count + 1, obj
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert count == n and last == record
    print(f"peak {peak / 2**20:.1f} MiB, {elapsed:.1f} s")
    assert peak < 10 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 10, f"{elapsed:.1f} s"
