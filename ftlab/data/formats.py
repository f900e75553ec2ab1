"""Read records from files and normalise every supported format to chat messages.

Sources: JSON Lines, a JSON array, CSV or TSV (each also gzip-, bz2- or xz-compressed), Parquet, a
directory of such files (shards), a `datasets` save_to_disk directory or a hub dataset name.
Formats: alpaca (instruction/input/output), sharegpt (conversations of from/value), messages
(role/content) and prompt_completion; field names can be remapped.
A record that cannot be used becomes a RecordError carrying its file:line and reason.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import gzip
import io
import json
import logging
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from ftlab.config import FieldNames
from ftlab.data.records import DataError, RecordError

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion")
ROLES = {"system", "user", "assistant"}
CHAT_ROLES = {role: role for role in ROLES}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The default field names (ftlab.config.FieldNames); data.fields overrides them.
FIELDS = {f.name: f.default for f in dataclasses.fields(FieldNames)}
# A rejected record's source text is kept in the rejects file up to this many characters.
RAW_KEPT = 10_000
# Separators tried, in order, for a .csv whose header has no comma.
CSV_DELIMITERS = (";", "\t", "|")
CSV_FIELD_LIMIT = 2**31 - 1  # characters in one cell (the csv module's default: 131,072)
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
# Words that name a split in a file or folder name (train.jsonl, data/test-00000.parquet, dev.csv),
# as the datasets library reads them: such a directory's files are read for data.hf_split only.
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}

log = logging.getLogger("ftlab")


@dataclass
class RawRecord:
    where: str  # "file:line" (or "file: row N")
    value: object
    raw: str  # source text, for the rejects file


def field_names(fields) -> dict[str, str]:
    """data.fields (a FieldNames node, dataclass or mapping) as a plain dict."""
    if fields is None:
        return dict(FIELDS)
    if dataclasses.is_dataclass(fields):
        return dataclasses.asdict(fields)
    return {**FIELDS, **dict(fields)}


# --------------------------------------------------------------------------- reading


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json.loads silently keeps the last of repeated keys; which value the user meant is unknowable.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RecordError(f"duplicate key '{dup}'", "duplicate_key")
    return obj


def _parse_json(text: str):
    return json.loads(text, object_pairs_hook=_reject_duplicate_keys)


class _RepeatedKey(dict):
    """An object that repeats a key, kept in place so the record holding it, not the file, is bad."""

    def __init__(self, pairs: list[tuple[str, object]], error: RecordError):
        super().__init__(pairs)
        self.error = error


def _mark_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    try:
        return _reject_duplicate_keys(pairs)
    except RecordError as e:
        return _RepeatedKey(pairs, e)


def _repeated_key(value: object) -> RecordError | None:
    """The first duplicate-key error inside a value parsed with _mark_duplicate_keys."""
    if isinstance(value, _RepeatedKey):
        return value.error
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((e for e in map(_repeated_key, children) if e), None)


# Compressed text files (data.jsonl.gz, part-00000.csv.bz2, ...): read through the stdlib's streams.
DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# Their first bytes: a download saved without its suffix (a data.jsonl that is gzip inside) is read too.
SIGNATURES = {".gz": re.compile(rb"\x1f\x8b"), ".bz2": re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P)"),  # a block, or none
              ".xz": re.compile(rb"\xfd7zXZ\x00")}


def _data_suffix(path: Path) -> str:
    """The suffix that says how records are laid out: '.jsonl' for data.jsonl and data.jsonl.gz."""
    suffixes = [x.lower() for x in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in DECOMPRESSORS:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[io.BufferedIOBase]:
    """The file's bytes, decompressed when its name ends in .gz, .bz2 or .xz (a damaged or truncated
    archive is a DataError naming the file, wherever the stream breaks), and as UTF-8 when the text
    is UTF-16 with its byte-order mark (Excel's "Unicode Text" export, PowerShell's Out-File)."""
    compression = path.suffix.lower() if path.suffix.lower() in DECOMPRESSORS else _compression_inside(path)
    try:
        with (DECOMPRESSORS[compression] if compression else open)(path, "rb") as f:
            yield _as_utf8(f, path)
    except (OSError, EOFError, lzma.LZMAError) as e:  # BadGzipFile is an OSError
        if compression is None:
            raise
        raise DataError(f"{path}: not a readable {compression[1:]} file ({e or type(e).__name__})") from None


def _compression_inside(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(10)
    return next((suffix for suffix, signature in SIGNATURES.items() if signature.match(head)), None)


def _as_utf8(f: io.BufferedIOBase, path: Path) -> io.BufferedIOBase:
    if f.peek(2)[:2] not in (b"\xff\xfe", b"\xfe\xff"):
        return f
    try:
        return io.BytesIO(f.read().decode("utf-16").encode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: starts with UTF-16's byte-order mark but is not UTF-16 text ({e.reason} at byte "
                        f"{e.start}); save it as UTF-8") from None


def read_jsonl(path: Path) -> Iterator[RawRecord | RecordError]:
    """Each line's JSON value, or a RecordError for lines that are not valid UTF-8 JSON."""
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            raw = line[:RAW_KEPT].decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RecordError(f"invalid UTF-8 at byte {e.start}", "invalid_utf8", where, raw)
                continue
            text = text.lstrip("\ufeff").strip()  # a BOM on the first line, CRLF endings
            if not text:
                continue
            try:
                yield RawRecord(where, _parse_json(text), raw)
            except json.JSONDecodeError as e:
                yield RecordError(f"malformed JSON ({e.msg}: column {e.colno})", "malformed_json", where, raw)
            except RecursionError:
                yield RecordError("malformed JSON (nested too deeply)", "malformed_json", where, raw)
            except RecordError as e:
                e.where, e.raw = where, raw
                yield e


