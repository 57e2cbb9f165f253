"""Managed vLLM: start vLLM's OpenAI server from its own environment, use it, stop it by PID.

vLLM and this project cannot share one environment (vLLM >= 0.23 pins a fastapi below what
prefect >= 3.9 needs), so the flow never imports vLLM: it talks HTTP to ``vllm serve``. With
``teacher.serve`` set, the flow starts that server itself from the configured interpreter on
127.0.0.1, waits until ``GET /v1/models`` answers, points the teacher's ``base_url`` at it, and
stops it at the end of the run (SIGTERM to its process group, SIGKILL after a grace period),
whatever happened in between. Stages whose ``serve`` and model agree share one server.

Also a command, to serve a model by hand the same way::

    python -m pipeline.synthesis.vllm_server --python .venv-vllm/bin/python --model DIR \\
        --served-model-name my-model -- --max-model-len 2048

Hand-rolled rather than a library: what is needed is a subprocess, a readiness poll and a
signal, and the libraries that manage servers (e.g. vLLM's own CLI) live in the environment
this module must not import.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pipeline.errors import PermanentError

log = logging.getLogger(__name__)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` console script fails on CPU builds


@dataclass
class ServeConfig:
    """How to start vLLM's OpenAI server for a teacher (``teacher.serve``)."""

    python: str = field(metadata={"help": "Interpreter of the environment where vLLM is installed, "
                                          "e.g. .venv-vllm/bin/python (make vllm-setup)."})
    model: str | None = field(default=None, metadata={
        "help": "What vLLM loads (a local folder or a Hub id); null = teacher.model. The server "
                "serves it under the name teacher.model."})
    port: int | None = field(default=None, metadata={"help": "Port on 127.0.0.1; null = a free one."})
    args: list[str] = field(default_factory=list, metadata={
        "help": "Extra server arguments, e.g. [--max-model-len, '4096', --reasoning-parser, qwen3]. "
                "On vLLM's CPU build add --no-enable-chunked-prefill (its engine dies on seeded "
                "requests whose prefill is chunked)."})
    env: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Extra environment for the server, e.g. {VLLM_CPU_KVCACHE_SPACE: '4'}."})
    ready_timeout_s: float = field(default=900.0, metadata={
        "help": "Seconds to wait for the server to answer GET /v1/models."})

    def __post_init__(self):
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
        if self.ready_timeout_s <= 0:
            raise ValueError(f"ready_timeout_s: must be > 0, got {self.ready_timeout_s}")


class ServerStartError(RuntimeError, PermanentError):
    """The server exited or never became ready; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class VLLMServer:
    """One vLLM OpenAI server process serving ``served_name``; a context manager."""

    def __init__(self, config: ServeConfig, served_name: str, log_path: str | os.PathLike):
        self.config, self.served_name, self.log_path = config, served_name, Path(log_path)
        self.port = config.port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [self.config.python, "-m", SERVER_MODULE, "--model", self.config.model or self.served_name,
                "--served-model-name", self.served_name, "--host", "127.0.0.1",
                "--port", str(self.port), *self.config.args]

    def start(self) -> str:
        """Start the server and wait until it serves; returns its base URL."""
        if not Path(self.config.python).exists():
            raise ServerStartError(f"serve.python: {self.config.python} does not exist (make vllm-setup "
                                   "creates .venv-vllm)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **self.config.env}
        with open(self.log_path, "ab") as out:
            # A session of its own, so stop() reaches the engine's worker processes too.
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        log.info("vllm server pid %d on %s for %s (log %s)", self.process.pid, self.base_url,
                 self.served_name, self.log_path)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"vllm server for {self.served_name} exited with code "
                                       f"{self.process.returncode} before it was ready; its log "
                                       f"{self.log_path} ends:\n{_log_tail(self.log_path)}")
            if self.ready():
                return
            time.sleep(1.0)
        raise ServerStartError(f"vllm server for {self.served_name} not ready after "
                               f"{self.config.ready_timeout_s:.0f} s (serve.ready_timeout_s); its log "
                               f"{self.log_path} ends:\n{_log_tail(self.log_path)}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``; idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.info("vllm server for %s stopped", self.served_name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def serving(servers: list[VLLMServer]) -> Iterator[list[str]]:
    """Start ``servers`` one after the other (they share the machine's memory); stop them all at
    the end, also when a start fails."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(server).base_url for server in servers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.synthesis.vllm_server",
                                     description="Serve a model with vLLM from its own environment "
                                                 "until interrupted.")
    parser.add_argument("--python", required=True, help="interpreter of the vLLM environment")
    parser.add_argument("--model", required=True, help="folder or Hub id to load")
    parser.add_argument("--served-model-name", help="name clients use (default: --model)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--log", default="vllm-server.log")
    parser.add_argument("args", nargs="*", help="extra vLLM server arguments (after --)")
    ns = parser.parse_args(argv)
    config = ServeConfig(python=ns.python, model=ns.model, port=ns.port, args=ns.args)
    server = VLLMServer(config, ns.served_model_name or ns.model, ns.log)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(f"serving {server.served_name} at {server.base_url} (pid {server.process.pid}); "
              "Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server.process.poll() is None:
                time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
