"""The CPU server on a promoted tiny model answers the openai client, checks the API key, and
is always stopped; check=true prints latency and tokens/s."""
from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import openai
import pytest
import torch

from hydra import compose, initialize_config_dir

from ftlab import models, registry
from ftlab.pipeline import run
from ftlab.serve import Resolved, free_port, print_usage, resolve, smoke_check
from tests.conftest import CONF, ROOT, TINY, store_overrides

KEY = "test-key-1234"

# One xdist worker runs this file: its promoted model and server are built once (module fixtures).
pytestmark = pytest.mark.xdist_group("serve")


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """A tiny trial registered and promoted (once for this file): models:/ftlab@production."""
    tmp_path = tmp_path_factory.mktemp("serve")
    (tmp_path / "mlruns").mkdir()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *store_overrides(tmp_path), "train.max_steps=2",
                                           "eval.compare_base=false"])
    run(cfg)
    [trial] = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", output_format="list")
    registry.register(trial.info.run_id, cfg.experiment)
    assert registry.promote(cfg.experiment)
    return [f"model=models:/{cfg.experiment}@production", f"tracking_uri={cfg.tracking_uri}",
            f"cache_dir={tmp_path}/cache"]


def serve(*args: str, **kwargs) -> subprocess.Popen:
    # Own session: the test can stop the CLI and every child (engine, proxy) as one process group.
    return subprocess.Popen([sys.executable, "-m", "ftlab.serve", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    return process.stdout.read() if process.stdout and not process.stdout.closed else ""


@pytest.fixture(scope="module")
def server(production):
    """One CPU server (with an API key) for this file, stopped at the end even on failure."""
    port = free_port()
    process = serve(*production, f"port={port}", f"api_key={KEY}")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        assert process.poll() is None, stop(process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        said = stop(process, signal.SIGINT)  # Ctrl-C in its terminal: the whole process group
        assert process.poll() is not None
    # Ctrl-C is how a server is stopped: no KeyboardInterrupt tracebacks, as if it had crashed.
    assert process.returncode == 130 and "Traceback" not in said, said[-3000:]


def test_cpu_server_answers_the_openai_client_and_checks_the_key(server):
    client = openai.OpenAI(base_url=server, api_key=KEY)
    [model] = client.models.list().data
    reply = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "My login fails"}],
                                           max_tokens=8, temperature=0.0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong").models.list()
    # Paths the engine behind the proxy normalises to /v1/...: the key is needed there too.
    host = server.removeprefix("http://").removesuffix("/v1")
    for path in ("/./v1/models", "/x/../v1/models", "//v1/models", "/V1/models", "/health"):
        connection = http.client.HTTPConnection(host, timeout=30)
        connection.request("GET", path)
        status = connection.getresponse().status
        connection.close()
        assert status == (200 if path == "/health" else 401), path
    for authorization, status in ((f"bearer {KEY}", 200), (f"BEARER  {KEY}", 200), (f"Basic {KEY}", 401),
                                  (f"Bearer {KEY}x", 401), (KEY, 401)):  # the scheme is case-insensitive (RFC 9110)
        connection = http.client.HTTPConnection(host, timeout=30)
        connection.request("GET", "/v1/models", headers={"Authorization": authorization})
        assert connection.getresponse().status == status, authorization
        connection.close()


def test_check_sends_a_held_out_prompt_and_reports_speed(server, production, capsys):
    # check=true runs smoke_check against the server it started; here against the fixture's server.
    model_id = openai.OpenAI(base_url=server, api_key=KEY).models.list().data[0].id
    run_id = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", output_format="list")[0].info.run_id
    result = smoke_check(server, Resolved(Path(model_id), model_id, run_id), KEY, max_tokens=8)
    assert result["completion_tokens"] > 0 and result["latency_s"] > 0 and result["tokens_per_second"] > 0
    out = capsys.readouterr().out
    first = registry.held_out(run_id, models.load_tokenizer(Path(model_id)))[0]
    assert "tokens/s" in out and repr(first.prompt[-1]["content"][:40])[1:-1] in out  # the source run's held-out prompt


def test_check_from_the_command_line_answers_and_stops_the_server_quietly(production):
    """check=true as a user runs it: the server starts, answers a held-out prompt, and stops; the
    engine's unreleased semaphores (the resource tracker removes them) leave no warning as the session's last words,
    nor does the key proxy about the readiness probe."""
    out = subprocess.run([sys.executable, "-m", "ftlab.serve", *production, f"port={free_port()}", "check=true",
                          "max_tokens=4", f"api_key={KEY}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/s" in out.stdout
    said = out.stdout + out.stderr  # Hydra's logging writes to stdout
    assert "leaked semaphore" not in said and "Traceback" not in said and "Error handling" not in said, said[-3000:]


def test_unknown_key_or_model_is_named():
    out = subprocess.run([sys.executable, "-m", "ftlab.serve", "model=x", "prot=8000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "prot" in out.stderr
    out = subprocess.run([sys.executable, "-m", "ftlab.serve", "model=/nonexistent/checkpoint"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "ftlab: model=/nonexistent/checkpoint: not models:/<name>@<alias>" in out.stderr


def test_an_adapter_directory_is_named_with_the_command_that_makes_it_servable(tmp_path):
    """A run's adapter folder names its run id; a downloaded one (my_adapter/adapter) suggested
    `register run_id=my_adapter`, which cannot work."""
    run_id = "0123abcd" * 4
    for folder, named in ((tmp_path / "runs" / run_id / "adapter", run_id),  # what a run leaves in output_dir
                          (tmp_path / "my_adapter" / "adapter", "<trial run id>")):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        out = subprocess.run([sys.executable, "-m", "ftlab.serve", f"model={folder}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert (f"ftlab: model={folder} is a LoRA adapter, not a model: merge and register it "
                f"(python -m ftlab.registry register run_id={named})") in out.stderr


def test_a_taken_port_or_bad_setting_is_refused_before_the_model_is_fetched(tmp_path):
    def cli(*args):
        # A registry with no models: any message about the model would mean it was looked up first.
        return subprocess.run([sys.executable, "-m", "ftlab.serve", "model=models:/absent@production",
                               f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli(f"port={port}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"ftlab: port={port}: something already listens on 127.0.0.1:{port}; stop it or choose another port=" \
        in out.stderr
    dead = cli("tracking_uri=http://127.0.0.1:9")  # MLflow's own retries took minutes
    assert dead.returncode == 2 and "Traceback" not in dead.stderr
    assert "ftlab: cannot use the MLflow tracking store tracking_uri=http://127.0.0.1:9: " in dead.stderr
    cannot_vllm = importlib.util.find_spec("vllm") is None or not torch.cuda.is_available()
    for setting, says in (("port=99999", "port=99999: use 1-65535"), ("quantize=3bit", "quantize=3bit: use 8bit"),
                          ("max_tokens=0", "max_tokens=0: must be >= 1"),
                          ("max_model_len=0", "max_model_len=0: must be >= 1"),
                          ("ready_timeout_s=-1", "ready_timeout_s=-1: must be > 0 seconds"),
                          *([("engine=vllm", "engine=vllm needs vLLM installed")] if cannot_vllm else [])):
        out = cli(setting)
        assert out.returncode == 2 and f"ftlab: {says}" in out.stderr, out.stderr[-2000:]


def test_a_cached_download_is_served_only_for_the_version_it_was(production):
    """The download cache was keyed by name and version number: every store has an 'ftlab' version 1,
    and a deleted, re-registered model numbers its versions again; the old weights were served."""
    with initialize_config_dir(config_dir=str(CONF / "serve"), version_base="1.3"):
        cfg = compose("config", overrides=production)
    first = resolve(cfg)
    assert resolve(cfg).checkpoint == first.checkpoint  # cached
    name = cfg.model.removeprefix("models:/").split("@")[0]
    client = mlflow.MlflowClient()
    client.delete_registered_model(name)
    registry.register(first.run_id, name)
    assert registry.promote(name)
    again = resolve(cfg)
    assert again.served_name == first.served_name and again.checkpoint != first.checkpoint
    assert (again.checkpoint / "config.json").is_file()


def test_a_download_stopped_half_way_is_fetched_again_not_served_broken(production, tmp_path, monkeypatch):
    """The cache counted as complete once config.json was there: a download stopped after it and before
    the weights failed every later serve, until the folder was deleted by hand."""
    with initialize_config_dir(config_dir=str(CONF / "serve"), version_base="1.3"):
        cfg = compose("config", overrides=[*production, f"cache_dir={tmp_path}"])
    download = registry.checkpoint_dir

    def stopped_after_the_config(uri, dst):
        checkpoint = download(uri, dst)
        for file in checkpoint.glob("*.safetensors"):
            file.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "checkpoint_dir", stopped_after_the_config)
    with pytest.raises(KeyboardInterrupt):
        resolve(cfg)
    monkeypatch.setattr(registry, "checkpoint_dir", download)
    checkpoint = resolve(cfg).checkpoint
    assert (checkpoint / "config.json").is_file() and list(checkpoint.glob("*.safetensors"))
    assert resolve(cfg).checkpoint == checkpoint  # and kept
    for file in checkpoint.glob("*.safetensors"):  # what an older ftlab left of a download stopped half-way
        file.unlink()
    assert resolve(cfg).checkpoint == checkpoint and list(checkpoint.glob("*.safetensors"))


def test_the_printed_examples_say_where_their_key_comes_from(monkeypatch, capsys):
    """They read $FTLAB_API_KEY: started with api_key=..., pasting them failed with a 401."""
    model = Resolved(Path("m"), "m-v1", None)
    monkeypatch.delenv("FTLAB_API_KEY", raising=False)
    print_usage("http://127.0.0.1:8000/v1", model, "s3cret")
    out = capsys.readouterr().out
    assert "export FTLAB_API_KEY=<the api_key= it was started with> first" in out and "s3cret" not in out
    monkeypatch.setenv("FTLAB_API_KEY", "s3cret")  # the key came from there: the examples work as printed
    print_usage("http://127.0.0.1:8000/v1", model, "s3cret")
    assert "export FTLAB_API_KEY" not in capsys.readouterr().out