def read_json(path: Path, field: str | None = None) -> Iterator[RawRecord | RecordError]:
    """A .json file holding an array of records, one object with the records under `field`
    (data.json_field), one record (pretty-printed too), or, as often happens, JSON Lines."""
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}; the file must be UTF-8") from None
    start = text.lstrip()[:1]
    if start not in ("[", "{") and field is None:
        yield from read_jsonl(path)
        return
    try:
        value = _parse_json(text)
    except json.JSONDecodeError as e:
        if start == "{" and field is None:  # JSON Lines (Extra data after the first object), or a bad line
            yield from read_jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}: column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: malformed JSON (nested too deeply)") from None
    except RecordError:  # a duplicate key: parsed again, so only the records that repeat one are bad
        try:
            value = json.loads(text, object_pairs_hook=_mark_duplicate_keys)
        except json.JSONDecodeError as e:
            if start == "{" and field is None:  # JSON Lines: the line reader names the line
                yield from read_jsonl(path)
                return
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}: column {e.colno})") from None
        if field is not None and isinstance(value, _RepeatedKey):
            raise DataError(f"{path}: {value.error.reason} in the top-level object") from None
    if field is not None:
        if not isinstance(value, dict):
            raise DataError(f"data.json_field={field}: {path} holds {_json_kind(value)}, not one object; "
                            "unset data.json_field")
        if field not in value:
            raise DataError(f"data.json_field={field}: {path} has no key {field!r}; its keys: {sorted(value)[:10]}")
        items = value[field]
        if not isinstance(items, list):
            raise DataError(f"data.json_field={field}: {path}'s {field!r} is {_json_kind(items)}, "
                            "not a list of records")
        places = [f"{path}: {field}[{i}]" for i in range(len(items))]
    elif isinstance(value, dict):  # the whole file is one record
        items, places = [value], [f"{path}:1"]
    else:
        items, places = value, [f"{path}: item {i}" for i in range(len(value))]
    for where, item in zip(places, items):
        raw = json.dumps(item, ensure_ascii=False, default=str)[:RAW_KEPT]
        if error := _repeated_key(item):
            yield RecordError(error.reason, error.kind, where, raw)
        else:
            yield RawRecord(where, item, raw)


