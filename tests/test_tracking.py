"""MLflow limits and secrets: long values are cut, secrets never reach params; a store that
cannot be used fails at start, and one that workers start on together works for each."""
import os
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from ftlab import tracking
from tests.conftest import ROOT, server_database


def test_flatten_truncates_long_values_and_masks_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret123")
    cfg = OmegaConf.create({
        "data": {"system_prompt": "y" * 10000, "note": "token hf_supersecret123 here"},
        "storage": "postgresql://alice:pa55word@db:5432/optuna",
        "api_key": "sk-live-xyz",
        "eval": {"max_new_tokens": 64, "hub_token": "abc"},
        "target_modules": ["q_proj", "v_proj"],
    })
    flat = tracking.flatten(cfg)
    assert len(flat["data.system_prompt"]) <= tracking.MAX_PARAM_VALUE
    assert flat["data.system_prompt"].endswith("[truncated]")
    assert "pa55word" not in flat["storage"] and "alice" in flat["storage"]
    assert flat["api_key"] == "***" and flat["eval.hub_token"] == "***"
    assert flat["eval.max_new_tokens"] == "64"
    assert "hf_supersecret123" not in flat["data.note"]
    assert flat["target_modules"] == '["q_proj", "v_proj"]'


def test_the_config_hash_sees_all_of_a_value_longer_than_mlflow_keeps(make_cfg):
    """Values were cut to MLflow's 6,000 characters before hashing: two system prompts that differ
    only after that were one config, which train.resume=true and a rerun sweep took for each other."""
    long = "x" * tracking.MAX_PARAM_VALUE
    a, b = make_cfg(f"data.system_prompt={long}A"), make_cfg(f"data.system_prompt={long}B")
    assert tracking.flatten(a)["data.system_prompt"] == tracking.flatten(b)["data.system_prompt"]  # as logged
    assert tracking.config_hash(a) != tracking.config_hash(b)
    assert tracking.config_hash(make_cfg("data.system_prompt=short")) == tracking.config_hash(
        make_cfg("data.system_prompt=short", "train.resume=true"))
    import mlflow

    tracking.setup(a.tracking_uri, a.experiment)  # what train.resume=<that run> says: not "the data changed"
    with mlflow.start_run() as logged:
        tracking.log_config(a)
    said = tracking.changed_config(mlflow.get_run(logged.info.run_id), b, tracking.config_hash(b))
    assert said == f"data.system_prompt past the {tracking.MAX_PARAM_VALUE} characters MLflow keeps changed"


def test_a_store_is_shown_as_the_user_gave_it():
    """Without the busy timeout ftlab adds to a SQLite URI, keeping the user's own query, masked."""
    assert tracking.shown_store(tracking.sqlite_busy_timeout("sqlite:///a.db")) == "sqlite:///a.db"
    assert tracking.shown_store("sqlite:///a.db?timeout=60&cache=shared") == "sqlite:///a.db?cache=shared"
    assert tracking.shown_store("sqlite:///a.db?cache=shared&timeout=60") == "sqlite:///a.db?cache=shared"
    assert tracking.shown_store("postgresql://ftlab:secret@db/ftlab") == "postgresql://ftlab:***@db/ftlab"


