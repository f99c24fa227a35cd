"""Data-parallel training over 1..N processes: who this process is, how the run is launched, what the ranks share.

One code path: with one process every helper here is a no-op and the child runs as it always did. With N processes a
launcher (torchrun, or DeepSpeed's launcher where deepspeed is installed) starts N copies of `python -m elite_core.child`;
each reads its rank from the launcher's environment, trains on a disjoint slice of every global batch, and DDP averages
the gradients. Only rank 0 talks to the parent (event pipe, events.jsonl, checkpoints, report); a rank that fails
reports itself, by rank, on the same pipe.

torch is imported inside the functions that need it: the runner (and through it the UI) imports this module to build
the launch command, and must not pay for torch at start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from elite_core import protocol

LAUNCH_FILE = "launch.json"
RANK_FAILURES_DIR = "rank-failures"
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
LAUNCHERS = ("auto", "torchrun", "deepspeed")
PIPE_BUF_BYTES = 4096
"""Writes up to this size to a pipe are atomic (POSIX PIPE_BUF on Linux): two ranks' lines never interleave."""
FAULT_FAIL_RANK = "ELITE_FAULT_FAIL_RANK"
FAULT_FAIL_STEP = "ELITE_FAULT_FAIL_STEP"


class LaunchError(ValueError):
    """The launch settings cannot work (a launcher that is not installed, a multi-node run without an address)."""


# ---------------------------------------------------------------------------------------------------------------------
# Who this process is (from the launcher's environment, no torch needed)


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def rank_info(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Rank and world size as torchrun and DeepSpeed's launcher set them (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    env = os.environ if environ is None else environ

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    world = max(1, number("WORLD_SIZE", 1))
    local_world = max(1, number("LOCAL_WORLD_SIZE", world))
    return RankInfo(rank=number("RANK", 0), world_size=world, local_rank=number("LOCAL_RANK", 0),
                    local_world_size=local_world)


# ---------------------------------------------------------------------------------------------------------------------
# How the run is launched


@dataclass(frozen=True)
class LaunchSettings:
    """What the wizard chose for a run, stored as RUN_DIR/launch.json so a resumed or stepped-down run relaunches the
    same way. Absent file: one process."""

    nproc: int = 1
    """Processes (GPUs) per node."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    hostfile: str = ""
    """DeepSpeed's hostfile ("host slots=N" a line): with it, DeepSpeed starts every node from this one over ssh."""
    launcher: str = "auto"
    """"auto" (DeepSpeed's launcher for ZeRO runs where deepspeed is installed, torchrun otherwise), "torchrun", "deepspeed"."""

    def __post_init__(self) -> None:
        problems = []
        if self.nproc < 1:
            problems.append("nproc: at least 1 process per node")
        if self.nnodes < 1:
            problems.append("nnodes: at least 1 node")
        if not 0 <= self.node_rank < self.nnodes:
            problems.append(f"node_rank: from 0 to {self.nnodes - 1}")
        if not 1 <= self.master_port <= 65535:
            problems.append("master_port: 1..65535")
        if self.launcher not in LAUNCHERS:
            problems.append(f"launcher: one of {', '.join(LAUNCHERS)}")
        if problems:
            raise LaunchError("; ".join(problems))

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def save_launch(run_dir: str | Path, settings: LaunchSettings) -> Path:
    path = Path(run_dir) / LAUNCH_FILE
    path.write_text(json.dumps(dataclasses.asdict(settings), indent=1), encoding="utf-8")
    return path


def read_launch(run_dir: str | Path) -> LaunchSettings:
    path = Path(run_dir) / LAUNCH_FILE
    if not path.is_file():
        return LaunchSettings()
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(LaunchSettings)}
    return LaunchSettings(**{key: value for key, value in data.items() if key in known})


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def choose_launcher(config, requested: str = "auto") -> str:
    """ZeRO needs DeepSpeed; plain data parallelism runs under torchrun. DeepSpeed also runs under torchrun, so a
    ZeRO run without the deepspeed launcher installed only fails later, in the engine, if deepspeed itself is missing."""
    if requested == "deepspeed" and not deepspeed_installed():
        raise LaunchError("the deepspeed launcher needs deepspeed: pip install deepspeed (or choose torchrun)")
    if requested != "auto":
        return requested
    return "deepspeed" if config.deepspeed != "off" and deepspeed_installed() else "torchrun"


