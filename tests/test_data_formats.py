"""Every supported format, in every supported container (JSONL, JSON array, CSV, TSV, Parquet,
datasets save_to_disk), normalises to the same chat messages; field names can be remapped."""
from __future__ import annotations

import csv
import json
import re

import pytest
from hydra.errors import ConfigCompositionException

from ftlab.data import DataError
from ftlab.data.prepare import load_examples

CONVERSATIONS = [
    [{"role": "user", "content": "Reset my password\n\nI am locked out."},
     {"role": "assistant", "content": '{"category":"account"}'}],
    [{"role": "user", "content": "Où est ma commande ? 📦"}, {"role": "assistant", "content": "En route."}],
]


def as_format(messages: list[dict], fmt: str) -> dict:
    user, answer = messages[0]["content"], messages[1]["content"]
    if fmt == "alpaca":
        instruction, _, extra = user.partition("\n\n")
        return {"instruction": instruction, "input": extra, "output": answer}
    if fmt == "prompt_completion":
        return {"prompt": user, "completion": answer}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}
    return {"messages": messages}


def write(records: list[dict], path):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    elif path.suffix in (".csv", ".tsv"):
        # Lists (turns) go into CSV cells as JSON strings, as spreadsheet exports hold them.
        rows = [{k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in r.items()}
                for r in records]
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        from datasets import Dataset, DatasetDict

        DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("container", ["data.jsonl", "data.json", "data.csv", "data.tsv", "data.parquet", "hf_dir"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "prompt_completion"])
def test_each_format_and_container_round_trips_to_the_same_messages(data_cfg, tmp_path, fmt, container):
    path = write([as_format(m, fmt) for m in CONVERSATIONS], tmp_path / container)
    for declared in ("auto", fmt):
        examples, rejects = load_examples(str(path), data_cfg(path=str(path), format=declared))
        assert rejects == []
        assert [e.messages for e in examples] == CONVERSATIONS


def test_where_names_the_line_or_row(data_cfg, tmp_path):
    jsonl = write([as_format(m, "alpaca") for m in CONVERSATIONS], tmp_path / "a.jsonl")
    examples, _ = load_examples(str(jsonl), data_cfg())
    assert [e.where for e in examples] == [f"{jsonl}:1", f"{jsonl}:2"]
    parquet = write([as_format(m, "alpaca") for m in CONVERSATIONS], tmp_path / "a.parquet")
    examples, _ = load_examples(str(parquet), data_cfg())
    assert examples[1].where == f"{parquet}: row 2"


@pytest.mark.parametrize("fmt,fields,record", [
    ("alpaca", {"instruction": "question", "input": "context", "output": "answer"},
     {"question": "Reset my password", "context": "I am locked out.", "answer": '{"category":"account"}'}),
    ("prompt_completion", {"prompt": "q", "completion": "a"},
     {"q": "Reset my password\n\nI am locked out.", "a": '{"category":"account"}'}),
    ("sharegpt", {"conversations": "dialog", "sharegpt_from": "speaker", "sharegpt_value": "text"},
     {"dialog": [{"speaker": "human", "text": "Reset my password\n\nI am locked out."},
                 {"speaker": "gpt", "text": '{"category":"account"}'}]}),
    ("messages", {"messages": "chat", "role": "who", "content": "body"},
     {"chat": [{"who": "user", "body": "Reset my password\n\nI am locked out."},
               {"who": "assistant", "body": '{"category":"account"}'}]}),
])
def test_field_names_can_be_remapped(data_cfg, tmp_path, fmt, fields, record):
    path = write([record], tmp_path / "renamed.jsonl")
    for declared in ("auto", fmt):
        examples, _ = load_examples(str(path), data_cfg(fields=fields, format=declared))
        assert examples[0].messages == CONVERSATIONS[0]


def test_field_mapping_from_the_command_line_and_typos(make_cfg):
    assert make_cfg("data.fields={output:answer}").data.fields.output == "answer"
    assert make_cfg("data.fields.instruction=question").data.fields.instruction == "question"
    with pytest.raises(ConfigCompositionException, match="answr"):
        make_cfg("data.fields.answr=x")


