"""Corrupt data: each bad input either loads (where it is valid) or fails with a DataError
naming file:line and the problem; with on_error=skip every rejected record lands in the
rejects file with its reason; the CLI exits 2 with a message, never a traceback."""
from __future__ import annotations

import csv
import json

import pytest

from ftlab.data import DataError, prepare
from ftlab.data.prepare import load_examples
from tests.conftest import run_cli, store_overrides

GOOD = b'{"instruction": "Triage this", "input": "the app crashes", "output": "{\\"category\\":\\"bug\\"}"}'

# name -> (the bad line, None if it must load, else (reject kind, words of the reason))
CASES = {
    "truncated line": (b'{"instruction": "Triage this", "output": "x',
                       ("malformed_json", "malformed JSON (Unterminated string starting at: column 42)")),
    "trailing comma": (b'{"instruction": "a", "output": "b",}', ("malformed_json", "malformed JSON")),
    "two objects on a line": (b'{"instruction": "a", "output": "b"} {"x": 1}', ("malformed_json", "Extra data")),
    "bare string": (b'"just a string"', ("not_an_object", "expected a JSON object, got str")),
    "null line": (b"null", ("not_an_object", "got NoneType")),
    "array line": (b"[1, 2]", ("not_an_object", "got list")),
    "null output": (b'{"instruction": "a", "output": null}', ("missing_field", "missing or null field 'output'")),
    "missing output": (b'{"instruction": "a", "input": "b", "output2": "c"}', ("unknown_format", "has 'instruction' but no 'output'")),
    "no instruction": (b'{"input": "b", "output": "c"}', ("unknown_format", "has 'output' but no 'instruction'")),
    "no fields known": (b'{"question": "b", "answer": "c"}', ("unknown_format", "cannot tell the format")),
    "empty output": (b'{"instruction": "a", "output": "   "}', ("empty_field", "field 'output' is empty")),
    "number output": (b'{"instruction": "a", "output": 42}', ("wrong_type", "must be a string, got int")),
    "NaN output": (b'{"instruction": "a", "output": NaN}', ("wrong_type", "got float")),
    "empty conversation": (b'{"messages": []}', ("empty_conversation", "conversation is empty")),
    "wrong role": (b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
                   ("unknown_role", "unknown role 'robot'")),
    "missing role": (b'{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}',
                     ("unknown_role", "unknown role None")),
    "sharegpt unknown speaker": (b'{"conversations": [{"from": "bot", "value": "hi"}]}',
                                 ("unknown_role", "unknown role 'bot'")),
    "ends with user": (b'{"messages": [{"role": "user", "content": "hi"}]}',
                       ("no_final_assistant", "does not end with an assistant turn")),
    "no user turn": (b'{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}',
                     ("no_user_turn", "no user turn")),
    "content part without text": (b'{"messages": [{"role": "user", "content": [{"type": "text"}]}, '
                                  b'{"role": "assistant", "content": "x"}]}',
                                  ("wrong_type", "field 'content'[0] is a text part without a string 'text'")),
    "content is a number": (b'{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}',
                            ("wrong_type", "must be a string, got int")),
    "messages is a string": (b'{"messages": "hello"}', ("wrong_type", "not a JSON list of turns")),
    "turn is a string": (b'{"messages": ["hello", "bye"]}', ("wrong_type", "must be an object, got str")),
    "non-UTF-8 bytes": (b'{"instruction": "caf\xe9", "output": "x"}', ("invalid_utf8", "invalid UTF-8 at byte 20")),
    "lone surrogate escape": (b'{"instruction": "a\\ud800", "output": "x"}', ("invalid_utf8", "invalid Unicode")),
    "duplicate keys": (b'{"instruction": "a", "output": "b", "output": "c"}', ("duplicate_key", "duplicate key 'output'")),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, ("malformed_json", "nested too deeply")),
    # Valid input that must load as it is.
    "BOM": (b"\xef\xbb\xbf" + GOOD, None),
    "CRLF line ending": (GOOD + b"\r", None),
    "null optional input": (b'{"instruction": "a", "input": null, "output": "b"}', None),
    "unicode and emoji": ('{"instruction": "Où est 📦 包裹?", "output": "ok"}'.encode(), None),
    "NUL character escape": (b'{"instruction": "a\\u0000b", "output": "c"}', None),
    "extra unknown fields": (b'{"instruction": "a", "output": "b", "meta": {"source": "x"}}', None),
    "a 10 MB line": (json.dumps({"instruction": "log " * 2_500_000, "output": "x"}).encode(), None),
}


def write_case(tmp_path, line: bytes):
    """The bad line sits between two good ones, so it is line 2 (or line 1 with a BOM first)."""
    first = CASES["BOM"][0] if line.startswith(b"\xef\xbb\xbf") else GOOD
    path = tmp_path / "bad.jsonl"
    path.write_bytes(first + b"\n" + (line if first != line else GOOD) + b"\n" + GOOD + b"\n")
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_file_line_and_reason_or_loads(data_cfg, tmp_path, name):
    line, expected = CASES[name]
    if name == "BOM":
        path = tmp_path / "bad.jsonl"
        path.write_bytes(line + b"\n" + GOOD + b"\n")
    else:
        path = write_case(tmp_path, line)
    if expected is None:
        examples, rejects = load_examples(str(path), data_cfg(path=str(path)))
        assert rejects == [] and len(examples) in (2, 3)
        return
    kind, words = expected
    with pytest.raises(DataError) as raised:
        load_examples(str(path), data_cfg(path=str(path)))
    message = str(raised.value)
    assert f"{path}:2: " in message and words in message
    assert "1 bad record(s)" in message and "data.on_error=skip" in message