def _json_kind(value) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def _csv_delimiter(path: Path, header: str) -> str:
    """Tab for .tsv; for .csv a comma, unless the header has none and holds another separator
    (spreadsheets in locales with a decimal comma export `;`)."""
    if _data_suffix(path) == ".tsv":
        return "\t"
    if "," not in header:
        return next((d for d in CSV_DELIMITERS if d in header), ",")
    return ","


def _tsv_quoting(f: io.TextIOBase, path: Path) -> int:
    """Tab-separated text comes two ways: quoted as CSV is (pandas, Excel: a cell holding a tab, a
    line break or a quote is put in quotes) and plain (IANA's TSV, database dumps: a quote is text).
    Plain where a quote closes before the end of a cell, as only plain text has it (`"Quoted" title`);
    a quote never closed stays the error that names its line."""
    reader = csv.reader(f, delimiter="\t", strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as e:
        if "expected after" in str(e):
            log.info("%s:%d: a quote ends inside a cell: read as plain TSV, where quotes are text", path,
                     reader.line_num)
            return csv.QUOTE_NONE
    return csv.QUOTE_MINIMAL


def read_csv(path: Path) -> Iterator[RawRecord | RecordError]:
    # surrogateescape keeps invalid bytes as lone surrogates, which validation then reports
    # for the row they are in instead of failing the whole file.
    with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                                     newline="") as f:
        delimiter = _csv_delimiter(path, f.readline())
        # The csv module refuses a cell over 128 KiB, failing the whole file; a long record is the
        # length check's to drop (data.overlong), with its reason, as in JSON Lines.
        csv.field_size_limit(CSV_FIELD_LIMIT)
        f.seek(0)
        quoting = _tsv_quoting(f, path) if delimiter == "\t" else csv.QUOTE_MINIMAL
        f.seek(0)
        # strict: a quote opened and never closed is an error naming its line, where the lenient
        # reader took the rest of the file as one cell (900 records became one bad one).
        reader = csv.DictReader(f, delimiter=delimiter, strict=True, quoting=quoting)
        header = reader.fieldnames or []
        repeated = sorted({c for c in header if c.strip() and header.count(c) > 1})
        if repeated:  # the last column of a name would silently win over the others
            raise DataError(f"{path}:1: the header names {', '.join(map(repr, repeated))} more than once")
        # A spreadsheet exports the empty columns beside its table as `instruction,output,,`: keyed by
        # their index, which no field names, and left out.
        unnamed = [i for i, name in enumerate(header) if not name.strip()]
        reader.fieldnames = [i if i in unnamed else name for i, name in enumerate(header)]
        unread = None  # the first value under a column without a name: (column, line)
        while True:
            start = reader.line_num + 1  # a row's first line: a quoted cell can span several
            try:
                row = next(reader)
            except StopIteration:
                if unread:
                    log.warning("%s: column %d has no name in the header: its values are not read (the first at "
                                "line %d)", path, unread[0] + 1, unread[1])
                return
            except csv.Error as e:
                raise DataError(f"{path}:{start}: unreadable CSV ({e}); is a quote opened there and never "
                                "closed?") from None
            where = f"{path}:{start}"
            raw = json.dumps(row, ensure_ascii=False, default=str)[:RAW_KEPT]
            if None in row:
                yield RecordError("row has more cells than the header has columns", "malformed_row", where, raw)
            else:
                for i in unnamed:
                    if (row.pop(i) or "").strip() and unread is None:
                        unread = (i, start)
                yield RawRecord(where, {k: v for k, v in row.items() if v is not None}, raw)


def read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid: not Parquet, truncated
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    yield from _rows(table.to_pylist(), str(path))


def _rows(rows: list[dict], label: str) -> Iterator[RawRecord]:
    for i, row in enumerate(rows, start=1):
        yield RawRecord(f"{label}: row {i}", row, json.dumps(row, ensure_ascii=False, default=str)[:RAW_KEPT])