def test_system_turns_and_system_prompt(data_cfg, tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}]}
    path = write([sharegpt, as_format(CONVERSATIONS[1], "alpaca")], tmp_path / "s.jsonl")
    examples, _ = load_examples(str(path), data_cfg(system_prompt="Answer in JSON."))
    assert examples[0].messages[0] == {"role": "system", "content": "Be brief."}  # the record's own wins
    assert examples[1].messages[0] == {"role": "system", "content": "Answer in JSON."}


def test_hf_split_is_chosen_and_a_missing_one_is_named(data_cfg, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([as_format(CONVERSATIONS[0], "alpaca")]),
                 "test": Dataset.from_list([as_format(CONVERSATIONS[1], "alpaca")])}).save_to_disk(str(tmp_path / "d"))
    examples, _ = load_examples(str(tmp_path / "d"), data_cfg(hf_split="test"))
    assert examples[0].messages == CONVERSATIONS[1]
    with pytest.raises(DataError, match=r"data.hf_split=valid: .* has splits \['test', 'train'\]"):
        load_examples(str(tmp_path / "d"), data_cfg(hf_split="valid"))


def test_hf_split_of_a_dataset_saved_alone(data_cfg, tmp_path, caplog):
    """A Dataset saved without its DatasetDict was read whole whatever data.hf_split asked for."""
    from datasets import Dataset, Split

    rows = [as_format(c, "alpaca") for c in CONVERSATIONS]
    Dataset.from_list(rows, split=Split.TRAIN).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(DataError, match=r"data.hf_split=test: .*train_only holds the train split only"):
        load_examples(str(tmp_path / "train_only"), data_cfg(hf_split="test"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "no_split"))
    examples, _ = load_examples(str(tmp_path / "no_split"), data_cfg(hf_split="test"))
    assert len(examples) == len(CONVERSATIONS)
    assert "data.hf_split=test: " in caplog.text and "no_split is one dataset without splits" in caplog.text