def test_a_mysql_database_without_utf8mb4_is_refused_at_start():
    """A latin1 MariaDB database stored the sweep command's non-Latin text as '?' and failed every trial
    (Incorrect string value for params.value) after its model had loaded and the base model was scored."""
    import uuid

    import pymysql
    import pytest

    name = f"ftlab_{uuid.uuid4().hex[:10]}"
    admin = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
    admin.cursor().execute(f"CREATE DATABASE {name} CHARACTER SET latin1")
    try:
        with pytest.raises(tracking.TrackingError, match=rf"tracking_uri=mysql\+pymysql://root@127.0.0.1:3306/{name}: the "
                                                         r"database's character set is latin1, and MLflow's and Optuna's "
                                                         r"text needs utf8mb4"):
            tracking.setup(f"mysql+pymysql://root@127.0.0.1:3306/{name}", "x")
        # Its tables are what holds the text: utf8mb4 ones under a latin1 default are a working store.
        admin.cursor().execute(f"CREATE TABLE {name}.t (v TEXT) CHARACTER SET utf8mb4")
        tracking.probe_database(f"mysql+pymysql://root@127.0.0.1:3306/{name}", "store")
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
def test_a_plain_database_url_works_with_the_driver_ftlab_installs(backend):
    """mysql:// is mysqlclient to SQLAlchemy, which ftlab does not install: the store and the storage
    failed with "No module named 'MySQLdb'"; PyMySQL is used, as psycopg2 is for postgresql://."""
    with server_database(backend) as url:
        plain = url.replace("+pymysql", "")
        tracking.setup(plain, "plain")
        assert [e.name for e in MlflowClient(tracking.installed_driver(plain)).search_experiments()].count("plain") == 1


def test_unreachable_store_fails_before_training(tmp_path):
    import time

    import pytest

    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=r"tracking_uri=mysql\+pymysql://nobody:\*\*\*@127\.0\.0\.1:1/none: "
                                                     r"\(2003, \"Can't connect to MySQL server"):
        tracking.setup("mysql+pymysql://nobody:secret@127.0.0.1:1/none", "x")
    assert time.monotonic() - start < 30  # MLflow's own engine retries for ~100 s
    with pytest.raises(tracking.TrackingError, match='database "ftlab_no_such_db" does not exist'):
        tracking.setup("postgresql://postgres@127.0.0.1:5432/ftlab_no_such_db", "x")
    with pytest.raises(tracking.TrackingError) as refused:  # named as typed, in one line (psycopg2 wraps it)
        tracking.setup("postgresql://postgres@127.0.0.1:1/none", "x")
    assert str(refused.value).startswith("cannot use the MLflow tracking store tracking_uri=postgresql://postgres@")
    assert "\n" not in str(refused.value) and "Connection refused Is the server running" in str(refused.value)
    with pytest.raises(tracking.TrackingError, match="Can't load plugin: sqlalchemy.dialects:mysql.nosuchdriver"):
        tracking.setup("mysql+nosuchdriver://nobody@127.0.0.1/none", "x")  # a driver that is not installed


def test_workers_that_each_created_a_parent_run_converge_on_the_oldest(tmp_path):
    from mlflow.tracking import MlflowClient

    tracking.setup(f"sqlite:///{tmp_path}/mlflow.db", "race")
    client, experiment = MlflowClient(), tracking._active_experiment_id()
    first, was, error = tracking.start_sweep_run("s1", "python -m ftlab -m", ["rouge_l"], ["maximize"])
    assert was is None and error is None  # created
    # A second worker that searched before `first` existed created its own a moment later.
    second = client.create_run(experiment, tags={"ftlab.role": "sweep", "ftlab.sweep_id": "s1"}).info.run_id
    assert tracking.sweep_parent(client, experiment, "s1", created=second) == first
    assert client.get_run(second).info.lifecycle_stage == "deleted"
    assert tracking.start_sweep_run("s1", "python -m ftlab -m", ["rouge_l"], ["maximize"]) == (first, "RUNNING", None)
    assert tracking.sweep_parent(client, experiment, "other") is None


