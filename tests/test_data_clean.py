"""Cleaning on the embedded dataset: planted duplicates removed, no near-duplicate across
the split (checked independently with rapidfuzz), length drop/truncate in real tokens,
class balancing, a seeded split, the cache, the report files and `python -m ftlab.data`."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from rapidfuzz import fuzz, process, utils

from ftlab import tracking
from ftlab.config import TrainConfig
from ftlab.data import DataError, clean, prepare
from ftlab.data.generate import generate_with_plan
from ftlab.data.prepare import load_examples
from ftlab.data.report import log_data_report, padding_share, print_table, write_outputs
from tests.conftest import ROOT, TINY

# rapidfuzz ratio (0-100, on lower-cased alphanumerics) at or above which two tickets count as
# near-duplicates: a planted one-word edit of a ~120-character ticket scores above 98.
NEAR_DUP_RATIO = 98


def similarity(a: str, b: str) -> float:
    return fuzz.ratio(a, b, processor=utils.default_process)


@pytest.fixture(scope="module")
def default_data(data_cfg, tiny_tokenizer, tmp_path_factory):
    cfg = data_cfg(num_records=300, eval_size=40)
    return cfg, prepare(cfg, tiny_tokenizer, 512, tmp_path_factory.mktemp("cache"))


def source_index(example) -> int:
    return int(example.where.rsplit(":", 1)[1]) - 1


def ticket(example) -> str:
    return example.prompt[-1]["content"].split("\n\n", 1)[1]


def test_planted_duplicates_are_removed_and_reported(default_data):
    cfg, data = default_data
    records, plan = generate_with_plan(cfg.num_records, cfg.generator_seed)
    kept = {source_index(e) for e in data.train + data.held_out}
    planted = {kind: [p for p in plan if p["kind"] == kind] for kind in ("exact", "near", "overlong")}
    assert planted["exact"] and planted["near"] and planted["overlong"]
    for p in planted["exact"] + planted["near"] + planted["overlong"]:
        assert p["index"] not in kept, p
    counts = data.report["counts"]
    # Every planted copy is gone; a near copy that only differs in case/spacing is already an exact one.
    assert counts["dropped_exact_duplicates"] + counts["dropped_near_duplicates"] >= len(planted["exact"]) + len(
        planted["near"])
    assert counts["dropped_exact_duplicates"] >= len(planted["exact"]) and counts["dropped_near_duplicates"] > 0
    assert counts["dropped_overlong"] == len(planted["overlong"])
    # The independent check can see the planted near copies it is meant to catch.
    for p in planted["near"]:
        assert similarity(records[p["index"]]["input"], records[p["of"]]["input"]) >= NEAR_DUP_RATIO


def test_no_held_out_example_has_a_near_duplicate_in_train(default_data):
    _, data = default_data
    train = [ticket(e) for e in data.train]
    for e in data.held_out:
        match, score, _ = process.extractOne(ticket(e), train, scorer=fuzz.ratio, processor=utils.default_process)
        assert score < NEAR_DUP_RATIO, (e.where, ticket(e), match)


def test_exact_dedupe_ignores_case_and_whitespace_and_threshold_is_configurable(data_cfg, tiny_tokenizer, tmp_path):
    rows = [{"instruction": "Reset my password please", "output": "account"},
            {"instruction": "  RESET my   password please ", "output": "Account"},
            {"instruction": "Reset my password please now", "output": "account"},
            {"instruction": "The router x200 will not connect to wifi", "output": "bug"},
            {"instruction": "My invoice shows the wrong amount", "output": "billing"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    strict = prepare(data_cfg(path=str(path), eval_size=1), tiny_tokenizer, 256, tmp_path / "c")
    assert strict.report["counts"]["dropped_exact_duplicates"] == 1
    assert strict.report["counts"]["dropped_near_duplicates"] == 0  # questions: 3 of 4 bigrams shared, J = 0.75
    loose = prepare(data_cfg(path=str(path), eval_size=1, near_dup_threshold=0.45), tiny_tokenizer, 256, tmp_path / "c")
    assert loose.report["counts"]["dropped_near_duplicates"] == 1


def test_exact_duplicates_are_the_same_turns_not_the_same_words_split_elsewhere(data_cfg, tiny_tokenizer, tmp_path):
    """Two records whose texts joined are equal but whose questions end elsewhere are two examples
    (a document split at several points); the same text in another role is another turn."""
    rows = [{"instruction": "Is the sky blue? Yes", "output": "Correct"},
            {"instruction": "Is the sky blue?", "output": "Yes correct"},
            {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Be brief"}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]},
            {"instruction": "IS the sky   blue?", "output": "yes Correct"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_examples(str(path), data_cfg(path=str(path)))
    kept, dropped = clean.drop_exact_duplicates(examples)
    assert dropped == 1 and [e.where for e in kept] == [f"{path}:{i}" for i in (1, 2, 3, 4)]


def test_overlong_drop_or_truncate_in_real_tokens(data_cfg, tiny_tokenizer, tmp_path, capsys):
    long_answer = {"instruction": "Summarise the log", "output": "retry failed: timeout " * 60}
    short = [{"instruction": f"Ticket number {i} about the app", "output": f"fine {i}"} for i in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [long_answer, *short]))
    dropped = prepare(data_cfg(path=str(path), eval_size=1), tiny_tokenizer, 64, tmp_path / "c")
    assert dropped.report["counts"]["dropped_overlong"] == 1
    cut = prepare(data_cfg(path=str(path), eval_size=1, overlong="truncate"), tiny_tokenizer, 64, tmp_path / "c")
    assert cut.report["counts"]["truncated_overlong"] == 1 and cut.report["counts"]["dropped_overlong"] == 0
    for e in cut.train + cut.held_out:
        assert len(tiny_tokenizer.apply_chat_template(e.messages, return_dict=False)) == e.tokens <= 64
    truncated = next(e for e in cut.train + cut.held_out if e.messages[0]["content"] == "Summarise the log")
    assert long_answer["output"].startswith(truncated.reference) and len(truncated.reference) > 20
    print_table(cut, TrainConfig(max_seq_length=64))  # the printed table says answers were cut, as report.json does
    assert re.search(r"answers cut to fit\s*│\s*1\s", capsys.readouterr().err)
    # Prompts alone over the limit cannot be cut (truncate cuts answers): the error says so, not "set truncate".
    with pytest.raises(DataError, match=r"every record's prompt alone is longer than train.max_seq_length=8 tokens "
                                        r"\(data.overlong=truncate cuts answers only\)"):
        prepare(data_cfg(path=str(path), eval_size=1, overlong="truncate"), tiny_tokenizer, 8, tmp_path / "c")


def test_truncate_cuts_an_answer_between_characters_not_inside_one(data_cfg, tiny_tokenizer, tmp_path):
    """Decoding the kept token ids split a character spread over byte-level tokens into U+FFFD; for
    "é" * 500 the cut never converged and the record was dropped although its prompt fits."""
    answers = ["é" * 500, "日本語のテキストを要約してください。" * 30, "ok 👍 " * 80]
    rows = [{"instruction": f"Summarise note {i}", "output": a} for i, a in enumerate(answers)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    examples, _ = load_examples(str(path), data_cfg(path=str(path)))
    clean.measure(examples, tiny_tokenizer)
    kept, counts = clean.fit_length(examples, tiny_tokenizer, 64, "truncate")
    assert counts["truncated_overlong"] == 3 and counts["dropped_overlong"] == 0
    for e, answer in zip(kept, answers):
        assert "\ufffd" not in e.reference and answer.startswith(e.reference) and len(e.reference) > 5
        assert len(tiny_tokenizer.apply_chat_template(e.messages, return_dict=False)) == e.tokens <= 64


def test_class_balancing(data_cfg, tiny_tokenizer, tmp_path):
    common = dict(num_records=300, eval_size=0.1, label_field="category")
    rarest = prepare(data_cfg(**common, balance="rarest"), tiny_tokenizer, 512, tmp_path)
    before, after = rarest.report["classes"]["before"], rarest.report["classes"]["after"]
    assert len(set(before.values())) > 1 and len(set(after.values())) == 1
    assert set(after) == {"billing", "bug", "account", "shipping", "feature_request"}
    assert after["billing"] == min(before.values())
    capped = prepare(data_cfg(**common, balance="cap", balance_cap=30), tiny_tokenizer, 512, tmp_path)
    assert all(n == min(30, before[c]) for c, n in capped.report["classes"]["after"].items())
    for cap in (None, 0, -3):  # -3 would slice all but the last 3 of each class away
        with pytest.raises(DataError, match=rf"data.balance=cap needs data.balance_cap >= 1 \(records per class\), "
                                            rf"not {cap}"):
            prepare(data_cfg(**common, balance="cap", balance_cap=cap), tiny_tokenizer, 512, tmp_path)


def test_a_blank_label_is_missing_not_a_class(data_cfg, tmp_path):
    """Three rows with an empty label cell became a class "" of 3, and balance=rarest cut the other
    classes down to 3 records each."""
    rows = ["instruction,output,label", *(f"question {i},answer {i},billing" for i in range(20)),
            *(f"other {i},reply {i}, shipping " for i in range(20)), *(f"late {i},later {i}," for i in range(3))]
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    examples, rejects = load_examples(str(path), data_cfg(label_field="label", on_error="skip"))
    assert {e.label for e in examples} == {"billing", "shipping"} and len(examples) == 40
    assert [r["kind"] for r in rejects] == ["missing_label"] * 3 and "is missing or empty" in rejects[0]["reason"]
    # A number is one class however it was written: 1 and 1.0 were two.
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"instruction": f"q {i}", "output": f"a {i}", "label": value}) + "\n"
                               for i, value in enumerate([1, 1.0, 2, 2.5])))
    examples, _ = load_examples(str(numbers), data_cfg(label_field="label"))
    assert [e.label for e in examples] == ["1", "1", "2", "2.5"]


def test_a_held_out_set_larger_than_the_training_set_is_warned_about(data_cfg, tiny_tokenizer, tmp_path, caplog):
    """The default eval_size=40 on a 60-record file trained on 20 and said nothing."""
    data = prepare(data_cfg(num_records=60, eval_size=40), tiny_tokenizer, 512, tmp_path)
    assert len(data.held_out) == 40 and len(data.train) < 40
    warning = f"holds out 40 of {len(data.train) + 40} cleaned records, more than the {len(data.train)} left"
    assert warning in caplog.text
    caplog.clear()
    prepare(data_cfg(num_records=60, eval_size=40), tiny_tokenizer, 512, tmp_path)  # from the cache: warned again
    assert warning in caplog.text
    caplog.clear()
    prepare(data_cfg(num_records=200, eval_size=40), tiny_tokenizer, 512, tmp_path)
    assert "holds out" not in caplog.text


def test_split_is_seeded_and_eval_size_is_a_count_or_fraction(data_cfg, tiny_tokenizer, tmp_path):
    a = prepare(data_cfg(num_records=200, eval_size=0.25), tiny_tokenizer, 512, tmp_path)
    b = prepare(data_cfg(num_records=200, eval_size=0.25, cache=False), tiny_tokenizer, 512, tmp_path)
    c = prepare(data_cfg(num_records=200, eval_size=0.25, split_seed=1), tiny_tokenizer, 512, tmp_path)
    n = len(a.train) + len(a.held_out)
    assert len(a.held_out) == round(0.25 * n)
    assert [e.where for e in a.held_out] == [e.where for e in b.held_out] and a.fingerprint == b.fingerprint
    assert [e.where for e in a.held_out] != [e.where for e in c.held_out] and a.fingerprint != c.fingerprint
    with pytest.raises(DataError, match="data.eval_size=5000 leaves no train"):
        prepare(data_cfg(num_records=200, eval_size=5000), tiny_tokenizer, 512, tmp_path)


def test_a_split_that_cannot_be_made_says_where_the_records_went_and_which_way_to_turn(data_cfg, tiny_tokenizer,
                                                                                      tmp_path):
    path = tmp_path / "repeats.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"ticket {i % 3}", "output": f"answer {i % 3}"}) + "\n"
                            for i in range(40)))
    with pytest.raises(DataError) as raised:
        prepare(data_cfg(path=str(path), eval_size=4), tiny_tokenizer, 512, tmp_path)
    assert str(raised.value) == ("data.eval_size=4 leaves no train data from 3 cleaned records; lower it or add data "
                                 "(40 read; exact dedupe dropped 37)")
    with pytest.raises(DataError, match=r"^data.eval_size=0.1 holds out none of 3 cleaned records; raise it \(40 read"):
        prepare(data_cfg(path=str(path), eval_size=0.1), tiny_tokenizer, 512, tmp_path)
    # Every record the same: no eval_size helps (it said "raise it", then "lower it").
    same = tmp_path / "same.jsonl"
    same.write_text((json.dumps({"instruction": "ticket", "output": "answer"}) + "\n") * 30)
    with pytest.raises(DataError, match=r"^1 cleaned record\(s\) left: a run needs at least 2, one to train on and one "
                                        r"to hold out \(30 read; exact dedupe dropped 29\)$"):
        prepare(data_cfg(path=str(same), eval_size=0.2), tiny_tokenizer, 512, tmp_path)


def test_second_prepare_loads_from_the_cache(data_cfg, tiny_tokenizer, tmp_path):
    cfg = data_cfg(num_records=200, eval_size=20)
    first = prepare(cfg, tiny_tokenizer, 512, tmp_path)
    second = prepare(cfg, tiny_tokenizer, 512, tmp_path)
    assert not first.cache_hit and second.cache_hit
    assert second.fingerprint == first.fingerprint and second.report == first.report
    assert [e.to_dict() for e in second.train] == [e.to_dict() for e in first.train]
    # Any change to what the data would be is a new entry: settings, max_seq_length, source content.
    assert not prepare(data_cfg(num_records=200, eval_size=21), tiny_tokenizer, 512, tmp_path).cache_hit
    assert not prepare(cfg, tiny_tokenizer, 256, tmp_path).cache_hit
    source = tmp_path / "data" / "support_tickets-n200-s7.jsonl"
    source.write_text(source.read_text().replace("crashes", "crashed"))
    assert not prepare(cfg, tiny_tokenizer, 512, tmp_path).cache_hit


def test_report_files_metrics_and_padding(default_data, tmp_path):
    _, data = default_data
    train_cfg = TrainConfig(per_device_batch_size=8, max_seq_length=512)
    out = write_outputs(data, train_cfg, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"train.jsonl", "held_out.jsonl", "report.json", "rejects.jsonl",
                                              "token_lengths.png"}
    assert (out / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["fingerprint"] == data.fingerprint
    assert [s["step"] for s in report["steps"]][:4] == ["read", "valid", "exact dedupe", "near dedupe"]
    assert report["packing"]["padding_share_unpacked"] > 0 == report["packing"]["padding_share_packed"]
    assert report["packing"]["sequences_packed"] < report["packing"]["sequences_unpacked"]
    assert len((out / "train.jsonl").read_text().splitlines()) == len(data.train)
    assert padding_share([4, 2, 4, 4], 2, 8, packed=False) == pytest.approx(2 / 16)

    # Its own experiment (not the id an earlier test made active in another store), artifacts next to the DB.
    tracking.setup(f"sqlite:///{tmp_path}/mlflow.db", "data")
    with mlflow.start_run() as run:
        log_data_report(data, train_cfg)
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.metrics["data_dropped_exact_duplicates"] == data.report["counts"]["dropped_exact_duplicates"]
    assert logged.params["data.fingerprint"] == data.fingerprint
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "data")}
    assert {"data/report.json", "data/rejects.jsonl", "data/token_lengths.png"} <= names


def test_cli_writes_the_cleaned_sets(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "ftlab.data", *TINY, "data.label_field=priority", f"data.export_dir={out}",
         f"cache_dir={tmp_path}/cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"cleaned data written to {out}" in proc.stdout
    assert {"train.jsonl", "held_out.jsonl", "report.json", "rejects.jsonl", "token_lengths.png",
            "classes.png"} <= {p.name for p in out.iterdir()}
    assert "exact dedupe" in proc.stderr  # the table


def test_the_cleaned_outputs_never_overwrite_or_join_the_data_they_are_made_from(tmp_path, in_process):
    """data.rejects naming the data file replaced it with the rejects; data.export_dir holding a train.jsonl
    replaced it with the cleaned records; a rejects file inside a data.path directory became data."""
    folder = tmp_path / "tickets"
    folder.mkdir()
    data = folder / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    for source, bad, says in ((data, f"data.rejects={data}", f"data.rejects={data}: is data.path itself"),
                              (data, f"data.export_dir={folder}", f"data.export_dir={folder}: would overwrite data.path"),
                              (folder, f"data.rejects={folder}/rejects.jsonl",
                               f"data.rejects={folder}/rejects.jsonl: is inside data.path={folder}, whose files are"),
                              (folder, f"data.export_dir={folder}/clean",
                               f"data.export_dir={folder}/clean: is inside data.path={folder}, whose files are")):
        for command in ("ftlab.data", "ftlab"):
            out = in_process(command, *TINY, f"data.path={source}", bad, f"tracking_uri=sqlite:///{tmp_path}/m.db",
                             cwd=tmp_path)
            assert out.returncode == 2 and f"ftlab: {says}" in out.stderr, out.stderr[-2000:]
    assert data.read_text() == '{"instruction": "a", "output": "b"}\n' and [p.name for p in folder.iterdir()] == [
        "train.jsonl"]
    # Beside the data under names the export does not write, or where the directory's read skips, is fine.
    from omegaconf import OmegaConf

    from ftlab.config import DataConfig, data_outputs_problem

    raw = folder / "raw.jsonl"
    raw.write_text("")
    for path, rejects, export_dir in ((raw, folder / "rejects.jsonl", folder),
                                      (folder, folder / "_rejects.jsonl", folder / ".clean")):
        assert data_outputs_problem(OmegaConf.structured(DataConfig(path=str(path), rejects=str(rejects),
                                                                    export_dir=str(export_dir)))) is None


def test_cli_multirun_prepares_each_config_and_starts_no_sweep(tmp_path, in_process):
    """python -m ftlab.data -m ...: the data of each value of a grid, checked before a sweep spends compute
    on it; no sweep parent run in MLflow, and no Optuna study."""
    def data_cli(*args):
        return in_process("ftlab.data", "-m", *TINY, f"cache_dir={tmp_path}/cache", *args, cwd=tmp_path)

    grid = data_cli("data.num_records=80,120", "data.eval_size=10")
    assert grid.returncode == 0, grid.stderr[-2000:]
    written = re.findall(r"cleaned data written to (\S+)", grid.stdout)
    assert len(set(written)) == 2 and all((Path(d) / "train.jsonl").exists() for d in written)
    assert "ftlab sweep" not in grid.stdout and not (tmp_path / "mlruns").exists()
    study = data_cli("sweeps=rank_lr")
    assert study.returncode == 2 and "ftlab: python -m ftlab.data runs no study" in study.stderr
    assert not (tmp_path / "mlruns").exists()
    # What python -m ftlab refuses, this refuses too (it split 30/2 records on data.eval_size=2.5).
    (tmp_path / "a_file").write_text("")
    for bad, says in (("data.eval_size=2.5", "data.eval_size=2.5: must be a whole number of records"),
                      (f"data.export_dir={tmp_path / 'a_file'}", "cannot make a directory there"),
                      (f"data.rejects={tmp_path}", "that is a directory; name a file")):
        refused = data_cli(bad)
        assert refused.returncode == 2 and f"ftlab: {bad.split('=')[0]}=" in refused.stderr and says in refused.stderr, \
            refused.stderr[-2000:]


def test_near_duplicates_need_a_similar_question_and_answer_not_a_shared_system_prompt_or_document(data_cfg,
                                                                                                    tiny_tokenizer):
    """A long system prompt on every record, or one long document that several questions are asked
    about, made distinct records Jaccard-similar as whole texts: all but one were dropped."""
    from ftlab.data.records import Example

    rules = " ".join(f"rule {i} says to be brief and polite" for i in range(60))
    document = " ".join(f"clause {i} of the contract covers item {i * 7}" for i in range(2_500))  # ~110k chars

    def example(question, answer, system=None):
        return Example("x", ([{"role": "system", "content": system}] if system else [])
                       + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])

    questions = [f"Ticket {i}: the customer writes that the order arrived late again, that the box was damaged and "
                 f"that support did not answer; which clause covers item {i * 7}, and who signs?" for i in range(1, 6)]
    under_rules = [example(q, f"Clause {i}.", rules) for i, q in enumerate(questions, start=1)]
    on_document = [example(f"{document}\n\n{q}", f"Clause {i}.") for i, q in enumerate(questions, start=1)]
    for distinct in (under_rules, on_document):
        kept, dropped = clean.drop_near_duplicates(distinct, 0.9)
        assert dropped == 0 and kept == distinct
    # The same question, one word changed, with the same answer is still a near duplicate, behind either.
    for system, prefix in ((rules, ""), (None, f"{document}\n\n")):
        near = [example(prefix + questions[0], "Clause 1.", system),
                example(prefix + questions[0].replace("signs", "sign"), "Clause 1.", system),
                example(prefix + questions[1], "Clause 2.", system)]
        assert clean.drop_near_duplicates(near, 0.8) == ([near[0], near[2]], 1)
