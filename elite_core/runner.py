"""The parent side of the training child: start it, read its events, send it commands, end its process tree."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

from elite_core import protocol
from elite_core.child import CHILD_PID_FILE, EVENTS_FILE
from elite_core.config import RunConfig
from elite_core.distributed import spawn_command

CHILD_LOG = "child.log"
CONTROLLER_LOCK = "controller.lock"
TERMINAL_EVENTS = (protocol.Finished, protocol.Error)
FOLLOW_POLL_S = 0.2


class RunLockedError(RuntimeError):
    """Another live elite-tui process controls this run."""


def _process_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ControllerLock:
    """One controller (wizard, headless runner or attach) per run. The lock file holds the controller's pid; a lock
    whose process is gone is stale and is taken over, not obeyed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / CONTROLLER_LOCK

    def holder(self) -> int | None:
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid != os.getpid() and _process_alive(pid) else None

    def acquire(self) -> None:
        holder = self.holder()
        if holder is not None:
            raise RunLockedError(f"another elite-tui (pid {holder}) controls {self.path.parent}; close it first")
        staging = self.path.with_suffix(f".{os.getpid()}")
        staging.write_text(str(os.getpid()))
        os.replace(staging, self.path)

    def release(self) -> None:
        try:
            if int(self.path.read_text().strip()) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def live_child_pid(run_dir: Path) -> int | None:
    """The pid of the training child of this run if it is still running (checked by its command line, so a reused
    pid is not mistaken for it)."""
    import psutil

    run_dir = Path(run_dir).resolve()
    try:
        pid = int((run_dir / CHILD_PID_FILE).read_text().strip())
        command = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if "elite_core.child" in command and str(run_dir) in command and _process_alive(pid):
        return pid
    return None