def read_hf(source: str, split: str) -> Iterator[RawRecord]:
    """A `datasets` save_to_disk directory, or a hub dataset name when the hub is reachable."""
    import datasets

    if Path(source).is_dir():
        try:
            ds = datasets.load_from_disk(source)
        except Exception as e:  # a save_to_disk directory with missing or damaged files
            raise DataError(f"data.path={source}: not a readable datasets save_to_disk directory "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # offline, missing or gated: one clear message instead of a hub traceback
            raise DataError(f"data.path={source}: not a local file and not loadable from the hub "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.hf_split={split}: {source} has splits {sorted(ds)}")
        ds = ds[split]
    elif ds.split is not None and str(ds.split) != split:  # one split saved alone, not the one asked for
        raise DataError(f"data.hf_split={split}: {source} holds the {ds.split} split only")
    elif ds.split is None and split != "train":  # the default: read a dataset without splits as it is
        log.warning("data.hf_split=%s: %s is one dataset without splits: all of it is read", split, source)
    yield from _rows(ds.to_list(), f"{source}[{ds.split or split}]")


READERS = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_csv,
           ".parquet": read_parquet}
KNOWN = f"{', '.join(READERS)} (the text ones also as .gz, .bz2 or .xz)"


def _reader(path: Path):
    """The reader for a file's name, or None; Parquet compresses inside, so no .parquet.gz."""
    reader = READERS.get(_data_suffix(path))
    if reader is read_parquet and path.suffix.lower() != ".parquet":
        return None
    return reader


# What a hub snapshot or a datasets directory keeps beside its data: its description, not records.
DATASET_METADATA = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}


def read_as_data(directory: Path, file: Path) -> bool:
    """Whether read_directory(directory) reads `file` (there or not yet): a data file's name, not a
    dataset's metadata, and no hidden or `_`-prefixed part on the way (_SUCCESS, .crc files)."""
    return bool(_reader(file)) and file.name not in DATASET_METADATA and not hidden(directory, file)


def hidden(directory: Path, file: Path) -> bool:
    """A hidden or `_`-prefixed part on the way from `directory` to `file`: no data's (_SUCCESS, .crc)."""
    return any(part.startswith((".", "_")) for part in file.relative_to(directory).parts)


def _split_of(relative: Path) -> str | None:
    words = set(re.split(r"[\W_]+", str(relative).lower()))
    return next((split for split, names in SPLIT_WORDS.items() if words & set(names)), None)


