"""The one place the UI calls the engine; imports stay inside the methods so the wizard starts without torch.

Tests pass a subclass to slow a call down (a real call that waits on an event), never a fake engine.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

_BUILD_LOCKS: dict[str, threading.Lock] = {}
_BUILD_LOCKS_GUARD = threading.Lock()


def is_loopback(address: str) -> bool:
    """True for an address only this machine reaches (localhost, 127.x, ::1): useless as a multi-node master."""
    import ipaddress

    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip()).is_loopback
    except ValueError:
        return False  # a host name: the other nodes resolve it


def process_limit(config: Any, profile: Any) -> int:
    """Training processes one machine can run: its GPUs, or on a CPU run (no GPU, or device cpu) its cores."""
    if profile is None:
        return 1
    if profile.for_device(config.device).has_gpu:
        return len(profile.gpus)
    return max(1, profile.cpu_cores)


def check_launch(config: Any, profile: Any, *, nproc: int, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: int = 29500, hostfile: str = "",
                 launcher: str = "auto") -> tuple[Any, dict[str, str]]:
    """The LaunchSettings for these choices, or None with every problem keyed by the LaunchSettings field it is about,
    or "deepspeed" for a ZeRO run this machine cannot start (the CLI names the flag, the wizard marks the field).
    `config.gpus` is not read: the caller sets it to the total."""
    from elite_core.config import zero_stage
    from elite_core.distributed import LAUNCHERS, LaunchError, LaunchSettings, deepspeed_installed, node_commands

    errors: dict[str, str] = {}
    gpus_here = len(profile.for_device(config.device).gpus) if profile is not None else 0  # device cpu: none
    if gpus_here and zero_stage(config.deepspeed) and not deepspeed_installed():
        # The engine imports deepspeed for ZeRO on a GPU (one GPU or several): say so now, not after the model loads.
        errors["deepspeed"] = "ZeRO needs DeepSpeed here: pip install deepspeed (or DeepSpeed off)"
    if nproc < 1:
        errors["nproc"] = "at least 1 process per node"
    elif gpus_here and nproc > gpus_here:
        errors["nproc"] = f"this machine has {gpus_here} GPU{'s' if gpus_here > 1 else ''}"
    if nnodes < 1:
        errors["nnodes"] = "at least 1 node"
    elif not 0 <= node_rank < nnodes:
        errors["node_rank"] = (f"node ranks are 0..{nnodes - 1} with {nnodes} nodes" if nnodes > 1
                               else "with one node the only node rank is 0")
    if not 1 <= master_port <= 65535:
        errors["master_port"] = "a port from 1 to 65535"
    if not master_addr.strip():
        errors["master_addr"] = "name node 0's address"
    elif nnodes > 1 and is_loopback(master_addr):
        errors["master_addr"] = "with several nodes: node 0's address that the other nodes can reach"
    if launcher not in LAUNCHERS:
        errors["launcher"] = f"one of {', '.join(LAUNCHERS)}"
    if hostfile and not Path(hostfile).expanduser().is_file():
        errors["hostfile"] = f"{hostfile} is not a file"
    if errors:
        return None, errors
    # The file checked is the file launched: "~" and a relative path would reach DeepSpeed's runner literally (it then
    # trains on this node alone), and a resume from another directory would miss it.
    hostfile = str(Path(hostfile).expanduser().resolve()) if hostfile else ""
    settings = LaunchSettings(nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr.strip(),
                              master_port=master_port, hostfile=hostfile, launcher=launcher)
    try:
        node_commands(config, config.run_dir, settings)
    except LaunchError as exc:
        return None, {"hostfile" if "hostfile" in str(exc) else "launcher": str(exc)}
    return settings, {}


def launch_commands(config: Any, settings: Any, run_dir: Path | None = None) -> list[list[str]]:
    """The argv to run on each node (DeepSpeed with a hostfile: node 0's alone), as the runner would start it."""
    from elite_core.distributed import node_commands

    return node_commands(config, run_dir if run_dir is not None else config.run_dir, settings)


class Engine:
    def profile_hardware(self, output_dir: str, progress: Callable[[str, float], None], use_cache: bool = True) -> Any:
        from elite_core.hardware import profile_hardware

        return profile_hardware(output_dir, use_cache=use_cache, progress=progress)

    def check_model_source(self, source: str) -> str | None:
        from elite_core.model_loading import check_model_source

        return check_model_source(source)

    def load_model_shape(self, source: str, trust_remote_code: bool = False) -> Any:
        from elite_core.model_loading import load_model_shape

        return load_model_shape(source, trust_remote_code=trust_remote_code)

    def plan_tiers(self, shape: Any, profile: Any, config: Any) -> tuple[Any, ...]:
        from elite_core.planner import plan_tiers

        return plan_tiers(shape, profile, config)

    def select_tier(self, plans: tuple[Any, ...]) -> int:
        from elite_core.planner import select_tier

        return select_tier(plans)

    def plan_for_config(self, shape: Any, profile: Any, config: Any) -> Any:
        from elite_core.planner import plan_for_config

        return plan_for_config(shape, profile, config)

    def missing_libraries(self, config: Any, profile: Any) -> dict[str, str]:
        from elite_core.planner import missing_libraries

        return missing_libraries(config, profile)

    def config_for_plan(self, config: Any, plan: Any) -> Any:
        from elite_core.planner import config_for_plan

        return config_for_plan(config, plan)

    def dataset_dir(self, config: Any) -> Path:
        return config.run_dir / "dataset"

    def build_dataset(self, config: Any, progress: Callable[[Any], None],
                      cancelled: Callable[[], bool] | None = None) -> Any:
        """Build the run's training set; `cancelled` (the worker's flag) stops it at the next chunk of files with
        elite_core.dataset.BuildCancelled. A build still running into the same directory (a screen left and entered
        again: a thread ends only at its next cancel point) is waited for."""
        dataset_dir = str(self.dataset_dir(config))
        with _BUILD_LOCKS_GUARD:
            lock = _BUILD_LOCKS.setdefault(dataset_dir, threading.Lock())
        with lock:
            return self._build_dataset(config, progress, cancelled)

    def existing_dataset(self, config: Any) -> Any:
        """The run's own finished training set (DatasetSummary), which a resumed run keeps; None without one."""
        from elite_core.dataset import complete_build_summary

        return complete_build_summary(self.dataset_dir(config))

    def _build_dataset(self, config: Any, progress: Callable[[Any], None], cancelled: Callable[[], bool] | None) -> Any:
        from elite_core.dataset import build_dataset

        return build_dataset(
            config.repo,
            self.dataset_dir(config),
            tokenizer_source=config.model,
            trust_remote_code=config.trust_remote_code,
            eval_fraction=config.eval_fraction,
            seed=config.seed,
            progress=progress,
            output_dir=config.output_dir,
            cancelled=cancelled,
        )

    def preview_text(self, config: Any, max_files: int) -> str:
        from elite_core.dataset import preview_text

        return preview_text(self.dataset_dir(config), tokenizer_source=config.model,
                            trust_remote_code=config.trust_remote_code, max_files=max_files)

    def run_preflight(self, config: Any, profile: Any, summary: Any, shape: Any) -> Iterator[Any]:
        from elite_core.preflight import run_preflight

        return run_preflight(config, profile, summary, shape)

    def end_child_jobs(self) -> None:
        """Kill the probe or learning-rate sweep running for a screen that is closing (runner.end_child_jobs)."""
        from elite_core.runner import end_child_jobs

        end_child_jobs()

    def start_training(self, config: Any, resume: bool = False, launch: Any = None) -> Any:
        """Start (or resume) the run. `launch` (distributed.LaunchSettings) is written to RUN_DIR/launch.json, which
        the runner reads to start one process or a launcher; without it a new run gets one process per config.gpus on
        this machine, and a resumed run keeps the launch.json it has."""
        from elite_core.distributed import LAUNCH_FILE, LaunchSettings, save_launch
        from elite_core.runner import SupervisedRun, TrainingProcess, prepare_run_dir

        run_dir = prepare_run_dir(config)
        if launch is None and not (resume and (run_dir / LAUNCH_FILE).is_file()):
            launch = LaunchSettings(nproc=config.gpus)
        if launch is not None:
            save_launch(run_dir, launch)
        if launch is not None and launch.nnodes > 1:
            # Stepping down after an out-of-memory error would restart this node alone, out of step with the others.
            return TrainingProcess.start(config, resume=resume)
        return SupervisedRun(config, resume=resume)

    def attach_training(self, run_dir: Path) -> Any:
        from elite_core.runner import AttachedRun

        return AttachedRun(run_dir)

    def started_run(self, run_dir: Path) -> Any:
        """The run already started in run_dir (runs.started_run), or None: a new run must go elsewhere."""
        from elite_core.runs import started_run

        return started_run(run_dir)

    def list_runs(self, output_dir: str) -> list[Any]:
        from elite_core.runs import list_runs

        if not Path(output_dir).is_dir():
            return []
        return list_runs(output_dir)