def test_openai_content_parts_are_joined_and_non_text_parts_rejected(data_cfg, tmp_path):
    user, answer = CONVERSATIONS[0][0]["content"], CONVERSATIONS[0][1]["content"]
    head, tail = user.split("\n\n")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": head + "\n\n"},
                                                       {"type": "text", "text": tail}]},
                          {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    path = write([parts, image], tmp_path / "openai.jsonl")
    examples, rejects = load_examples(str(path), data_cfg(path=str(path), on_error="skip"))
    assert [e.messages for e in examples] == [CONVERSATIONS[0]]
    assert [r["reason"] for r in rejects] == [
        "messages[0]: field 'content' holds a part of type 'image_url'; only text parts can be trained on"]


@pytest.mark.parametrize("container", ["jsonl", "parquet"])
def test_a_json_object_or_list_answer_is_trained_on_as_compact_json(data_cfg, tmp_path, container):
    """Extraction data often holds the answer as an object, not a string of JSON: it becomes the
    compact JSON the embedded task trains on (and the JSON metrics score)."""
    records = [{"instruction": "Extract the clause.", "input": "Pay within 30 days, café.",
                "output": {"type": "payment", "days": 30, "where": "café"}},
               {"prompt": "List the parties.", "completion": ["Acme", "Globex"]}]
    path = write(records[:1], tmp_path / f"object.{container}")
    write(records[1:], tmp_path / "list.jsonl")
    examples, _ = load_examples(str(path), data_cfg())
    assert examples[0].messages[-1]["content"] == '{"type":"payment","days":30,"where":"café"}'
    examples, _ = load_examples(str(tmp_path / "list.jsonl"), data_cfg())
    assert examples[0].messages[-1]["content"] == '["Acme","Globex"]'


def test_a_directory_of_shards_is_read_in_name_order(data_cfg, tmp_path):
    """Exports often come as a folder of part files (Spark, pandas, split by hand), with markers beside them."""
    shards = tmp_path / "export"
    (shards / "year=2026").mkdir(parents=True)
    write([as_format(CONVERSATIONS[0], "alpaca")], shards / "part-0.parquet")
    write([as_format(CONVERSATIONS[1], "messages")], shards / "year=2026" / "part-1.jsonl")
    (shards / "_SUCCESS").write_text("")
    (shards / ".part-0.parquet.crc").write_bytes(b"\x00crc")
    (shards / "_temporary").mkdir()
    (shards / "_temporary" / "part-9.jsonl").write_text("{broken")
    (shards / "dataset_infos.json").write_text('{"default": {"features": {}}}')  # a hub snapshot's description
    examples, rejects = load_examples(str(shards), data_cfg(path=str(shards)))
    assert rejects == []
    assert [e.messages for e in examples] == CONVERSATIONS
    assert [e.where for e in examples] == [f"{shards / 'part-0.parquet'}: row 1",
                                           f"{shards / 'year=2026' / 'part-1.jsonl'}:1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is a directory without data files \(.jsonl, .*\) and not a datasets"):
        load_examples(str(tmp_path / "empty"), data_cfg())


def test_a_directory_of_split_files_is_read_for_data_hf_split_only(data_cfg, tmp_path, caplog):
    """A downloaded dataset with train.jsonl beside test.jsonl: the test set must not join the pool."""
    published = tmp_path / "published"
    (published / "data").mkdir(parents=True)
    write([as_format(CONVERSATIONS[0], "alpaca")], published / "data" / "train-00000-of-00001.parquet")
    write([as_format(CONVERSATIONS[1], "alpaca")], published / "test.jsonl")
    write([as_format(CONVERSATIONS[1], "messages")], published / "dev.csv")
    for split, expected in (("train", [CONVERSATIONS[0]]), ("test", [CONVERSATIONS[1]]), ("valid", [CONVERSATIONS[1]])):
        examples, _ = load_examples(str(published), data_cfg(path=str(published), hf_split=split))
        assert [e.messages for e in examples] == expected, split
    assert "reading the train split (data.hf_split=train): 1 file(s); left out: dev.csv, test.jsonl" in caplog.text
    with pytest.raises(DataError, match=r"holds files of the splits \['test', 'train', 'validation'\], none of "
                                        r"data.hf_split=holdout; set data.hf_split to one of them"):
        load_examples(str(published), data_cfg(path=str(published), hf_split="holdout"))


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.tsv", "data.csv"])
def test_utf16_text_with_a_byte_order_mark_is_read(data_cfg, tmp_path, name):
    """Excel's "Unicode Text" export (UTF-16 TSV) and PowerShell's Out-File write UTF-16 with a BOM."""
    utf8 = write([as_format(m, "alpaca") for m in CONVERSATIONS], tmp_path / name)
    utf16 = tmp_path / "utf16" / name
    utf16.parent.mkdir()
    utf16.write_bytes(utf8.read_text(encoding="utf-8").encode("utf-16"))  # BOM, then UTF-16 in native order
    examples, rejects = load_examples(str(utf16), data_cfg(path=str(utf16)))
    assert rejects == [] and [e.messages for e in examples] == CONVERSATIONS
    utf16.write_bytes(b"\xff\xfe" + b"\x00\xd8" + b"a\x00")  # a lone surrogate
    with pytest.raises(DataError, match=rf"{name}: starts with UTF-16's byte-order mark but is not UTF-16 text"):
        load_examples(str(utf16), data_cfg(path=str(utf16)))


def test_a_csv_with_semicolons_is_read_by_its_header(data_cfg, tmp_path):
    """Spreadsheets in locales with a decimal comma export `;`-separated "CSV"."""
    path = tmp_path / "export.csv"
    path.write_text('instruction;input;output\nReset my password;I am locked out.;"{""category"":""account""}"\n'
                    "Où est ma commande ? 📦;;En route.\n", encoding="utf-8")
    examples, rejects = load_examples(str(path), data_cfg(path=str(path)))
    assert rejects == []
    assert [e.messages for e in examples] == CONVERSATIONS


def test_unreadable_parquet_and_datasets_directories_are_named(data_cfg, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        load_examples(str(tmp_path / "bad.parquet"), data_cfg())
    ds = write([as_format(m, "alpaca") for m in CONVERSATIONS], tmp_path / "hf_dir")
    for arrow in ds.rglob("*.arrow"):
        arrow.unlink()
    with pytest.raises(DataError, match=r"hf_dir: not a readable datasets save_to_disk directory"):
        load_examples(str(ds), data_cfg())


def test_missing_file_and_unknown_extension_are_named(data_cfg, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), data_cfg())
    # Relative paths that look like owner/name are still files when they name one (no hub lookup).
    monkeypatch.chdir(tmp_path)
    for relative in ("./nope.jsonl", "data/train.jsonl", "data/train.csv.gz"):
        with pytest.raises(DataError, match=rf"^data.path: {re.escape(relative.removeprefix('./'))} does not exist "
                                            rf"\(relative to {re.escape(str(tmp_path))}, where the command ran\)$"):
            load_examples(relative, data_cfg())
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown extension"):
        load_examples(str(tmp_path / "data.txt"), data_cfg())


def test_rendered_with_the_models_chat_template(data_cfg, tmp_path, tiny_tokenizer):
    """Token counts are those of the tokenizer's own chat template, prompt and answer apart."""
    from ftlab.data.clean import measure

    path = write([as_format(m, "messages") for m in CONVERSATIONS], tmp_path / "m.jsonl")
    examples, _ = load_examples(str(path), data_cfg())
    measure(examples, tiny_tokenizer)
    for e in examples:
        prompt = tiny_tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, return_dict=False)
        full = tiny_tokenizer.apply_chat_template(e.messages, return_dict=False)
        assert (e.prompt_tokens, e.tokens) == (len(prompt), len(full))


