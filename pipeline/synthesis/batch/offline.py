"""vLLM's offline batch engine behind the same calls as the OpenAI Batch API.

A teacher with ``serve`` and ``mode: batch`` needs no server: each job's JSONL file (the same
file the Batch API would get) is run by ``vllm run-batch`` (module
``vllm.entrypoints.launchers.run_batch``) from the vLLM environment, with the ``serve`` block's
model, arguments and environment, serving the model under ``teacher.model``. Its one output file
holds answers and per-line errors alike (``response.status_code``), which the runner reads the
same way.

"Upload" is the local path, a "batch" is one engine process: ``validating`` while it waits for
the engine slot (one engine per model and interpreter in this process: they would share the
accelerator), ``in_progress`` with the engine's own progress line, ``completed`` once the output
is in place (the engine writes ``.partial``, a shell ``mv`` renames it when it exits 0, so a
killed engine never leaves a half file that looks done), ``failed`` with the end of its log
otherwise. The engine runs in its own session, so it survives a killed flow; a re-run finds it
by its command line in ``/proc`` and waits for it rather than starting a second one.

Hand-rolled rather than a library: a subprocess, a pid file and ``/proc`` are all it takes, and
vLLM itself lives in an environment this project must not import.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline.synthesis.batch.api import RemoteBatch
from pipeline.synthesis.teachers.base import TeacherConfig, TeacherSetupError

RUN_BATCH_MODULE = "vllm.entrypoints.launchers.run_batch"
_PROGRESS = re.compile(rb"Running batch:\s+\d+% Completed \|\s*(\d+)/(\d+)")
_LOG_TAIL = 25
_slots: dict[tuple[str, str], str] = {}  # (python, model) -> uid of the engine running it
_slots_lock = threading.Lock()


def preflight_offline(config: TeacherConfig, key_prefix: str = "teacher") -> None:
    """Before any work: the vLLM interpreter exists."""
    if not Path(config.serve.python).exists():
        raise TeacherSetupError(f"{key_prefix}.serve.python", f"{config.serve.python} does not exist "
                                "(make vllm-setup creates .venv-vllm)")


def _alive(pid: int, uid: str) -> bool:
    """Whether ``pid`` is a live process whose command line names job ``uid`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return uid.encode() in cmdline and ") Z " not in stat


class OfflineBatchAPI:
    """See the module docstring."""

    name = "vllm-offline"
    endpoint = "vllm-offline"
    max_poll_s = 2.0  # a look is a stat of local files: no need to back off far

    def __init__(self, config: TeacherConfig, work_dir: Path):
        self.config, self.serve = config, config.serve
        self.work_dir = Path(work_dir)
        self._procs: dict[str, subprocess.Popen] = {}
        self._slot = (self.serve.python, self.serve.model or config.model)

    # -- paths -------------------------------------------------------------------------------

    def _paths(self, uid: str) -> dict[str, Path]:
        base = self.work_dir / uid
        return {"input": self.work_dir / f"{uid}.input.jsonl", "output": Path(f"{base}.engine.jsonl"),
                "partial": Path(f"{base}.engine.jsonl.partial"), "pid": Path(f"{base}.pid"),
                "log": Path(f"{base}.engine.log"), "cancelled": Path(f"{base}.cancelled")}

    @staticmethod
    def _uid(batch_id: str) -> str:
        return batch_id.removeprefix("vllm-offline-")

    # -- the Batch API's calls ---------------------------------------------------------------

    def upload(self, path: Path, filename: str) -> str:
        return str(Path(path).resolve())

    def find_file(self, filename: str) -> str | None:
        return None  # "uploading" is free: the path is the file

    def create(self, file_id: str, metadata: dict[str, str], completion_window: str) -> RemoteBatch:
        uid = metadata["avar_job"]
        return self._status(uid, file_id, start=True)

    def find_batch(self, job: str) -> RemoteBatch | None:
        paths = self._paths(job)
        if paths["output"].exists() or paths["pid"].exists():
            return self._status(job, str(paths["input"].resolve()), start=False)
        return None

    def retrieve(self, batch_id: str) -> RemoteBatch:
        uid = self._uid(batch_id)
        return self._status(uid, str(self._paths(uid)["input"].resolve()), start=True)

    def cancel(self, batch_id: str) -> RemoteBatch:
        uid = self._uid(batch_id)
        paths = self._paths(uid)
        paths["cancelled"].touch()
        pid = self._pid(uid)
        if pid is not None and _alive(pid, uid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        return self._status(uid, str(paths["input"].resolve()), start=False)

    def download(self, file_id: str, dest: Path) -> Path:
        return Path(file_id)  # already on this disk

    def list_batches(self, limit: int) -> Iterator[RemoteBatch]:
        return iter(())  # nothing is held elsewhere: a lost state loses only local work

    def close(self) -> None:
        for uid, proc in list(self._procs.items()):
            if proc.poll() is not None:
                self._release(uid)

    # -- engine processes --------------------------------------------------------------------

    def _pid(self, uid: str) -> int | None:
        try:
            return int(self._paths(uid)["pid"].read_text())
        except (OSError, ValueError):
            return None

    def _status(self, uid: str, input_path: str, start: bool) -> RemoteBatch:
        paths = self._paths(uid)
        batch = RemoteBatch(id=f"vllm-offline-{uid}", status="validating", input_file_id=input_path)
        proc = self._procs.get(uid)
        running = proc.poll() is None if proc is not None else self._running(uid)
        if running:
            self._claim(uid, force=True)  # an engine left by a killed flow holds the slot too
            batch.status = "in_progress"
            batch.completed, batch.total = self._progress(paths["log"])
            return batch
        self._release(uid)
        if paths["output"].exists():
            batch.status, batch.output_file_id = "completed", str(paths["output"])
        elif paths["cancelled"].exists():
            batch.status = "cancelled"
        elif paths["pid"].exists():  # started, and gone without its output
            batch.status = "failed"
            batch.errors = [("engine_failed", (f"vllm run-batch exited without output; its log "
                                              f"{paths['log']} ends:\n{_tail(paths['log'])}"))]
        elif start and self._claim(uid):
            self._start(uid, input_path)
            batch.status = "in_progress"
        return batch

    def _running(self, uid: str) -> bool:
        pid = self._pid(uid)
        return pid is not None and _alive(pid, uid)

    def _claim(self, uid: str, force: bool = False) -> bool:
        with _slots_lock:
            holder = _slots.get(self._slot)
            if holder is not None and holder != uid and not force:
                return False
            _slots[self._slot] = uid
            return True

    def _release(self, uid: str) -> None:
        self._procs.pop(uid, None)
        with _slots_lock:
            if _slots.get(self._slot) == uid:
                del _slots[self._slot]

    def _start(self, uid: str, input_path: str) -> None:
        paths = self._paths(uid)
        paths["partial"].unlink(missing_ok=True)
        engine = [self.serve.python, "-m", RUN_BATCH_MODULE, "-i", input_path, "-o", str(paths["partial"]),
                  "--model", self.serve.model or self.config.model,
                  "--served-model-name", self.config.model, *self.serve.args]
        # the rename runs only when the engine succeeded: an output file in place is a whole one
        command = ["/bin/sh", "-c", 'out="$1"; shift; "$@" && mv "$out.partial" "$out"', "sh",
                   str(paths["output"]), *engine]
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **self.serve.env}
        with open(paths["log"], "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self._procs[uid] = proc
        paths["pid"].write_text(str(proc.pid))

    @staticmethod
    def _progress(log: Path) -> tuple[int, int]:
        try:
            data = log.read_bytes()[-65536:]
        except OSError:
            return 0, 0
        found = _PROGRESS.findall(data)
        return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-_LOG_TAIL:])
    except OSError:
        return "(no log)"
