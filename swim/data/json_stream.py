"""Streaming reader for big JSON record files (VideoRefer-700K ships multi-GB JSON arrays).

`iter_json_records(path)` yields ``(position, object)`` from

- a ``.json`` file holding a JSON array (one record per element) or a single JSON object (position 0);
- a ``.jsonl`` file (one record per non-blank line).

Memory stays flat whatever the file size: the file is read in binary chunks, decoded incrementally as UTF-8
(a multi-byte character split across two chunks is completed by the next one) and each array element is
decoded with `json.JSONDecoder.raw_decode` from a buffer that only ever holds the unread tail of the file plus
the record being decoded. When an element does not fit in the buffer, more is read — the read size doubles
each time, so a single record of S bytes costs O(S) work, not O(S^2) — and the element is decoded again.
A failure is a real error only when the decoder stopped at a character that is present and far enough from
the end of the buffer for more input to be unable to change the outcome, or at the end of the file.

Errors raise `swim.data.records.RecordError(path, position, "<file>", reason, "json")` naming the file, the
position of the record that could not be read and (in the reason) its byte offset; a file that cannot be
opened raises the same with position None and code ``"file"``. For ``.jsonl`` files a bad line raises with
its position, or, with ``bad_lines="yield"``, is yielded as ``(position, RecordError)`` and reading goes on
(the caller decides).

No dependency beyond the standard library (the usual choice would be ``ijson``).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from swim.data.records import RecordError

_WS = " \t\n\r"
# An error this many characters or more before the end of the buffer cannot be caused by truncation: the
# longest look-ahead of the decoder is a "\\uXXXX\\uXXXX" surrogate pair or "-Infinity" (12 and 9 chars).
_LOOKAHEAD = 16


class _Reader:
    """A str buffer over a binary file, with byte offsets for error messages."""

    def __init__(self, fh: BinaryIO, path: Path, chunk_size: int):
        self.fh, self.path, self.chunk_size = fh, path, max(1, int(chunk_size))
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0  # next unread character of buf
        self.bytes_read = 0  # bytes read from the file so far
        self.eof = False
        self.first = True

    def error(self, position: int | None, reason: str, at: int | None = None) -> RecordError:
        at = self.pos if at is None else at
        # counted back from the end of what was read (only on errors: no per-chunk encoding cost)
        pending = len(self.decoder.getstate()[0])
        offset = self.bytes_read - pending - len(self.buf[at:].encode("utf-8", "surrogatepass"))
        return RecordError(self.path, position, "<file>", f"{reason} (byte offset {offset})", "json")

    def read(self, n: int, position: int | None) -> bool:
        """Append about n more bytes of text; False at the end of the file."""
        if self.eof:
            return False
        data = self.fh.read(max(n, 1))
        self.bytes_read += len(data)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            offset = self.bytes_read - len(data) + e.start
            reason = f"invalid UTF-8: {e.reason} (byte offset {offset})"
            raise RecordError(self.path, position, "<file>", reason, "json") from e
        got = bool(data) or bool(text)
        if not data:
            self.eof = True
        del data
        if self.first and text.startswith("\ufeff"):  # UTF-8 byte-order mark
            text = text[1:]
        self.first = self.first and not text
        if self.pos > self.chunk_size or self.pos > len(self.buf) // 2:  # compact: amortised O(1) per byte
            self.buf = self.buf[self.pos :]
            self.pos = 0
        self.buf += text
        return got

    def peek(self, position: int | None) -> str:
        """The next non-whitespace character ('' at the end of the file), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.read(self.chunk_size, position):
                return ""

    def value(self, decoder: json.JSONDecoder, position: int) -> Any:
        """Decode the JSON value that starts at pos (reading more as needed) and move past it."""
        want = self.chunk_size
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                truncated = e.pos >= len(self.buf) - _LOOKAHEAD or e.msg.startswith("Unterminated string")
                if self.eof or not truncated:
                    raise self.error(position, f"invalid JSON in record {position}: {e.msg}", at=e.pos) from e
            else:
                # a number may continue in the next chunk ("12" | "34", "3." | "5", "1e" | "-5"): only trust a
                # value that ends well before the buffer does, or at the end of the file
                if end < len(self.buf) - _LOOKAHEAD or self.eof:
                    self.pos = end
                    return obj
            want = max(want, len(self.buf) - self.pos)  # geometric growth: a big record costs O(size)
            self.read(want, position)


def iter_json_records(
    path: str | Path, *, chunk_size: int = 1 << 20, bad_lines: Literal["raise", "yield"] = "raise"
) -> Iterator[tuple[int, Any]]:
    """Yield ``(position, object)`` from a ``.json`` array / single object or a ``.jsonl`` file, streaming.

    Raises `RecordError` (code ``"json"``; ``"file"`` if the file cannot be opened) naming the file, the record
    position and the byte offset. ``bad_lines="yield"`` (``.jsonl`` only) yields ``(position, RecordError)``
    for an undecodable line instead of raising, and goes on with the next line.
    """
    path = Path(path)
    if bad_lines not in ("raise", "yield"):
        raise ValueError(f"bad_lines must be 'raise' or 'yield', got {bad_lines!r}")
    try:
        fh = path.open("rb")
    except OSError as e:
        raise RecordError(path, None, "<file>", f"cannot read: {e}", "file") from e
    with fh:
        if path.suffix == ".jsonl":
            yield from _iter_lines(fh, path, bad_lines)
        else:
            yield from _iter_array(fh, path, chunk_size)


def _iter_lines(fh: BinaryIO, path: Path, bad_lines: str) -> Iterator[tuple[int, Any]]:
    position, offset = 0, 0
    for lineno, raw in enumerate(fh, 1):
        start, offset = offset, offset + len(raw)
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else f"invalid UTF-8: {e.reason}"
            err = RecordError(path, position, "<file>", f"line {lineno}: {msg} (byte offset {start})", "json")
            if bad_lines == "raise":
                raise err from e
            obj = err
        yield position, obj
        position += 1


def _iter_array(fh: BinaryIO, path: Path, chunk_size: int) -> Iterator[tuple[int, Any]]:
    r = _Reader(fh, path, chunk_size)
    decoder = json.JSONDecoder()
    first = r.peek(0)
    if first == "{":
        yield 0, r.value(decoder, 0)
        _expect_end(r, 1)
        return
    if first != "[":
        what = "an empty file" if first == "" else f"{first!r}"
        raise r.error(None, f"expected a JSON array of records or one object, found {what}")
    r.pos += 1
    position = 0
    if r.peek(0) == "]":
        r.pos += 1
        _expect_end(r, 0)
        return
    while True:
        c = r.peek(position)
        if c == "":
            raise r.error(position, f"file ends inside the array, before record {position}")
        yield position, r.value(decoder, position)
        position += 1
        c = r.peek(position)
        if c == ",":
            r.pos += 1
            if r.peek(position) == "]":
                raise r.error(position, "trailing comma before ']'")
            continue
        if c == "]":
            r.pos += 1
            _expect_end(r, position)
            return
        if c == "":
            raise r.error(position, f"file ends inside the array, after record {position - 1}")
        raise r.error(position, f"expected ',' or ']' after record {position - 1}, found {c!r}")


def _expect_end(r: _Reader, position: int) -> None:
    c = r.peek(position)
    if c:
        raise r.error(position, f"unexpected {c!r} after the end of the JSON value")
