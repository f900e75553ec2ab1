"""Fault injection and probes for reliability tests, plugged in the way users add callbacks:
`train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 2}]`."""
import gc
import json
import os
import signal
import weakref
from pathlib import Path

from hydra.experimental.callback import Callback
from transformers import TrainerCallback


class RaiseAtStep(TrainerCallback):
    def __init__(self, step: int = 1, message: str = "injected failure"):
        self.step, self.message = step, message

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise RuntimeError(f"{self.message} at step {state.global_step}")


class EndSweepAtStep(TrainerCallback):
    """What another worker of the sweep does when it finishes last: end the sweep's parent run, having
    handed over this trial as it will end (`with_this_trial`: it ended after this one) or not (it
    ended between two trials of this worker, with none running)."""

    def __init__(self, step: int = 1, with_this_trial: bool = True):
        self.step, self.with_this_trial = step, with_this_trial

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            import mlflow
            from mlflow.tracking import MlflowClient

            from ftlab.sweep import ENV_PARENT_RUN_ID, HANDED_OVER, handed_over

            trials = [{"run_id": mlflow.active_run().info.run_id, "state": "finished"}] if self.with_this_trial else []
            client, parent = MlflowClient(), os.environ[ENV_PARENT_RUN_ID]
            client.set_tag(parent, HANDED_OVER, handed_over({"trials": trials}))
            client.set_terminated(parent, status="FINISHED")


class RecordOptimizer(TrainerCallback):
    """Write the optimizer's class and its parameter groups (size, lr, weight decay) to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        groups = [{"params": len(g["params"]), "lr": g["lr"], "weight_decay": g["weight_decay"]}
                  for g in optimizer.param_groups if g["params"]]
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        Path(self.path).write_text(json.dumps({"class": type(inner).__name__, "groups": groups}))


class FailOnTrial(TrainerCallback):
    """Fail chosen trials of a sweep at their first step: `raise_on` with an exception,
    `oom_on` through the real memory cap (budget.memory_cap_gb's check, with a tiny cap).
    Pass the trial as `trial: ${sweep.trial_number}`."""

    def __init__(self, trial: int, raise_on=(), oom_on=()):
        from ftlab.train import memory_cap_callback

        self.trial, self.raise_on, self.oom_on = trial, list(raise_on), list(oom_on)
        self.cap = memory_cap_callback(0.001)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trial in self.raise_on:
            raise RuntimeError(f"injected failure in trial {self.trial}")
        if self.trial in self.oom_on:
            self.cap.on_step_end(args, state, control, **kwargs)


_TRAINED_MODELS: list = []  # weak references to every model a trial of this process trained


class RecordLeftovers(TrainerCallback):
    """At each trial's training start, append a JSON line to `path`: how many earlier trials'
    models are still alive in this process, and how many objects the garbage collector has frozen."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        alive = sum(ref() is not None for ref in _TRAINED_MODELS)
        _TRAINED_MODELS.append(weakref.ref(model))
        with self.path.open("a") as f:
            f.write(json.dumps({"earlier_models_alive": alive, "frozen": gc.get_freeze_count()}) + "\n")


def sigkill_once(marker: str) -> None:
    """SIGKILL this process unless `marker` exists; write it first, so the re-run goes through."""
    if not Path(marker).exists():
        Path(marker).write_text("fired")
        os.kill(os.getpid(), signal.SIGKILL)


class KillOnce(TrainerCallback):
    """SIGKILL the whole process the first time trial `trial` reaches `at` (mid_training:
    after its first step; before_eval: when training ends, before held-out scoring).
    A marker file makes it fire once, so the re-run goes through."""

    def __init__(self, trial: int, kill_trial: int, at: str, marker: str):
        self.fire = trial == kill_trial
        self.at, self.marker = at, marker

    def _kill(self):
        if self.fire:
            sigkill_once(self.marker)

    def on_step_end(self, args, state, control, **kwargs):
        if self.at == "mid_training":
            self._kill()

    def on_train_end(self, args, state, control, **kwargs):
        if self.at == "before_eval":
            self._kill()


class SignalOnce(TrainerCallback):
    """Send this process `signal` (SIGTERM: a scheduler's preemption; SIGKILL: a lost machine) at
    the end of step `step` of trial `kill_trial`; once (marker file), so running the same command
    again goes through."""

    def __init__(self, trial: int, kill_trial: int, marker: str, step: int = 2, signal: str = "SIGTERM"):
        self.fire, self.marker, self.step, self.signal = trial == kill_trial, marker, step, signal

    def on_step_end(self, args, state, control, **kwargs):
        if self.fire and state.global_step >= self.step and not Path(self.marker).exists():
            Path(self.marker).write_text("fired")
            os.kill(os.getpid(), getattr(signal, self.signal))


class SignalAtStep(TrainerCallback):
    """Send a signal (default SIGTERM) to this very process at the end of a step, as `kill` would."""

    def __init__(self, step: int = 1, signal: str = "SIGTERM"):
        self.step, self.signal, self.sent = step, signal, False

    def on_step_end(self, args, state, control, **kwargs):
        import os
        import signal

        if state.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))



class MlflowServer:
    """A real `mlflow server` subprocess: SQLite backend and artifacts under root, a free port."""

    def __init__(self, root):
        from pathlib import Path

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __enter__(self, timeout: float = 120.0):
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"), start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not come up in {timeout} s")

    def __exit__(self, *exc):
        import os
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpRelay:
    """A TCP relay in front of a server: close() makes its port refuse connections and cuts
    open ones, as a dead or unreachable tracking server does; open() serves the same port again."""

    RELAYS: dict = {}  # port -> relay, so a callback built from a config can find it

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.connections, self.listener = [], None
        TcpRelay.RELAYS[self.port] = self

    def open(self):
        import socket
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def close(self):
        import socket

        for s in [self.listener, *self.connections]:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the accept() and recv() threads
            except OSError:
                pass
            s.close()
        self.connections.clear()

    def _accept(self, listener):
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        import socket

        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TrackingOutage(TrainerCallback):
    """Cut the tracking server off (through its TcpRelay) at the end of step `stop_at`, bring it
    back at the end of step `restart_at`; `slow_s` stretches each step of the outage so the
    buffered metrics see several failed retries."""

    def __init__(self, relay_port: int, stop_at: int = 2, restart_at: int = 4, slow_s: float = 0.0):
        self.relay = TcpRelay.RELAYS[relay_port]
        self.stop_at, self.restart_at, self.slow_s = stop_at, restart_at, slow_s

    def on_step_end(self, args, state, control, **kwargs):
        import time

        if state.global_step == self.stop_at:
            self.relay.close()
        elif state.global_step == self.restart_at:
            self.relay.open()
        elif self.stop_at < state.global_step < self.restart_at:
            time.sleep(self.slow_s)


class KillAtTrialStart(Callback):
    """Hydra callback: SIGKILL the process when trial `kill_trial` starts, before its data is
    prepared or any MLflow run exists; once (marker file). Add it with
    `+hydra.callbacks.kill={_target_: tests.faults.KillAtTrialStart, kill_trial: 1, marker: ...}`."""

    def __init__(self, kill_trial: int, marker: str):
        self.kill_trial, self.marker = kill_trial, marker

    def on_job_start(self, config, **kwargs):
        if config.sweep.trial_number == self.kill_trial:
            sigkill_once(self.marker)