def launch_command(config, run_dir: str | Path, nproc: int, nnodes: int = 1, node_rank: int = 0,
                   master_addr: str = DEFAULT_MASTER_ADDR, master_port: int = DEFAULT_MASTER_PORT,
                   hostfile: str | Path | None = None, launcher: str = "auto",
                   child_args: Sequence[str] = ()) -> list[str]:
    """The argv that trains `run_dir` on nproc processes per node: the plain child for one process, otherwise
    torchrun (`python -m torch.distributed.run`) or DeepSpeed's launcher, each running `-m elite_core.child`.

    torchrun is run on every node with its node_rank; DeepSpeed with a hostfile is run on node 0 only and starts the
    other nodes itself over ssh (pdsh). The interpreter is this one, so the launcher and the ranks see the same packages.
    """
    settings = LaunchSettings(nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                              master_port=master_port, hostfile=str(hostfile or ""), launcher=launcher)
    child = [str(Path(run_dir)), *child_args]
    if not settings.is_distributed:
        return [sys.executable, "-m", "elite_core.child", *child]
    chosen = choose_launcher(config, settings.launcher)
    if chosen == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
        if nnodes > 1:
            if not settings.hostfile:
                raise LaunchError("a multi-node DeepSpeed run needs a hostfile: one 'host slots=N' line per machine")
            command += ["--num_nodes", str(nnodes), "--hostfile", settings.hostfile, "--master_addr", master_addr]
        # --no_local_rank: the child reads LOCAL_RANK from the environment and takes no --local_rank argument.
        command += ["--master_port", str(master_port), "--no_local_rank", "--module", "elite_core.child"]
        return command + child
    if settings.hostfile:
        raise LaunchError("a hostfile is for DeepSpeed's launcher; with torchrun run the command on every node with "
                          "its node rank")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]
    if nnodes == 1 and master_addr in (DEFAULT_MASTER_ADDR, "localhost"):
        # One machine: a local rendezvous on a free port, so two runs side by side never collide on a port.
        command.append("--standalone")
    else:
        command += ["--node_rank", str(node_rank), "--master_addr", master_addr, "--master_port", str(master_port)]
    return command + ["--module", "elite_core.child", *child]


def node_commands(config, run_dir: str | Path, settings: LaunchSettings) -> list[list[str]]:
    """One command per machine, for the wizard to show: what to run on node 0, 1, ... (DeepSpeed with a hostfile: one)."""
    if settings.nnodes > 1 and choose_launcher(config, settings.launcher) == "deepspeed":
        return [launch_command(config, run_dir, **_launch_kwargs(settings))]
    return [launch_command(config, run_dir, **_launch_kwargs(dataclasses.replace(settings, node_rank=node)))
            for node in range(settings.nnodes)]


def _launch_kwargs(settings: LaunchSettings) -> dict[str, Any]:
    return {"nproc": settings.nproc, "nnodes": settings.nnodes, "node_rank": settings.node_rank,
            "master_addr": settings.master_addr, "master_port": settings.master_port,
            "hostfile": settings.hostfile or None, "launcher": settings.launcher}