@pytest.mark.parametrize("compression", [".gz", ".bz2", ".xz"])
def test_compressed_text_files_and_shards_are_read_and_a_damaged_one_is_named(data_cfg, tmp_path, compression):
    """Exports come compressed (data.jsonl.gz, Spark's part-00000.csv.gz); a truncated download names the file."""
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[compression]
    shards = tmp_path / "export"
    shards.mkdir()
    for i, (name, fmt) in enumerate([("a.jsonl", "alpaca"), ("b.json", "messages"), ("c.csv", "alpaca"),
                                     ("d.tsv", "prompt_completion")]):
        plain = write([as_format(m, fmt) for m in CONVERSATIONS], tmp_path / name)
        packed = shards / f"part-{i}-{name}{compression}"
        packed.write_bytes(compress(plain.read_bytes()))
        examples, rejects = load_examples(str(packed), data_cfg(path=str(packed)))
        assert rejects == [] and [e.messages for e in examples] == CONVERSATIONS, name
    examples, rejects = load_examples(str(shards), data_cfg(path=str(shards)))
    assert rejects == [] and [e.messages for e in examples] == CONVERSATIONS * 4
    assert examples[0].where == f"{shards / ('part-0-a.jsonl' + compression)}:1"

    damaged = tmp_path / f"damaged.jsonl{compression}"
    damaged.write_bytes(packed.read_bytes()[:-20])
    with pytest.raises(DataError, match=rf"damaged.jsonl\{compression}: not a readable {compression[1:]} file"):
        load_examples(str(damaged), data_cfg(path=str(damaged)))
    (tmp_path / "data.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"unknown extension; use .jsonl, .* \(the text ones also as .gz, .bz2 or .xz\)"):
        load_examples(str(tmp_path / "data.parquet.gz"), data_cfg())


def test_records_under_a_key_of_one_json_object_are_read_with_data_json_field(data_cfg, tmp_path):
    """{"version": 2, "data": [...]}, as datasets' load_dataset("json", field="data") reads it; without
    the key the error says which key to give, and a key that cannot hold records is named."""
    records = [as_format(m, "alpaca") for m in CONVERSATIONS]
    wrapped = tmp_path / "squad_like.json"
    wrapped.write_text(json.dumps({"version": 2, "data": records}, indent=2), encoding="utf-8")
    examples, _ = load_examples(str(wrapped), data_cfg(json_field="data"))
    assert [e.messages for e in examples] == CONVERSATIONS and examples[1].where == f"{wrapped}: data[1]"
    with pytest.raises(DataError, match=r"its 'data' holds a list of 2 objects: if they are the records, set "
                                        r"data.json_field=data"):
        load_examples(str(wrapped), data_cfg())
    with pytest.raises(DataError, match=r"data.json_field=version: .*'version' is a number, not a list of records"):
        load_examples(str(wrapped), data_cfg(json_field="version"))
    with pytest.raises(DataError, match=r"data.json_field=rows: .* has no key 'rows'; its keys: \['data', 'version'\]"):
        load_examples(str(wrapped), data_cfg(json_field="rows"))
    for other in (write(records, tmp_path / "array.json"), write(records, tmp_path / "lines.jsonl")):
        with pytest.raises(DataError, match=r"data.json_field=data: "):
            load_examples(str(other), data_cfg(json_field="data"))
    # One pretty-printed record is a file of one record (it was read line by line as JSON Lines).
    one = tmp_path / "one.json"
    one.write_text(json.dumps(records[0], indent=2), encoding="utf-8")
    assert [e.messages for e in load_examples(str(one), data_cfg())[0]] == CONVERSATIONS[:1]


def test_trl_conversational_prompt_completion_is_read_as_chat_turns(data_cfg, tmp_path):
    """TRL's conversational prompt-completion rows (what ftlab itself hands TRL) were trained on as the
    JSON text of the turn lists."""
    system = {"role": "system", "content": "Answer in JSON."}
    rows = [{"prompt": [system, CONVERSATIONS[0][0]], "completion": [CONVERSATIONS[0][1]]},
            {"prompt": [CONVERSATIONS[1][0]], "completion": CONVERSATIONS[1][1]["content"]}]
    examples, _ = load_examples(str(write(rows, tmp_path / "trl.jsonl")), data_cfg())
    assert [e.messages for e in examples] == [[system, *CONVERSATIONS[0]], CONVERSATIONS[1]]
    # A plain prompt with a conversational completion; a turn without its role is a bad record, not
    # the JSON text of the lists (the whole record was trained on so, and counted valid).
    mixed = [{"prompt": CONVERSATIONS[0][0]["content"], "completion": [CONVERSATIONS[0][1]]},
             {"prompt": [system, {"content": "question"}], "completion": [CONVERSATIONS[1][1]]},
             {"prompt": "question", "completion": [{"content": "answer"}, CONVERSATIONS[1][1]]}]
    # A structured answer whose objects have a field named role is no conversation.
    people = [{"name": "bob", "role": "admin"}, {"name": "eve", "role": "viewer"}]
    mixed.append({"prompt": "Who has access?", "completion": people})
    path = write(mixed, tmp_path / "mixed.jsonl")
    examples, rejects = load_examples(str(path), data_cfg(on_error="skip"))
    assert [e.messages for e in examples] == [CONVERSATIONS[0], [
        {"role": "user", "content": "Who has access?"},
        {"role": "assistant", "content": json.dumps(people, separators=(",", ":"))}]]
    assert [(r["where"], r["kind"], r["reason"]) for r in rejects] == [
        (f"{path}:2", "unknown_role", "prompt[1] has unknown role None"),
        (f"{path}:3", "unknown_role", "completion[0] has unknown role None")]


@pytest.mark.parametrize("record", [
    {"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}]},
    {"conversations": [{"from": {"name": "human"}, "value": "hi"}, {"from": "gpt", "value": "x"}]},
])
def test_a_role_that_is_no_string_is_a_bad_record_not_a_crash(data_cfg, tmp_path, record):
    path = write([record, as_format(CONVERSATIONS[0], "messages")], tmp_path / "d.jsonl")
    examples, rejects = load_examples(str(path), data_cfg(on_error="skip"))
    assert len(examples) == 1 and [(r["where"], r["kind"]) for r in rejects] == [(f"{path}:1", "unknown_role")]
    assert "[0] has unknown role" in rejects[0]["reason"]


def test_a_csv_quote_never_closed_a_repeated_column_and_a_multi_line_row_are_named_by_their_first_line(data_cfg,
                                                                                                       tmp_path):
    """A cell opening a quote it never closes took the rest of the file as one cell (900 records
    became one unknown_format reject at the last line); a repeated column let its last cell win."""
    rows = ["instruction,output", *(f"question {i},answer {i}" for i in range(1000))]
    rows[101] = '"Hi there,answer 100'
    stray = tmp_path / "stray.csv"
    stray.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(stray))}:102: unreadable CSV \(unexpected end of data\)"):
        load_examples(str(stray), data_cfg(on_error="skip"))
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("instruction,output,output\nQ1,good answer,\nQ2,,other answer\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(repeated))}:1: the header names 'output' more than once"):
        load_examples(str(repeated), data_cfg())
    multi_line = tmp_path / "multi_line.csv"
    multi_line.write_text('instruction,output\n"a question\nover three\nlines",an answer\nq2,a2\n')
    assert [e.where for e in load_examples(str(multi_line), data_cfg())[0]] == [f"{multi_line}:2", f"{multi_line}:5"]


