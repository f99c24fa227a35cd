"""The parent side of the training child: start it, read its events, send it commands, end its process tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from elite_core import protocol
from elite_core.config import RunConfig

CHILD_LOG = "child.log"
TERMINAL_EVENTS = (protocol.Finished, protocol.Error)


def prepare_run_dir(config: RunConfig) -> Path:
    """Create the run directory and write its config; raises OSError with the path when it cannot."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    return run_dir


class TrainingProcess:
    """One running training child. `events()` is a blocking generator: run it in a worker thread."""

    def __init__(self, run_dir: Path, process: subprocess.Popen, event_stream):
        self.run_dir = run_dir
        self.process = process
        self._events = event_stream

    @classmethod
    def start(cls, config: RunConfig, resume: bool = False, probe_steps: int = 0) -> "TrainingProcess":
        run_dir = prepare_run_dir(config)
        return cls.spawn(run_dir, resume=resume, probe_steps=probe_steps)

    @classmethod
    def spawn(cls, run_dir: Path, resume: bool = False, probe_steps: int = 0,
              dataset_dir: Path | None = None) -> "TrainingProcess":
        read_fd, write_fd = os.pipe()
        command = [sys.executable, "-m", "elite_core.child", str(run_dir), "--event-fd", str(write_fd)]
        if resume:
            command.append("--resume")
        if probe_steps:
            command += ["--probe-steps", str(probe_steps)]
        if dataset_dir is not None:
            command += ["--dataset-dir", str(dataset_dir)]
        env = dict(os.environ)
        # Long runs with varying shapes fragment the default CUDA allocator.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log = open(Path(run_dir) / CHILD_LOG, "ab")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=env,
                # Its own session: an SSH drop's SIGHUP or a Ctrl+C in the terminal reaches the UI, not the training.
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
            log.close()
        return cls(Path(run_dir), process, os.fdopen(read_fd, "r", encoding="utf-8"))

    def events(self) -> Iterator[protocol.Event]:
        """Every event until the child exits; a child that dies without saying why yields an Error of kind 'crash'."""
        ended = False
        for line in self._events:
            line = line.strip()
            if not line:
                continue
            try:
                event = protocol.decode_event(line)
            except protocol.ProtocolError as exc:
                yield protocol.Warning(message=f"unreadable event from the training process: {exc}")
                continue
            ended = ended or isinstance(event, TERMINAL_EVENTS)
            yield event
        self._events.close()
        code = self.process.wait()
        if not ended:
            yield protocol.Error(
                message=f"the training process exited with code {code} without reporting an error",
                traceback=self.log_tail(),
                kind="crash",
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.run_dir / CHILD_LOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send(self, command) -> bool:
        """Send a command; False when the child no longer listens."""
        if self.process.stdin is None or self.process.poll() is not None:
            return False
        try:
            self.process.stdin.write((protocol.encode(command) + "\n").encode("utf-8"))
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def checkpoint_now(self) -> bool:
        return self.send(protocol.CheckpointNow())

    def stop(self) -> bool:
        return self.send(protocol.Stop(checkpoint=True))

    def is_alive(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """End the child and everything it started (tokenizer workers, compile workers)."""
        import psutil

        try:
            parent = psutil.Process(self.process.pid)
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in [*children, parent]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs([*children, parent], timeout=5)