def spawn_command(run_dir: str | Path, child_options: Sequence[str]) -> list[str]:
    """The argv the runner starts for a run: the plain child, or the launcher when RUN_DIR/launch.json asks for more
    than one process.

    A launcher starts its ranks with close_fds, so the runner's event pipe does not reach rank 0 by its number. The pipe
    is named instead (`--event-pipe FD:DEV:INODE`) and rank 0 opens it again through /proc (open_event_pipe).
    """
    from elite_core.config import RunConfig

    run_dir = Path(run_dir)
    settings = read_launch(run_dir)
    options = list(child_options)
    if not settings.is_distributed:
        return [sys.executable, "-m", "elite_core.child", str(run_dir), *options]
    if "--event-fd" in options:
        at = options.index("--event-fd")
        fd = int(options[at + 1])
        options[at:at + 2] = ["--event-pipe", pipe_name(fd)]
    config = RunConfig.load(run_dir / "config.yaml")
    return launch_command(config, run_dir, child_args=options, **_launch_kwargs(settings))


# ---------------------------------------------------------------------------------------------------------------------
# The event pipe across a launcher


def pipe_name(fd: int) -> str:
    info = os.fstat(fd)
    return f"{fd}:{info.st_dev}:{info.st_ino}"


def open_event_pipe(name: str) -> int | None:
    """A write end of the runner's event pipe, found by identity among this process's ancestors (torchrun's agent
    holds it) or, failing that, any process of this machine (DeepSpeed over pdsh starts ranks outside our tree).
    None when no process holds it any more (the parent is gone): events.jsonl still records everything."""
    try:
        fd_text, dev_text, ino_text = name.split(":")
        fd, identity = int(fd_text), (int(dev_text), int(ino_text))
    except ValueError:
        return None

    def candidates() -> Iterator[int]:
        yield os.getpid()
        pid = os.getpid()
        while pid > 1:
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                break
            yield pid
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                yield int(entry)

    seen = set()
    for pid in candidates():
        if pid in seen:
            continue
        seen.add(pid)
        path = f"/proc/{pid}/fd/{fd}"
        try:
            info = os.stat(path)
            if (info.st_dev, info.st_ino) != identity:
                continue
            # Non-blocking open: a pipe whose reader is gone fails at once (ENXIO) instead of hanging.
            opened = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        flags = fcntl.fcntl(opened, fcntl.F_GETFL)
        fcntl.fcntl(opened, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return opened
    return None


def event_fd_for(rank: RankInfo, event_fd: int | None, event_pipe: str | None) -> int | None:
    """The event pipe this rank writes to: only rank 0 reports."""
    if not rank.is_main:
        return None
    if event_pipe:
        return open_event_pipe(event_pipe)
    return event_fd


class RankLog:
    """The event sink of ranks other than 0: nothing reaches the parent or events.jsonl; warnings and errors go to the
    rank's stderr, which the launcher collects into child.log."""

    def __init__(self, rank: RankInfo):
        self.rank = rank

    def __call__(self, event) -> None:
        if isinstance(event, (protocol.Warning, protocol.Error)):
            print(f"{self.rank.label}: {event.type}: {event.message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def with_rank(error: protocol.Error, rank: RankInfo) -> protocol.Error:
    if not rank.is_distributed:
        return error
    return dataclasses.replace(error, message=f"{rank.label}: {error.message}")


def _pipe_line(error: protocol.Error) -> str:
    """The Error as one line short enough to be a single atomic pipe write beside rank 0's lines (traceback trimmed
    from the front: its last frames say where the rank failed)."""
    traceback_text = error.traceback
    while True:
        line = protocol.encode(dataclasses.replace(error, traceback=traceback_text)) + "\n"
        if len(line.encode("utf-8")) <= PIPE_BUF_BYTES or not traceback_text:
            return line
        traceback_text = traceback_text[len(traceback_text) // 2:]


def clear_rank_failures(run_dir: str | Path) -> None:
    root = Path(run_dir) / RANK_FAILURES_DIR
    if root.is_dir():
        for mark in root.iterdir():
            mark.unlink(missing_ok=True)


FIRST_FAILURE_FILE = "first.json"


def first_failure(run_dir: str | Path) -> protocol.Error | None:
    """The failure that ended the last multi-rank run, as its rank reported it; None when no rank failed."""
    try:
        return protocol.decode_event((Path(run_dir) / RANK_FAILURES_DIR / FIRST_FAILURE_FILE).read_text("utf-8"))
    except (OSError, protocol.ProtocolError):
        return None


def _claim_first_failure(run_dir: Path, error: protocol.Error) -> bool:
    """True for the first rank to fail (an exclusive create decides); later failures are echoes of it."""
    root = run_dir / RANK_FAILURES_DIR
    root.mkdir(exist_ok=True)
    try:
        fd = os.open(root / FIRST_FAILURE_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as mark:
        mark.write(protocol.encode(error))
    return True


def report_failure(run_dir: str | Path, error: protocol.Error, rank: RankInfo, sink: Callable[[object], None],
                   event_pipe: str | None = None) -> None:
    """Every failure reaches the parent once, named by its rank.

    Only the first rank to fail reports: when one rank dies, the others fail too (a closed connection, a barrier that
    never completes), and those echoes go to child.log only. Rank 0 reports through its sink; any other rank writes its
    Error line itself, to events.jsonl and the pipe, because rank 0 may be stuck in a collective and never report it.
    """
    error = with_rank(error, rank)
    run_dir = Path(run_dir)
    if not rank.is_distributed:
        sink(error)
        return
    if not _claim_first_failure(run_dir, error):
        print(f"{rank.label}, after another rank failed: {error.message}", file=sys.stderr, flush=True)
        return
    sink(error)
    if rank.is_main:
        return
    line = _pipe_line(error)
    from elite_core.child import EVENTS_FILE

    # One O_APPEND write of a whole line: it lands intact beside rank 0's lines.
    with open(run_dir / EVENTS_FILE, "a", encoding="utf-8") as events:
        events.write(line)
    fd = open_event_pipe(event_pipe) if event_pipe else None
    if fd is not None:
        try:
            os.write(fd, line.encode("utf-8"))
        except OSError:
            pass
        finally:
            os.close(fd)


def inject_rank_failure(rank: RankInfo, step: int) -> None:
    """Fault injection for tests: ELITE_FAULT_FAIL_RANK=K (and ELITE_FAULT_FAIL_STEP=S, default 1) makes rank K raise
    when it starts optimizer step S."""
    wanted = os.environ.get(FAULT_FAIL_RANK)
    if wanted is None or int(wanted) != rank.rank:
        return
    if step == int(os.environ.get(FAULT_FAIL_STEP, "1")):
        raise RuntimeError(f"injected failure on rank {rank.rank} at step {step}")


# ---------------------------------------------------------------------------------------------------------------------
# What the ranks share (torch)


def init_process_group(device: str, rank: RankInfo | None = None) -> RankInfo:
    """Join the launcher's process group: NCCL on GPUs (each rank on its local GPU), gloo on CPUs. One process: nothing."""
    rank = rank or rank_info()
    if not rank.is_distributed:
        return rank
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return rank
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if rank.local_rank >= gpus:
            # What CUDA would say is "invalid device ordinal", from inside set_device.
            raise RuntimeError(f"local rank {rank.local_rank} has no GPU: this node has {gpus} "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                               f"start at most {gpus} process{'es' if gpus != 1 else ''} per node")
        torch.cuda.set_device(rank.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", rank.local_rank))
    else:
        dist.init_process_group("gloo")
    return rank


def join_single_process_group() -> None:
    """A process group of one, for DeepSpeed on a single GPU without a launcher (it needs torch.distributed)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as probe:  # a free port on this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    dist.init_process_group("nccl", rank=0, world_size=1)


def shutdown() -> None:
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rank: RankInfo) -> None:
    if rank.is_distributed:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first(rank: RankInfo):
    """Rank 0 runs the block first (it writes shared files: the dataset, the plan, the hardware cache), then the first
    rank of every other node (a machine without a shared disk builds its own copy), then the rest, who reuse them."""
    if not rank.is_distributed:
        yield
        return
    local_main = rank.local_rank == 0
    if not rank.is_main:
        barrier(rank)
        if not local_main:
            barrier(rank)
    yield
    if rank.is_main:
        barrier(rank)
        barrier(rank)
    elif local_main:
        barrier(rank)


def rank_slice(indices: Sequence[int], rank: RankInfo) -> list[int]:
    """This rank's part of a global micro-batch: rank r takes the r-th equal slice, so the ranks' windows are disjoint
    and together are exactly the windows one process would take."""
    per_rank = len(indices) // rank.world_size
    return list(indices[rank.rank * per_rank:(rank.rank + 1) * per_rank])


def any_rank(rank: RankInfo, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on every rank when it is true on any: a stop or checkpoint asked of rank 0 (commands) or of any
    rank (signals) is acted on by all of them at the same step."""
    if not rank.is_distributed:
        return tuple(flags)
    import torch
    import torch.distributed as dist

    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=_collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def mean_across_ranks(value, rank: RankInfo):
    """A scalar tensor averaged over the ranks (the loss of the global batch)."""
    if not rank.is_distributed:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / rank.world_size


def sum_across_ranks(count: int, rank: RankInfo) -> int:
    """An integer summed over the ranks (tokens of the global batch)."""
    if not rank.is_distributed:
        return count
    import torch
    import torch.distributed as dist

    total = torch.tensor([count], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def _collective_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class ParallelLoss:
    """The training forward: the loss of a micro-batch, through DDP (or DeepSpeed ZeRO) when there are several ranks.

    DDP must see the forward (it arms its gradient hooks there), so the loss function runs inside a module that DDP
    wraps. Only trainable parameters (the adapters) get gradient buckets; every one of them is used each step, so
    find_unused_parameters stays off. Between accumulation micro-batches the forward runs under no_sync, which keeps
    the backward that follows local: the all-reduce runs once per optimizer step, on the summed gradients.

    With config.deepspeed "zero2" / "zero3" on several GPUs the module goes to deepspeed.initialize instead, with our
    optimizer and LR schedule, and the step is deepspeed_step. That path needs GPUs and deepspeed: it is not exercised
    by the CPU tests.
    """

    def __init__(self, model, loss_fn: Callable, rank: RankInfo, device: str, config=None, optimizer=None,
                 scheduler=None, compute_dtype: str = "bf16"):
        self.rank = rank
        self.model = model
        self.loss_fn = loss_fn
        self.ddp = None
        self.deepspeed = None
        if config is not None and config.deepspeed != "off" and device == "cuda":
            # ZeRO also on one GPU: with offload it moves the optimizer state to CPU RAM
            import deepspeed

            if not rank.is_distributed:
                join_single_process_group()
            self.deepspeed, _, _, _ = deepspeed.initialize(
                model=_LossModule(model, loss_fn), optimizer=optimizer, lr_scheduler=scheduler,
                config=deepspeed_config(config, rank.world_size, compute_dtype,
                                        sum(p.numel() for p in model.parameters() if p.requires_grad),
                                        largest_layer_elements(model)))
            import torch

            torch.cuda.empty_cache()  # ZeRO-3 moved the weights: give their cached blocks back
            return
        if not rank.is_distributed:
            return
        module = _LossModule(model, loss_fn)
        import torch
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if device == "cuda" else None
        # broadcast_buffers off: the buffers (RoPE tables) are the same on every rank and never trained.
        self.ddp = DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=False,
                                           broadcast_buffers=False)

    def __call__(self, input_ids, labels):
        if self.ddp is None:
            return self.loss_fn(self.model, input_ids, labels)
        return self.ddp(input_ids, labels)

    def sync_gradients(self, last_micro_batch: bool):
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def deepspeed_step(self, batches: Iterator[tuple[Any, Any]], grad_accum: int,
                       forward_context: Callable[[], Any] = contextlib.nullcontext) -> tuple[float, float, int]:
        """One optimizer step under ZeRO: DeepSpeed scales each micro-batch's loss by 1/grad_accum, reduces and
        shards the gradients, clips, and steps the optimizer and the LR schedule at the accumulation boundary.
        forward_context is the engine's (autocast, checkpoint offload), as around the plain engine's forward."""
        import torch

        engine = self.deepspeed
        loss_sum = torch.zeros((), device=engine.device)
        tokens = 0
        for input_ids, labels in batches:
            tokens += input_ids.numel()
            with forward_context():
                loss = engine(input_ids, labels)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float() / grad_accum
        loss_sum = mean_across_ranks(loss_sum, self.rank)
        tokens = sum_across_ranks(tokens, self.rank)
        grad_norm = engine.get_global_grad_norm()
        return float(loss_sum.item()), float(grad_norm or 0.0), tokens


def largest_layer_elements(model) -> int:
    """Parameters of the largest decoder layer (a module list's element whose name ends in a number), 0 if none."""
    sizes = [sum(p.numel() for p in module.parameters()) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1].isdigit()]
    return max(sizes, default=0)


def _LossModule(model, loss_fn):
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels):
            return loss_fn(self.model, input_ids, labels)

    return LossModule()


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO


def deepspeed_config(config, world_size: int, compute_dtype: str = "bf16",
                     trainable_elements: int = 0, layer_elements: int = 0) -> dict[str, Any]:
    """The DeepSpeed JSON config for a run: ZeRO stage and CPU offload from config.deepspeed, micro-batch and
    accumulation per GPU, the global batch, clipping, precision. The optimizer is always ours (torch AdamW over the
    adapters, passed to deepspeed.initialize): with offload DeepSpeed steps it on the CPU over its fp32 partitions,
    which needs no compiled op (DeepSpeed's CPU Adam is faster on billions of parameters, but LoRA has millions)."""
    from elite_core.config import zero_offload, zero_stage
    from elite_core.memory_model import ZERO_BUCKET_ELEMENTS

    stage = zero_stage(config.deepspeed)
    if not stage:
        raise LaunchError(f"deepspeed is {config.deepspeed!r}: choose a ZeRO stage for a DeepSpeed config")
    if compute_dtype not in ("bf16", "fp16", "fp32"):
        raise LaunchError(f"compute dtype {compute_dtype!r}: one of bf16, fp16, fp32")
    offload = zero_offload(config.deepspeed)
    # DeepSpeed allocates its reduce buckets at full size (two with overlap_comm): 500M elements would be 1.9 GB of
    # bf16 for a few million adapter parameters, so a bucket holds all of them and no more.
    reduce_bucket_elements = min(ZERO_BUCKET_ELEMENTS, trainable_elements or ZERO_BUCKET_ELEMENTS)
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": reduce_bucket_elements,
    }
    if stage == 2:
        zero["allgather_bucket_size"] = reduce_bucket_elements
    else:
        zero.update({
            # About one decoder layer prefetched and two live, as memory_model counts (DeepSpeed's defaults keep up
            # to 1e9 parameters gathered: all of a 1.5B model, measured -23 % under the prediction with offload).
            "stage3_prefetch_bucket_size": layer_elements or reduce_bucket_elements,
            "stage3_max_live_parameters": 2 * layer_elements if layer_elements else 1_000_000_000,
            "stage3_param_persistence_threshold": 100_000,
            # The adapter is saved whole, not as ZeRO-3 shards.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    result: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch * config.grad_accum * world_size,
        "gradient_clipping": config.max_grad_norm,
        "bf16": {"enabled": compute_dtype == "bf16"},
        "fp16": {"enabled": compute_dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    result["zero_allow_untested_optimizer"] = True
    result["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW also steps the offloaded partitions
    return result