def read_directory(path: Path, hf_split: str = "train", json_field: str | None = None
                   ) -> Iterator[RawRecord | RecordError]:
    """Every data file under a directory (shards: part-00000.parquet, ...), in name order; hidden
    and `_`-prefixed entries (_SUCCESS, .crc files) are skipped. Files named by split (train.jsonl
    beside test.jsonl) are read for data.hf_split only: a published test set mixed into the pool
    would be trained on."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and read_as_data(path, p))
    if not files:
        raise DataError(f"data.path: {path} is a directory without data files ({KNOWN}) and not a "
                        "datasets save_to_disk directory")
    splits = {file: _split_of(file.relative_to(path)) for file in files}
    if any(splits.values()):
        wanted = next((split for split, names in SPLIT_WORDS.items() if hf_split in (split, *names)), hf_split)
        chosen = [file for file in files if splits[file] == wanted]
        if not chosen:
            found = sorted({s for s in splits.values() if s})
            raise DataError(f"data.path: {path} holds files of the splits {found}, none of data.hf_split={hf_split}; "
                            f"set data.hf_split to one of them")
        left_out = [str(file.relative_to(path)) for file in files if file not in chosen]
        if left_out:
            log.warning("data.path %s: reading the %s split (data.hf_split=%s): %d file(s); left out: %s", path,
                        wanted, hf_split, len(chosen), ", ".join(left_out[:5]) + (" ..." if len(left_out) > 5 else ""))
        files = chosen
    for file in files:
        yield from _read_file(file, json_field)


def is_saved_dataset(path: Path) -> bool:
    """A `datasets` save_to_disk directory: its .arrow files are the data."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_records(source: str, hf_split: str = "train", json_field: str | None = None
                 ) -> Iterator[RawRecord | RecordError]:
    """json_field: data.json_field, for .json files (alone or in a directory)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if is_saved_dataset(path):
            _no_json_field(json_field, f"{path} is a datasets save_to_disk directory")
            return read_hf(str(path), hf_split)
        return read_directory(path, hf_split, json_field)
    if not path.exists():
        # owner/name is a hub dataset; ./name, data/train.jsonl (a data file's suffix) is a missing file.
        if HUB_NAME.match(source) and not source.startswith(".") and _reader(path) is None:
            _no_json_field(json_field, f"{source} is a hub dataset")
            return read_hf(source, hf_split)
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()}, where the command ran)"
        raise DataError(f"data.path: {path} does not exist{where}")
    reader = _reader(path)
    if reader is None:
        raise DataError(f"data.path: {path} has an unknown extension; use {KNOWN}, a directory of "
                        "such files or a datasets save_to_disk directory")
    if reader is not read_json:
        _no_json_field(json_field, f"{path} is no .json file")
    return _read_file(path, json_field)


def _read_file(path: Path, json_field: str | None) -> Iterator[RawRecord | RecordError]:
    reader = _reader(path)
    return read_json(path, json_field) if reader is read_json else reader(path)


def _no_json_field(json_field: str | None, what: str) -> None:
    if json_field is not None:
        raise DataError(f"data.json_field={json_field}: names the key of a .json file's records, and {what}; "
                        "unset it")


# --------------------------------------------------------------------------- normalising


def detect_format(record: dict, f: dict[str, str]) -> str:
    if f["messages"] in record:
        return "messages"
    if f["conversations"] in record:
        return "sharegpt"
    if f["instruction"] in record and f["output"] in record:
        return "alpaca"
    if f["prompt"] in record and f["completion"] in record:
        return "prompt_completion"
    for pair, fmt in ((("instruction", "output"), "alpaca"), (("prompt", "completion"), "prompt_completion")):
        if (present := [key for key in pair if f[key] in record]) and len(present) == 1:  # the label is named otherwise
            lacks = next(key for key in pair if key not in present)
            raise RecordError(f"has '{f[present[0]]}' but no '{f[lacks]}' (its fields: {sorted(record)[:8]}); {fmt} "
                              f"records need both: if it is under another name, set data.fields.{lacks}=<that name>",
                              "unknown_format")
    lists = [key for key, value in record.items()
             if isinstance(value, list) and value and all(isinstance(x, dict) for x in value)]
    nested = (f"; its '{lists[0]}' holds a list of {len(record[lists[0]])} objects: if they are the records, set "
              f"data.json_field={lists[0]}; if chat turns, data.fields.messages={lists[0]}") if len(lists) == 1 else ""
    raise RecordError(
        f"cannot tell the format from its fields {sorted(record)[:8]}; expected instruction/output (alpaca), "
        "conversations (sharegpt), messages, or prompt/completion (set data.format, or map names with data.fields)"
        + nested,
        "unknown_format",
    )


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing or null field '{key}'", "missing_field")
        return ""
    if isinstance(value, (dict, list)):  # a structured answer ({"type": "payment", ...}): trained on as compact JSON
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {type(value).__name__}", "wrong_type")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: "\ud800" escapes in JSON, bad bytes in CSV
            if "\udc80" <= value[e.start] <= "\udcff":  # a byte read with surrogateescape: not UTF-8
                byte = ord(value[e.start]) - 0xDC00
                raise RecordError(f"field '{key}' holds bytes that are not UTF-8 (byte 0x{byte:02x}): "
                                  "save the file as UTF-8 (Excel: \"CSV UTF-8\")", "invalid_utf8") from None
            raise RecordError(f"field '{key}' holds invalid Unicode (not UTF-8 encodable)", "invalid_utf8") from None
    if required and not value.strip():
        raise RecordError(f"field '{key}' is empty", "empty_field")
    return value


def _joined_text_parts(turn: dict, key: str) -> dict:
    """OpenAI's chat format also allows content as a list of parts ([{"type": "text", "text": ...}]):
    text parts are joined; any other part (an image, audio) cannot train a text model."""
    parts = turn.get(key)
    if not isinstance(parts, list):
        return turn
    texts = []
    for i, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RecordError(f"field '{key}' holds a part of type {kind!r}; only text parts can be trained on", "wrong_type")
        if not isinstance(part.get("text"), str):
            raise RecordError(f"field '{key}'[{i}] is a text part without a string 'text'", "wrong_type")
        texts.append(part["text"])
    return {**turn, key: "".join(texts)}


def _turns(record: dict, key: str) -> list:
    turns = record.get(key)
    if isinstance(turns, str):  # CSV/Parquet columns often hold the turns as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise RecordError(f"field '{key}' is a string that is not a JSON list of turns", "wrong_type") from None
    if turns is None:
        raise RecordError(f"missing or null field '{key}'", "missing_field")
    if not isinstance(turns, list):
        raise RecordError(f"field '{key}' must be a list of turns, got {type(turns).__name__}", "wrong_type")
    if not turns:
        raise RecordError("conversation is empty", "empty_conversation")
    return turns


def _is_turns(value: object, role_key: str) -> bool:
    """A list of objects, one naming a chat role, is a list of turns, each of which must then be one
    ({"content": ...} beside it is a turn without its role); other lists ([{"name": "bob", "role":
    "admin"}]) are structured answers, trained on as JSON text."""
    return (isinstance(value, list) and bool(value) and all(isinstance(t, dict) for t in value)
            and any(isinstance(t.get(role_key), str) and t[role_key] in CHAT_ROLES for t in value))


def _chat(turns: list, key: str, role_key: str, content_key: str, roles: Mapping[str, str]) -> list[dict]:
    """[{"role", "content"}] from a record's list of turns (`key` names it in errors); `roles` maps
    the data's role names to the chat template's."""
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{key}[{i}] must be an object, got {type(turn).__name__}", "wrong_type")
        name = turn.get(role_key)
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise RecordError(f"{key}[{i}] has unknown role {name!r}", "unknown_role")
        try:
            content = _text(_joined_text_parts(turn, content_key), content_key)
        except RecordError as e:
            raise RecordError(f"{key}[{i}]: {e.reason}", e.kind) from None
        messages.append({"role": role, "content": content})
    return messages


def _check_turns(messages: list[dict]) -> list[dict]:
    if messages[-1]["role"] != "assistant":
        raise RecordError("conversation does not end with an assistant turn", "no_final_assistant")
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("conversation has no user turn", "no_user_turn")
    return messages


def to_messages(record: object, fmt: str, fields: Mapping[str, str] | None = None) -> list[dict]:
    """Normalise one record to [{"role", "content"}, ...] ending with the assistant's answer."""
    f = dict(fields) if fields else FIELDS
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}", "not_an_object")
    if fmt == "auto":
        fmt = detect_format(record, f)
    if fmt == "alpaca":
        instruction = _text(record, f["instruction"])
        extra = _text(record, f["input"], required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, f["output"])}]
    if fmt == "prompt_completion":
        # Each side a string, or TRL's conversational form: a list of {role, content} turns.
        prompt, completion = ((_chat(record[f[side]], f[side], f["role"], f["content"], CHAT_ROLES)
                               if _is_turns(record.get(f[side]), f["role"])
                               else [{"role": role, "content": _text(record, f[side])}])
                              for side, role in (("prompt", "user"), ("completion", "assistant")))
        return _check_turns(prompt + completion)
    if fmt == "messages":
        return _check_turns(_chat(_turns(record, f["messages"]), f["messages"], f["role"], f["content"], CHAT_ROLES))
    if fmt == "sharegpt":
        return _check_turns(_chat(_turns(record, f["conversations"]), f["conversations"], f["sharegpt_from"],
                                  f["sharegpt_value"], SHAREGPT_ROLES))
    raise DataError(f"data.format={fmt}: unknown format; use one of {', '.join(FORMATS)}")