def test_skip_writes_every_reject_with_its_reason(data_cfg, tiny_tokenizer, tmp_path):
    bad = [(name, line, expected) for name, (line, expected) in CASES.items() if expected is not None]
    path = tmp_path / "all_bad.jsonl"
    goods = [json.dumps({"instruction": f"Ticket {i}: the {w} is broken", "output": f"answer {i}"}).encode()
             for i, w in enumerate(["app", "router", "portal", "watch", "earbuds", "client", "gateway", "backup"])]
    path.write_bytes(b"\n".join([*goods, *(line for _, line, _ in bad)]) + b"\n")
    rejects_file = tmp_path / "rejects.jsonl"
    cfg = data_cfg(path=str(path), on_error="skip", rejects=str(rejects_file), eval_size=2, dedupe=False)
    data = prepare(cfg, tiny_tokenizer, 256, tmp_path / "cache")

    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
    assert [r["where"] for r in rejects] == [f"{path}:{len(goods) + i + 1}" for i in range(len(bad))]
    for r, (name, _, (kind, words)) in zip(rejects, bad):
        assert r["kind"] == kind and words in r["reason"], name
        assert r["record"], name  # the source text is kept, so nothing is silently lost
    counts = data.report["counts"]
    assert counts["rejected_invalid"] == len(bad) and counts["records_in"] == len(bad) + len(goods)
    assert sum(data.report["rejects_by_kind"].values()) == len(bad)
    assert len(data.train) + len(data.held_out) == len(goods)


def test_many_errors_list_the_first_few_and_the_total(data_cfg, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"\n".join([GOOD] + [b'{"instruction": "a"}'] * 12) + b"\n")
    with pytest.raises(DataError) as raised:
        load_examples(str(path), data_cfg(path=str(path)))
    message = str(raised.value)
    assert message.startswith(f"12 bad record(s) in {path}")
    assert f"{path}:6: " in message and f"{path}:7: " not in message and "... and 7 more" in message


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_every_record_failing_the_same_way_is_one_message(data_cfg, tmp_path, on_error):
    """A label field or format the file does not have: the setting is wrong, not 50 records."""
    path = tmp_path / "reply.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q {i}", "reply": f"a {i}"}) + "\n" for i in range(50)))
    with pytest.raises(DataError) as raised:
        load_examples(str(path), data_cfg(path=str(path), on_error=on_error))
    message = str(raised.value)
    assert message.startswith(f"{path}: all 50 records are unusable for the same reason (the first at {path}:1): "
                              "has 'instruction' but no 'output' (its fields: ['instruction', 'reply']); alpaca records "
                              "need both: if it is under another name, set data.fields.output=<that name>"), message
    assert "\n" not in message


def test_the_10mb_line_is_dropped_as_overlong_and_empty_file_is_named(data_cfg, tiny_tokenizer, tmp_path):
    path = write_case(tmp_path, CASES["a 10 MB line"][0])
    data = prepare(data_cfg(path=str(path), eval_size=1, dedupe=False), tiny_tokenizer, 256, tmp_path / "c")
    assert data.report["counts"]["dropped_overlong"] == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=f"{empty}: no usable records"):
        load_examples(str(empty), data_cfg(path=str(empty)))


def test_a_csv_cell_over_the_csv_modules_limit_is_dropped_as_overlong(data_cfg, tiny_tokenizer, tmp_path):
    """Python's csv refuses cells over 128 KiB, which failed the whole file with a traceback."""
    path = tmp_path / "pasted_logs.csv"
    rows = [("Summarise this log", "log " * 50_000, "too long")] + [(f"ticket {i}", f"body {i}", "ok") for i in range(4)]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("instruction", "input", "output"), *rows])
    data = prepare(data_cfg(path=str(path), eval_size=1, dedupe=False), tiny_tokenizer, 256, tmp_path / "c")
    assert data.report["counts"]["dropped_overlong"] == 1
    assert len(data.train) + len(data.held_out) == 4


def test_bad_csv_and_json_files_name_the_row(data_cfg, tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b"instruction,output\r\na,b\r\nc,\r\nd,e,extra\r\ncaf\xe9,x\r\n")
    with pytest.raises(DataError) as raised:
        load_examples(str(csv_path), data_cfg(path=str(csv_path)))
    message = str(raised.value)
    assert f"{csv_path}:3: field 'output' is empty" in message
    assert f"{csv_path}:4: row has more cells" in message
    assert f"{csv_path}:5: field 'instruction' holds bytes that are not UTF-8 (byte 0xe9): save the file as UTF-8" \
        in message  # Windows-1252's é
    json_path = tmp_path / "bad.json"
    json_path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a",\n]\n')
    with pytest.raises(DataError, match=f"{json_path}:4: malformed JSON"):
        load_examples(str(json_path), data_cfg(path=str(json_path)))


def test_cli_exits_2_with_a_message_and_no_traceback(tmp_path):
    path = write_case(tmp_path, CASES["null output"][0])
    proc = run_cli("model=tiny", f"data.path={path}", *store_overrides(tmp_path), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"{path}:2: missing or null field 'output'" in proc.stderr