def test_a_repeated_key_in_a_json_array_is_that_records_fault_not_the_files(data_cfg, tmp_path):
    """One record repeating a key failed the whole .json file, without saying where, even with
    data.on_error=skip (JSON Lines named the line and kept the rest)."""
    path = tmp_path / "d.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": "d", "output": "e"},\n'
                    '{"instruction": "f", "output": "g", "meta": {"x": 1, "x": 2}}\n]')
    examples, rejects = load_examples(str(path), data_cfg(on_error="skip"))
    assert [e.reference for e in examples] == ["b"]
    assert [(r["where"], r["kind"], r["reason"]) for r in rejects] == [
        (f"{path}: item 1", "duplicate_key", "duplicate key 'output'"),
        (f"{path}: item 2", "duplicate_key", "duplicate key 'x'")]
    lines = tmp_path / "lines.json"  # JSON Lines saved as .json, the repeat on line 1
    lines.write_text('{"instruction": "c", "output": "d", "output": "e"}\n{"instruction": "f", "output": "g"}\n')
    examples, rejects = load_examples(str(lines), data_cfg(on_error="skip"))
    assert [e.reference for e in examples] == ["g"] and [r["where"] for r in rejects] == [f"{lines}:1"]
    pretty = tmp_path / "one.json"  # one pretty-printed record: that record, not one error per line
    pretty.write_text('{\n  "instruction": "a",\n  "output": "b",\n  "output": "c"\n}\n')
    with pytest.raises(DataError, match=rf"^1 bad record\(s\) in {re.escape(str(pretty))}:\n  {re.escape(str(pretty))}:1: "
                                        r"duplicate key 'output'\n"):
        load_examples(str(pretty), data_cfg())


