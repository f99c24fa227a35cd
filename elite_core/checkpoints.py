"""Checkpoints that survive crashes: written to a temporary directory, fsynced, renamed into place, hashed in a manifest.

Layout of RUN_DIR/checkpoints/step-00000042/:
  adapter.safetensors   trainable weights (LoRA and any modules trained in full)
  optimizer.pt          optimizer state (read back with torch.load(weights_only=True): no pickle code runs)
  scheduler.json        LR scheduler state
  rng.safetensors       torch RNG states (CPU and every CUDA device)
  state.json            step, data position, recent losses
  config.yaml           the run config
  manifest.json         sha256 and size of every file above; written last
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from elite_core.config import RunConfig

# torch and safetensors are imported inside the functions that need them: the UI lists runs (through verify and
# read_state) without paying for torch at start-up.

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trainable_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().contiguous().cpu() for name, tensor in get_peft_model_state_dict(model).items()}


def _rng_state() -> dict:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda_state
    return state


_injected_save_faults = 0


def _inject_save_fault() -> None:
    """Fault injection for tests: ELITE_FAULT_SAVE_ERRNO=28 fails every save the way a full disk does; "28:2" fails
    only the first two saves of the process."""
    global _injected_save_faults
    fault = os.environ.get("ELITE_FAULT_SAVE_ERRNO")
    if not fault:
        return
    errno_text, _, limit = fault.partition(":")
    if limit and _injected_save_faults >= int(limit):
        return
    _injected_save_faults += 1
    raise OSError(int(errno_text), os.strerror(int(errno_text)))


@contextlib.contextmanager
def _write_failures_as_os_errors():
    """safetensors (SafetensorError) and torch.save (RuntimeError from its stream writer) report a full disk or a
    file-size limit with their own exceptions: raised as OSError, so the caller's on_save_failure policy applies."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, RuntimeError) as exc:
        raise OSError(errno.EIO, f"{type(exc).__name__}: {exc}") from exc


def save(run_dir: Path, model, optimizer, scheduler, state: dict, config: RunConfig, keep: int = 3) -> Path:
    """Write a checkpoint atomically and prune to the newest `keep`. Returns the final directory."""
    import torch
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-*"):
        # A save that a kill interrupted: never renamed into place, so never read; only its disk space is reclaimed.
        if f"-{os.getpid()}-" not in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"{PREFIX}{state['step']:08d}"
    staging = root / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    staging.mkdir()
    try:
        _inject_save_fault()
        with _write_failures_as_os_errors():
            save_file(_trainable_state(model), staging / "adapter.safetensors")
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        (staging / "scheduler.json").write_text(json.dumps(scheduler.state_dict()), encoding="utf-8")
        with _write_failures_as_os_errors():
            save_file(_rng_state(), staging / "rng.safetensors")
        (staging / "state.json").write_text(json.dumps(state), encoding="utf-8")
        config.save(staging / "config.yaml")
        files = sorted(p for p in staging.iterdir() if p.is_file())
        manifest = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for path in staging.iterdir():
            _fsync_file(path)
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> None:
    """Raise CheckpointError unless every file in the manifest is present with its recorded hash."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no manifest (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest: {exc}") from exc
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{path}: {name} is missing or does not match its hash")


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load(path: Path, model, optimizer, scheduler) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    verify(path)
    device = next(model.parameters()).device
    weights = {name: tensor.to(device) for name, tensor in load_file(path / "adapter.safetensors").items()}
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text(encoding="utf-8")))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    state = read_state(path)
    state["path"] = str(path)
    return state


ADAPTER_SHAPE_FIELDS = ("model", "lora_rank", "lora_target_modules", "extra_trainable_modules")
"""What a resumed run cannot change: the saved adapter and optimizer state have this shape."""
RELOCATION_FIELDS = ("output_dir", "run_name")
"""Where the run lies, which a resume of a moved run directory rewrites."""


def config_changes(saved: RunConfig, current: RunConfig) -> dict[str, tuple]:
    """Fields of the run's config that differ from the config its checkpoint was saved with: (saved, now)."""
    from dataclasses import fields

    return {f.name: (getattr(saved, f.name), getattr(current, f.name)) for f in fields(RunConfig)
            if f.name not in RELOCATION_FIELDS and getattr(saved, f.name) != getattr(current, f.name)}


def saved_config(path: Path) -> RunConfig | None:
    """The config a checkpoint was saved with; None for a checkpoint written before checkpoints held it."""
    try:
        return RunConfig.load(path / "config.yaml")
    except (OSError, ValueError):
        return None


def latest_valid(run_dir: Path) -> Path | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
            return path
        except CheckpointError:
            continue
    return None


def load_latest(run_dir: Path, model, optimizer, scheduler) -> dict | None:
    """Load the newest checkpoint that verifies, falling back to older ones; None when there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path, model, optimizer, scheduler)
        except CheckpointError:
            continue
    return None