def claim_run_dir(run_dir: Path) -> None:
    """Take the run directory's controller lock, or raise RunLockedError when another live elite-tui holds it or its
    child still trains: before anything is written there, so that a refused command changes nothing."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ControllerLock(run_dir).acquire()
    if live_child_pid(run_dir) is not None:
        raise RunLockedError(f"{run_dir} is still training: attach to it (elite-tui attach {run_dir})")


def prepare_run_dir(config: RunConfig) -> Path:
    """Claim the run directory (claim_run_dir) and write its config; raises OSError with the path when it cannot."""
    run_dir = config.run_dir
    claim_run_dir(run_dir)
    config.save(run_dir / "config.yaml")
    return run_dir


class TrainingProcess:
    """One running training child. `events()` is a blocking generator: run it in a worker thread."""

    def __init__(self, run_dir: Path, process: subprocess.Popen, event_stream, lock: ControllerLock):
        self.run_dir = run_dir
        self.process = process
        self._events = event_stream
        self._lock = lock

    @classmethod
    def start(cls, config: RunConfig, resume: bool = False, probe_steps: int = 0) -> "TrainingProcess":
        run_dir = prepare_run_dir(config)
        return cls.spawn(run_dir, resume=resume, probe_steps=probe_steps)

    @classmethod
    def spawn(cls, run_dir: Path, resume: bool = False, probe_steps: int = 0,
              dataset_dir: Path | None = None, child_args: Sequence[str] = ()) -> "TrainingProcess":
        """Start the child; child_args go on its command line as they are (the probe's options, elite_core.probe)."""
        run_dir = Path(run_dir).resolve()
        lock = ControllerLock(run_dir)
        lock.acquire()
        if live_child_pid(run_dir) is not None:
            lock.release()
            raise RunLockedError(f"{run_dir} is still training: attach to it (elite-tui attach {run_dir})")
        read_fd, write_fd = os.pipe()
        command = ["--event-fd", str(write_fd)]
        if resume:
            command.append("--resume")
        if probe_steps:
            command += ["--probe-steps", str(probe_steps)]
        if dataset_dir is not None:
            command += ["--dataset-dir", str(dataset_dir)]
        command += list(child_args)
        # The plain child, or torchrun / deepspeed when RUN_DIR/launch.json asks for several processes.
        command = spawn_command(run_dir, command)
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
        return cls(run_dir, process, os.fdopen(read_fd, "r", encoding="utf-8"), lock)

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
        self._lock.release()
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


class AttachedRun:
    """A run whose child was started by another controller that is gone (an SSH drop, a closed terminal).

    Events come from RUN_DIR/events.jsonl, the whole history first, then followed as the child appends; commands go to
    the child as signals (SIGUSR1: checkpoint now, SIGTERM: checkpoint and stop), which it handles like pipe commands.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self._lock = ControllerLock(self.run_dir)
        self._lock.acquire()
        self.pid = live_child_pid(self.run_dir)

    def events(self) -> Iterator[protocol.Event]:
        ended = False
        buffer = ""
        try:
            with open(self.run_dir / EVENTS_FILE, "r", encoding="utf-8", errors="replace") as stream:
                while True:
                    chunk = stream.read()
                    if not chunk:
                        # While the child lives, more may come: the history may end with an earlier session's end
                        # (a stop, a recovered out-of-memory error) that a resumed child is already past.
                        if self.is_alive():
                            time.sleep(FOLLOW_POLL_S)
                            continue
                        chunk = stream.read()  # lines written just before the child exited
                        if not chunk:
                            break
                    buffer += chunk
                    *lines, buffer = buffer.split("\n")
                    for line in lines:
                        try:
                            event = protocol.decode_event(line)
                        except protocol.ProtocolError:
                            continue
                        # A session's end counts until the next session starts (a resume, a restart).
                        ended = isinstance(event, TERMINAL_EVENTS) or (ended and not isinstance(event, protocol.Started))
                        yield event
        finally:
            self._lock.release()
        if not ended:
            yield protocol.Error(message="the training process is gone without reporting an end; resume the run",
                                 kind="crash")

    def _signal(self, signum: int) -> bool:
        if self.pid is None or not self.is_alive():
            return False
        os.kill(self.pid, signum)
        return True

    def checkpoint_now(self) -> bool:
        return self._signal(signal.SIGUSR1)

    def stop(self) -> bool:
        return self._signal(signal.SIGTERM)

    def is_alive(self) -> bool:
        return self.pid is not None and _process_alive(self.pid)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


_child_jobs: set["TrainingProcess"] = set()
"""The probe and sweep children run_child_job waits on now, for end_child_jobs."""


def end_child_jobs() -> None:
    """Kill every probe or sweep child this process waits on: the screen that wanted its result is closing, and the
    job's thread (which cannot be stopped) then returns at once instead of holding the exit for up to its timeout."""
    for process in list(_child_jobs):
        process.kill()


def run_child_job(config: RunConfig, job_dir: Path, dataset_dir: Path, child_args: Sequence[str], result_file: str,
                  *, what: str, oom_hint: str, failure: type[protocol.ChildJobFailed], timeout_s: float = 600.0,
                  on_event=None) -> Path:
    """Run one training child in job_dir (its config.yaml is written there) in the mode child_args ask for, until it
    finishes; return the path of the result file it wrote, or raise `failure` with a hint (out of memory, timeout,
    crash, another controller holding the directory)."""
    import threading

    from elite_core.hardware import PLANNING_PROFILE_FILE

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    config.save(job_dir / "config.yaml")
    planned_with = config.run_dir / PLANNING_PROFILE_FILE
    if planned_with.is_file():  # the job plans from the profile the run's pre-flight planned with
        shutil.copyfile(planned_with, job_dir / PLANNING_PROFILE_FILE)
    result_path = job_dir / result_file
    result_path.unlink(missing_ok=True)
    log_hint = f"see {job_dir / CHILD_LOG}"
    try:
        process = TrainingProcess.spawn(job_dir, dataset_dir=dataset_dir, child_args=child_args)
    except RunLockedError as exc:
        raise failure(str(exc), f"wait for the other {what} to end, or close the elite-tui that runs it") from exc
    timer = threading.Timer(timeout_s, process.kill)
    timer.daemon = True
    timer.start()
    finished = None
    _child_jobs.add(process)
    try:
        for event in process.events():
            if on_event is not None:
                on_event(event)
            if isinstance(event, protocol.Finished):
                finished = event
            elif isinstance(event, protocol.Error):
                if event.kind == "crash" and not timer.is_alive():
                    raise failure(f"the {what} took longer than {timeout_s:.0f} s and was stopped", log_hint, "timeout")
                raise failure(event.message, oom_hint if event.kind == "oom" else log_hint, event.kind)
    finally:
        _child_jobs.discard(process)
        timer.cancel()
        if process.is_alive():
            process.kill()
    if finished is None or not result_path.is_file():
        raise failure(f"the {what} ended without a result", log_hint)
    return result_path


def step_down(config: RunConfig) -> tuple[RunConfig, str] | None:
    """The next smaller setup after an out-of-memory error, and what changed; None when nothing smaller is left.

    First halve the micro-batch and double accumulation (same tokens per update), then a lower tier. The LoRA rank is
    kept when the tier drops, so the last checkpoint's adapter still loads.
    """
    from elite_core.tiers import tier_by_number

    if config.micro_batch > 1:
        from elite_core.planner import resolved_grad_accum

        accumulation = resolved_grad_accum(config)
        smaller = config.replace(micro_batch=config.micro_batch // 2, grad_accum=accumulation * 2)
        return smaller, (f"micro-batch {config.micro_batch} -> {smaller.micro_batch}, gradient accumulation "
                         f"{accumulation} -> {smaller.grad_accum} (same tokens per update)")
    if config.tier > 1:
        lower = tier_by_number(config.tier - 1)
        smaller = config.replace(tier=lower.number, context_tokens=lower.context_tokens, target_tokens=lower.target_tokens)
        return smaller, (f"tier {config.tier} -> {lower.number}: windows of {lower.total_tokens:,} tokens "
                         f"(LoRA rank kept at {config.lora_rank})")
    return None


class SupervisedRun:
    """A training run that recovers from running out of memory: on an OOM error it steps the config down, records why
    in events.jsonl, and resumes from the last checkpoint, up to MAX_RESTARTS times. Same interface as TrainingProcess."""

    MAX_RESTARTS = 6

    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = config
        self.current = TrainingProcess.start(config, resume=resume)
        self.run_dir = self.current.run_dir

    def events(self) -> Iterator[protocol.Event]:
        restarts = 0
        while True:
            oom = None
            for event in self.current.events():
                if isinstance(event, protocol.Error) and event.kind == "oom" and restarts < self.MAX_RESTARTS:
                    oom = event
                    continue
                yield event
            if oom is None:
                return
            change = step_down(self.config)
            if change is None:
                yield protocol.Error(message=f"{oom.message}; nothing smaller is left to try", traceback=oom.traceback,
                                     kind="oom")
                return
            self.config, what_changed = change
            self.config.save(self.run_dir / "config.yaml")
            notice = protocol.Warning(message=f"out of memory: {what_changed}; resuming from the last checkpoint")
            with open(self.run_dir / EVENTS_FILE, "a", encoding="utf-8") as log:
                log.write(protocol.encode(notice) + "\n")
            yield notice
            restarts += 1
            self.current = TrainingProcess.spawn(self.run_dir, resume=True)

    def checkpoint_now(self) -> bool:
        return self.current.checkpoint_now()

    def stop(self) -> bool:
        return self.current.stop()

    def is_alive(self) -> bool:
        return self.current.is_alive()

    def kill(self) -> None:
        self.current.kill()

    def wait(self, timeout: float | None = None) -> int:
        return self.current.wait(timeout)

    @property
    def process(self):
        return self.current.process