def test_the_config_hash_follows_the_content_of_the_data_file_so_an_edited_file_is_not_resumed_or_kept(make_cfg, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = make_cfg(f"data.path={data}")
    first = tracking.config_hash(cfg)
    assert tracking.config_hash(make_cfg(f"data.path={data}", "train.resume=true", "sweep.name=x")) == first
    data.write_text('{"prompt": "a", "completion": "c"}\n')
    assert tracking.config_hash(cfg) != first


def test_a_sweeps_trials_are_one_run_per_config_and_a_decided_one_wins(tmp_path):
    """tracking.latest_attempts, which the sweep summary and the report count."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("attempts")

    def run(name, state, config_hash=None, save_steps="0"):
        tags = {"ftlab.state": state, **({"ftlab.config_hash": config_hash} if config_hash else {})}
        made = client.create_run(experiment, run_name=name, tags=tags).info.run_id
        client.log_param(made, "train.save_steps", save_steps)
        time.sleep(0.002)  # start times in this order
        return made

    made = [run("a-failed", "failed", "a"), run("b-finished", "finished", "b"), run("a-retried", "finished", "a"),
            run("b-failed-elsewhere", "failed", "b"), run("c-every-10", "finished", "c", "10"),
            run("c-every-20", "finished", "c", "20"), run("untagged", "failed")]
    kept, earlier = tracking.latest_attempts([client.get_run(r) for r in reversed(made)])
    assert [r.info.run_name for r in kept] == ["b-finished", "a-retried", "c-every-10", "c-every-20", "untagged"]
    assert earlier == 2


def test_a_key_added_to_the_schema_changes_the_config_hash_only_once_set(make_cfg):
    """model.arch.head_dim came after runs were recorded: unset, the hash is the one those runs have
    (train.resume=true and a rerun sweep find them); set, it is part of what is trained."""
    unset = make_cfg()
    assert "model.arch.head_dim" in tracking.flatten(unset)  # logged, as every key
    assert all(key not in tracking.hashed_params(unset) for key in tracking.HASHED_ONCE_SET)
    assert tracking.config_hash(make_cfg("model.arch.head_dim=32")) != tracking.config_hash(unset)
    # Where runs are logged is not what they train: hashed as its default (None), whatever names the store.
    assert tracking.config_hash(make_cfg("tracking_uri=sqlite:////elsewhere/mlflow.db")) == tracking.config_hash(unset)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"])
def test_workers_starting_together_on_a_fresh_store_all_get_it(tmp_path, backend):
    """Each ran MLflow's schema migrations at once on the empty database (MySQL: "Table 'tags'
    already exists", then "Duplicate column name"; PostgreSQL: a unique violation), and failed."""
    with ExitStack() as stack:
        uri = f"sqlite:///{tmp_path}/mlflow.db" if backend == "sqlite" else stack.enter_context(server_database(backend))
        code = f"from ftlab import tracking; tracking.setup({uri!r}, 'ftlab'); print('ok')"
        workers = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                   for _ in range(4)]
        for worker in workers:
            out, err = worker.communicate(timeout=300)
            assert worker.returncode == 0 and out.strip() == "ok", err[-3000:]
        assert [e.name for e in MlflowClient(tracking.installed_driver(uri)).search_experiments()].count("ftlab") == 1


LOCK_HOLDER = """
import sys, time
from ftlab import tracking
store, what = tracking.sqlite_busy_timeout(tracking.installed_driver(sys.argv[1])), sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()  # all ask at once
with tracking.one_process_at_a_time(store, what):
    start = time.time()
    time.sleep(1.5)
    end = time.time()
print(start, end)
"""


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"])
def test_one_process_at_a_time_holds_one_name_and_not_another(tmp_path, backend):
    """Workers starting together each scored the base model: now one does while the others, asking for
    the same base evaluation, wait (and then reuse its scores); another name is not held up."""
    with ExitStack() as stack:
        uri = f"sqlite:///{tmp_path}/mlflow.db" if backend == "sqlite" else stack.enter_context(server_database(backend))
        holders = [subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, uri, what], cwd=tmp_path, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
                   for what in ("base eval k1", "base eval k1", "base eval k2")]
        for holder in holders:  # every one has imported ftlab
            assert holder.stdout.readline().strip() == "ready", holder.communicate()[1][-3000:]
        for holder in holders:
            holder.stdin.write("go\n")
            holder.stdin.flush()
        spans = []
        for holder in holders:
            out, err = holder.communicate(timeout=120)
            assert holder.returncode == 0, err[-3000:]
            spans.append(tuple(map(float, out.split())))
    (a_start, a_end), (b_start, b_end), (other_start, _) = spans
    assert a_end <= b_start or b_end <= a_start  # one after the other
    assert other_start < max(a_start, b_start)  # not behind the second of them
