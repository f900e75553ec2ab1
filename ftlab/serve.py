"""Serve a registered (or local) checkpoint behind an OpenAI-compatible API: `vllm serve` when
vLLM and a GPU are present, else `transformers serve` on the CPU. transformers serve has no API-key
option, so when a key is set a small aiohttp proxy checks it in front. `check=true` sends one
held-out prompt through the openai client and prints latency and tokens/s.

The model stack (MLflow, torch, transformers through ftlab.registry) is imported where a model
is resolved, so check_settings refuses a bad port or option in a second, not after ~13 s of imports.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ftlab import device
from ftlab.config import ConfigError, ServeConfig, check_keys, exit_2_on
from ftlab.files import publishing

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id


class ServeError(RuntimeError):
    """The model cannot be resolved or the server did not come up; the message says what to do."""


@dataclass
class Resolved:
    checkpoint: Path
    served_name: str  # the `model` field clients send
    run_id: str | None  # the trial it came from, for a held-out prompt


def resolve(cfg: DictConfig) -> Resolved:
    """models:/<name>@<alias> or models:/<name>/<version> -> a downloaded checkpoint dir (cached
    per version); a local directory is served as it is."""
    match = MODEL_URI.match(cfg.model)
    if not match:
        path = Path(cfg.model).expanduser()
        if (path / "adapter_config.json").exists():  # outputs/runs/<run id>/adapter, or one downloaded
            # outputs/runs/<run id>/adapter names its run; any other folder (a download) does not.
            run_id = path.parent.name if path.name == "adapter" and RUN_ID.fullmatch(path.parent.name) \
                else "<trial run id>"
            raise ServeError(f"model={cfg.model} is a LoRA adapter, not a model: merge and register it "
                             f"(python -m ftlab.registry register run_id={run_id}), then serve "
                             "model=models:/<name>/<version>")
        if not (path / "config.json").exists():
            raise ServeError(f"model={cfg.model}: not models:/<name>@<alias>, models:/<name>/<version>, "
                             "nor a checkpoint directory with config.json")
        return Resolved(path.resolve(), path.name, None)
    from ftlab import models, registry, tracking

    try:
        tracking.open_existing(cfg.tracking_uri)
    except tracking.TrackingError as e:
        raise ServeError(str(e)) from None
    name = match["name"]
    try:
        version = registry.resolve_version(name, match["alias"] or match["version"])
    except registry.RegistryError as e:
        raise ServeError(f"model={cfg.model}: {e}") from e
    # Keyed by what the version is, not only its number: every store has an 'ftlab' version 1, and a
    # deleted and re-created model numbers its versions again.
    identity = hashlib.sha256(f"{version.source}|{version.run_id}|{version.creation_timestamp}".encode()).hexdigest()
    dst = models.cache_root(cfg.cache_dir) / "serve" / f"{name}-v{version.version}-{identity[:12]}"
    if not (checkpoint := _whole_checkpoint(dst)):  # none, or one an older ftlab left half-downloaded
        shutil.rmtree(dst, ignore_errors=True)
        with publishing(dst) as staged:  # moved into place whole: a download stopped half-way leaves none
            registry.checkpoint_dir(f"models:/{name}/{version.version}", staged)
        if not (checkpoint := _whole_checkpoint(dst)):
            raise ServeError(f"model={cfg.model}: version {version.version} holds no checkpoint with safetensors "
                             "weights")
    print(f"{cfg.model} -> version {version.version} (run {version.run_id})")
    return Resolved(checkpoint, f"{name}-v{version.version}", version.run_id)


def _whole_checkpoint(entry: Path) -> Path | None:
    """A cache entry's checkpoint (checkpoint_dir's layouts: entry/model, or entry itself) if it has
    its config and weights."""
    return next((c for c in (entry / "model", entry)
                 if (c / "config.json").is_file() and any(c.glob("*.safetensors"))), None)


def check_settings(cfg: DictConfig) -> None:
    """What can be refused before a model is downloaded or a process started, including a port
    something else holds (the key proxy would otherwise fail in its thread while the readiness
    check reached that other server)."""
    if cfg.engine not in ("auto", "vllm", "transformers"):
        raise ServeError(f"engine={cfg.engine}: use auto, vllm or transformers")
    if cfg.quantize not in (None, "8bit", "4bit"):
        raise ServeError(f"quantize={cfg.quantize}: use 8bit or 4bit (bitsandbytes), or leave it unset")
    for key in ("tensor_parallel_size", "max_tokens", "max_model_len"):
        if cfg[key] is not None and cfg[key] < 1:
            raise ServeError(f"{key}={cfg[key]}: must be >= 1")
    if not cfg.ready_timeout_s > 0:  # 0 or less: never ready, reported after the model load as a timeout
        raise ServeError(f"ready_timeout_s={cfg.ready_timeout_s:g}: must be > 0 seconds")
    if not 1 <= cfg.port <= 65535:
        raise ServeError(f"port={cfg.port}: use 1-65535")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"port={cfg.port}: something already listens on {cfg.host}:{cfg.port}; "
                                 "stop it or choose another port=") from None
            raise ServeError(f"host={cfg.host} port={cfg.port}: cannot listen there ({e.strerror or e})") from None


def choose_engine(cfg: DictConfig) -> str:
    gpu_vllm = importlib.util.find_spec("vllm") is not None and device.cuda_available()
    if cfg.engine == "vllm" and not gpu_vllm:
        raise ServeError("engine=vllm needs vLLM installed (pip install vllm) and a CUDA GPU; use engine=auto")
    # vLLM's in-flight bitsandbytes mode is 4-bit only, so 8-bit goes to transformers.
    if cfg.quantize == "8bit":
        if cfg.engine == "vllm":
            raise ServeError("quantize=8bit: vLLM's bitsandbytes mode is 4-bit only; use quantize=4bit or "
                             "engine=transformers")
        return "transformers"
    if cfg.engine == "auto":
        return "vllm" if gpu_vllm else "transformers"
    return cfg.engine


def engine_command(engine: str, cfg: DictConfig, model: Resolved, host: str, port: int,
                   api_key: str | None) -> list[str]:
    if engine == "vllm":
        cmd = ["vllm", "serve", str(model.checkpoint), "--served-model-name", model.served_name, "--host", host,
               "--port", str(port), "--tensor-parallel-size", str(cfg.tensor_parallel_size)]
        if cfg.max_model_len:
            cmd += ["--max-model-len", str(cfg.max_model_len)]
        if api_key:
            cmd += ["--api-key", api_key]
        if cfg.quantize == "4bit":
            cmd += ["--quantization", "bitsandbytes"]
        return cmd
    cmd = ["transformers", "serve", str(model.checkpoint), "--host", host, "--port", str(port)]
    if cfg.quantize:
        cmd += ["--quantization", f"bnb-{cfg.quantize}"]
    return cmd


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- API-key proxy


def start_key_proxy(host: str, port: int, upstream: str, api_key: str) -> None:
    """A daemon-thread aiohttp server that requires `Authorization: Bearer <api_key>` on every path
    but exactly /health (vLLM checks /v1/*; a check by prefix would let /./v1/... through, which the
    upstream normalises to /v1/...) and streams everything through to `upstream`."""
    from aiohttp import ClientSession, ClientTimeout, web

    # Not passed on: per-connection headers, the key, and the body's framing and encoding, which
    # aiohttp sets anew for what it streams (the client has decoded a compressed body).
    hop_by_hop = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "authorization",
                  "content-encoding"}
    expected = api_key.encode()

    async def forward(request: web.Request) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        authorised = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)
        if request.raw_path != "/health" and not authorised:
            return web.json_response({"error": {"message": "invalid or missing API key", "type": "invalid_api_key"}},
                                     status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop_by_hop}
        session: ClientSession = request.app["session"]
        async with session.request(request.method, upstream + request.path_qs, headers=headers,
                                   data=await request.read()) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status, headers={
                k: v for k, v in upstream_response.headers.items() if k.lower() not in hop_by_hop})
            try:
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                pass  # the client hung up (a readiness probe that saw the status line, a cancelled stream)
            return response

    async def serve_forever() -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app["session"] = ClientSession(timeout=ClientTimeout(total=None))
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve_forever(),), daemon=True).start()


# --------------------------------------------------------------------------- running


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"the server exited with code {process.returncode} before it was ready "
                             "(its log is above)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                r.read()  # the whole answer: hanging up mid-way makes the key proxy log a reset connection
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServeError(f"the server did not answer {url}/health within ready_timeout_s={timeout_s:g}")


@contextmanager
def running(cfg: DictConfig):
    """Start the engine (and the key proxy when needed); yield (base_url, model, api_key, engine
    process); always stop the engine."""
    check_settings(cfg)
    engine = choose_engine(cfg)  # before resolve: an engine that cannot run is refused before any download
    model = resolve(cfg)
    api_key = cfg.api_key or os.environ.get("FTLAB_API_KEY")
    proxied = engine == "transformers" and api_key
    engine_host, engine_port = ("127.0.0.1", free_port()) if proxied else (cfg.host, cfg.port)
    cmd = engine_command(engine, cfg, model, engine_host, engine_port, api_key)
    from ftlab.tracking import mask

    print("starting:", mask(" ".join(cmd)).replace(api_key or "\0", "***"), flush=True)
    if engine == "transformers":
        # transformers serve pins requests to the model named on its command line.
        model.served_name = str(model.checkpoint)
    # Stopping the engine leaves semaphores its libraries did not release; Python's resource tracker
    # removes them, and would print a warning that it did as the last words of every session.
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning"]))
    process = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": warnings})
    try:
        wait_ready(f"http://{engine_host}:{engine_port}", process, cfg.ready_timeout_s)
        if proxied:
            start_key_proxy(cfg.host, cfg.port, f"http://{engine_host}:{engine_port}", api_key)
            wait_ready(f"http://{cfg.host}:{cfg.port}", process, 30)
        yield f"http://{cfg.host}:{cfg.port}/v1", model, api_key, process
    finally:
        # A second Ctrl-C or SIGTERM while the engine stops would skip its kill and leave it running.
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def print_usage(base_url: str, model: Resolved, api_key: str | None) -> None:
    key = "$FTLAB_API_KEY" if api_key else "none"
    # The examples read the key from the environment, not from the screen; given as api_key=, it is not there.
    export = "\n(export FTLAB_API_KEY=<the api_key= it was started with> first)\n" \
        if api_key and os.environ.get("FTLAB_API_KEY") != api_key else ""
    print(f"""
OpenAI-compatible server ready at {base_url}  (model "{model.served_name}")
{export}
curl {base_url}/chat/completions -H "Content-Type: application/json" \\
  -H "Authorization: Bearer {key}" \\
  -d '{{"model": "{model.served_name}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 64}}'

python - <<'EOF'
import os
from openai import OpenAI
client = OpenAI(base_url="{base_url}", api_key={'os.environ["FTLAB_API_KEY"]' if api_key else '"none"'})
reply = client.chat.completions.create(model="{model.served_name}",
                                       messages=[{{"role": "user", "content": "Hello"}}], max_tokens=64)
print(reply.choices[0].message.content)
EOF
""", flush=True)


def held_out_prompt(model: Resolved) -> list[dict]:
    """The first held-out prompt of the trial the model came from, or a generated ticket."""
    if model.run_id:
        from ftlab import models, registry

        return registry.held_out(model.run_id, models.load_tokenizer(model.checkpoint))[0].prompt
    from ftlab.data.generate import generate

    record = generate(1, seed=0)[0]
    return [{"role": "user", "content": f"{record['instruction']}\n\n{record['input']}".strip()}]


def smoke_check(base_url: str, model: Resolved, api_key: str | None, max_tokens: int) -> dict[str, float]:
    """One held-out prompt through the official openai client: latency and tokens/s."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none")
    messages = held_out_prompt(model)
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model.served_name, messages=messages, max_tokens=max_tokens,
                                           temperature=0.0)
    latency = time.perf_counter() - start
    tokens = reply.usage.completion_tokens if reply.usage else 0
    print(f"check: {tokens} tokens in {latency:.2f} s  ->  {tokens / latency:.1f} tokens/s\n"
          f"  prompt: {messages[-1]['content'][:200]!r}\n  reply:  {reply.choices[0].message.content[:200]!r}",
          flush=True)
    return {"latency_s": latency, "completion_tokens": tokens, "tokens_per_second": tokens / latency}


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="conf/serve", config_name="config")
    @exit_2_on(ServeError, ConfigError)  # ConfigError: a key the schema lacks, an unusable cache_dir
    def command(cfg: DictConfig) -> None:
        check_keys(cfg, ServeConfig)
        # SIGTERM (a supervisor) and Ctrl-C end the command the same quiet way (exit 143 or 130, no
        # KeyboardInterrupt traceback); either way `running` stops the engine.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
        with running(cfg) as (base_url, model, api_key, process):
            print_usage(base_url, model, api_key)
            if cfg.check:
                smoke_check(base_url, model, api_key, cfg.max_tokens)
                return
            sys.exit(process.wait())

    command()


if __name__ == "__main__":
    main()