def test_a_plain_tsv_keeps_its_quotes_and_a_quoted_one_is_read_as_quoted(data_cfg, tmp_path):
    """A quote in plain TSV is text: `"Quoted" title` stopped the whole file as an unclosed quote,
    even with data.on_error=skip. A TSV written quoted (pandas, Excel) is still read as such."""
    plain = tmp_path / "plain.tsv"
    plain.write_text('instruction\toutput\n"Quoted" title\tans\n"Hello"\tsay "hi"\n', encoding="utf-8")
    examples, _ = load_examples(str(plain), data_cfg())
    assert [[m["content"] for m in e.messages] for e in examples] == [['"Quoted" title', "ans"],
                                                                       ['"Hello"', 'say "hi"']]
    quoted = tmp_path / "quoted.tsv"
    quoted.write_text('instruction\toutput\n"a tab\there"\t"two\nlines"\n"""Quoted"" title"\tans\n', encoding="utf-8")
    examples, _ = load_examples(str(quoted), data_cfg())
    assert [[m["content"] for m in e.messages] for e in examples] == [["a tab\there", "two\nlines"],
                                                                       ['"Quoted" title', "ans"]]
    # A quoted TSV with a quote never closed is the error naming its line, not read plain with every quote kept.
    broken = tmp_path / "broken.tsv"
    broken.write_text('instruction\toutput\n"a tab\there"\tok\n"never closed\tans\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))}:3: unreadable CSV \(unexpected end of data\)"):
        load_examples(str(broken), data_cfg(on_error="skip"))


def test_files_a_directory_does_not_read_leave_its_fingerprint_and_run_identity_alone(data_cfg, tmp_path):
    """A run's own rejects file (data.rejects=<folder>/_rejects.jsonl), .DS_Store or a _SUCCESS marker
    beside the shards changed the data's digest: `train.resume=true` then found no run to resume."""
    from ftlab.data.prepare import source_digest

    shards = tmp_path / "shards"
    shards.mkdir()
    write([as_format(CONVERSATIONS[0], "alpaca")], shards / "part-0.jsonl")
    before = source_digest(str(shards), "train")
    (shards / "_rejects.jsonl").write_text('{"where": "part-1.jsonl:3"}\n')
    (shards / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (shards / "_SUCCESS").write_text("")
    (shards / "notes.txt").write_text("not data")
    assert source_digest(str(shards), "train") == before
    write([as_format(CONVERSATIONS[1], "alpaca")], shards / "part-1.jsonl")
    assert source_digest(str(shards), "train") != before
    saved = tmp_path / "saved"  # a save_to_disk directory: its .arrow files are the data
    import datasets

    datasets.Dataset.from_list([as_format(CONVERSATIONS[0], "alpaca")]).save_to_disk(str(saved))
    first = source_digest(str(saved), "train")
    (saved / "_rejects.jsonl").write_text("{}\n")
    (saved / ".DS_Store").write_bytes(b"\x00")
    assert source_digest(str(saved), "train") == first
    datasets.Dataset.from_list([as_format(CONVERSATIONS[1], "alpaca")]).save_to_disk(str(saved))
    assert source_digest(str(saved), "train") != first


def test_blank_csv_header_cells_of_a_spreadsheet_export_are_ignored(data_cfg, tmp_path, caplog):
    """Excel exports the empty columns next to a table as `instruction,output,,`: such a file was refused
    as naming '' more than once. A value under a column without a name is not read, and is said so."""
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,input,output,,\r\nReset my password,I am locked out.,"
                     '"{""category"":""account""}",,\r\nOù est ma commande ? 📦,,En route.,note,\r\n'.encode())
    examples, rejects = load_examples(str(path), data_cfg(path=str(path)))
    assert rejects == [] and [e.messages for e in examples] == CONVERSATIONS
    assert f"{path}: column 4 has no name in the header: its values are not read (the first at line 3)" in caplog.text


def test_a_compressed_file_without_its_suffix_is_read(data_cfg, tmp_path):
    """A .jsonl that is gzip inside (a download saved without its .gz) was every line's invalid UTF-8."""
    import gzip
    import lzma

    plain = write([as_format(m, "alpaca") for m in CONVERSATIONS], tmp_path / "plain.jsonl")
    for name, compress in (("gz.jsonl", gzip.compress), ("xz.csv", lzma.compress)):
        source = write([as_format(m, "alpaca") for m in CONVERSATIONS], tmp_path / name)
        source.write_bytes(compress(source.read_bytes()))
        examples, rejects = load_examples(str(source), data_cfg(path=str(source)))
        assert rejects == [] and [e.messages for e in examples] == CONVERSATIONS, name
    assert plain.read_bytes().startswith(b"{")
    import bz2

    empty = tmp_path / "empty.jsonl"  # bzip2 of nothing has no block, and another signature
    empty.write_bytes(bz2.compress(b""))
    with pytest.raises(DataError, match=r"no usable records"):
        load_examples(str(empty), data_cfg(path=str(empty)))
