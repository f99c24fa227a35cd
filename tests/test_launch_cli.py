"""`elite-tui run` on several processes: the launch flags, the commands printed for each node, launch.json, the checks
that refuse a launch that cannot work, and real 2-process CPU runs (gloo) on one machine and on two "nodes"."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from elite_core import distributed
from elite_core.config import RunConfig, default_config
from elite_tui.cli import main
from elite_tui.engine import check_launch

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_PROCESSES = ["--set", "device=cpu"]
"""Processes on the CPU, so that these tests hold on any machine: one of a single GPU refuses --gpus 2 for a GPU run,
and one with a GPU but no DeepSpeed refuses ZeRO (test_launch_checks_against_the_machine covers both)."""
SMALL_RUN = ["--tier", "1", "--max-steps", "2", "--set", "device=cpu", "--set", "context_tokens=192",
             "--set", "target_tokens=64", "--set", "lora_rank=8", "--set", "eval_every_steps=0",
             "--set", "compile_eval_prompts=0", "--set", "checkpoint_every_seconds=0", "--set", "eval_fraction=0"]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "runs"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def command_lines(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line and not line.startswith("#")]


def test_print_launch_prints_torchrun_for_two_processes_and_trains_nothing(tiny_repo, runs, capsys):
    code, out, err = run_cli(capsys, "run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "two",
                             "--tier", "1", "--gpus", "2", *CPU_PROCESSES, "--print-launch")
    assert code == 0, err
    [command] = command_lines(out)
    run_dir = (runs / "two").resolve()
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    # torchrun takes --nproc_per_node and --nproc-per-node alike; distributed.launch_command writes the first
    assert command[command.index("--nproc_per_node") + 1] == "2" and "--standalone" in command
    assert command[-3:] == ["--module", "elite_core.child", str(run_dir)]
    # What the printed command needs is written (the child builds the dataset itself); nothing started training.
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.yaml", "launch.json"]
    assert RunConfig.load(run_dir / "config.yaml").gpus == 2
    assert distributed.read_launch(run_dir) == distributed.LaunchSettings(nproc=2)
    # the runner would start exactly the printed command (plus the event pipe)
    assert distributed.spawn_command(run_dir, []) == command


def test_zero_on_one_process_is_a_plain_child(tiny_repo, runs, capsys):
    code, out, err = run_cli(capsys, "run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "zero",
                             "--tier", "1", "--gpus", "1", "--set", "deepspeed=zero2-offload", *CPU_PROCESSES,
                             "--print-launch")
    assert code == 0, err
    run_dir = (runs / "zero").resolve()
    assert command_lines(out) == [[sys.executable, "-m", "elite_core.child", str(run_dir)]]
    assert RunConfig.load(run_dir / "config.yaml").deepspeed == "zero2-offload"


def test_other_node_writes_its_launch_and_every_node_command_is_printed(tiny_repo, runs, capsys):
    code, out, err = run_cli(capsys, "run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "n1",
                             "--tier", "1", "--gpus", "2", "--nnodes", "2", "--node-rank", "1", *CPU_PROCESSES,
                             "--master-addr", "10.0.0.5", "--master-port", "29611", "--print-launch")
    assert code == 0, err
    run_dir = runs / "n1"
    assert distributed.read_launch(run_dir) == distributed.LaunchSettings(
        nproc=2, nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29611)
    saved = RunConfig.load(run_dir / "config.yaml")
    assert (saved.gpus, saved.nodes) == (4, 2)  # 2 per node x 2 nodes: the planner sizes per GPU, host RAM per node
    commands = command_lines(out)
    assert [c[c.index("--node_rank") + 1] for c in commands] == ["0", "1"]
    for command in commands:
        for flag, value in (("--nnodes", "2"), ("--nproc_per_node", "2"), ("--master_addr", "10.0.0.5"),
                            ("--master_port", "29611")):
            assert command[command.index(flag) + 1] == value
    assert "# on node 1" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.5"],
         "--node-rank 2: with --nnodes 2 the node ranks are 0..1"),
        (["--node-rank", "1"], "--node-rank 1: one node (--nnodes 1) is node 0"),
        (["--nnodes", "2"], "--master-addr 127.0.0.1: with several nodes: node 0's address"),
        (["--gpus", "0"], "--gpus 0: at least 1 process per node"),
        (["--gpus", "2", "--set", "gpus=3"], "--set gpus=3 but --gpus 2 x --nnodes 1 is 2"),
        (["--gpus", "2", "--set", "nodes=2"], "--set nodes: the nodes a run spans are --nnodes (1)"),
        (["--gpus", "2", "--hostfile", "hosts-that-do-not-exist"], "--hostfile hosts-that-do-not-exist: "),
    ],
)
def test_bad_launch_flags_fail_with_a_message(tiny_repo, runs, capsys, flags, message):
    code, _, err = run_cli(capsys, "run", "--repo", str(tiny_repo), "--output", str(runs), "--run-name", "bad",
                             "--tier", "1", *flags, "--print-launch")
    assert code == 2
    assert message in err
    assert not (runs / "bad").exists()


def test_launch_checks_against_the_machine(h100_profile, tmp_path):
    config = default_config("demo", ".", str(tmp_path), run_name="r")
    _, errors = check_launch(config, h100_profile, nproc=2)
    assert errors == {"nproc": "this machine has 1 GPU"}
    two_gpus = dataclasses.replace(h100_profile, gpus=h100_profile.gpus * 2)
    settings, errors = check_launch(config, two_gpus, nproc=2)
    assert errors == {} and settings == distributed.LaunchSettings(nproc=2)
    # a CPU run on a GPU machine counts cores, not GPUs
    assert check_launch(config.replace(device="cpu"), h100_profile, nproc=2)[1] == {}
    # single-GPU ZeRO (offload of the optimizer state to CPU RAM) is a feature: one plain process
    zero = config.replace(deepspeed="zero2-offload")
    if distributed.deepspeed_installed():
        settings, errors = check_launch(zero, h100_profile, nproc=1)
        assert errors == {} and not settings.is_distributed
    # on a CPU run ZeRO is off (the planner turns it off), so it needs no deepspeed there
    settings, errors = check_launch(zero.replace(device="cpu"), h100_profile, nproc=1)
    assert errors == {} and not settings.is_distributed
    for loopback in ("127.0.0.1", "localhost", "127.0.1.1", "::1"):
        assert "master_addr" in check_launch(config, two_gpus, nproc=1, nnodes=2, master_addr=loopback)[1]
    assert check_launch(config, two_gpus, nproc=2, nnodes=2, master_addr="node0.cluster")[1] == {}
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    _, errors = check_launch(config, two_gpus, nproc=2, nnodes=2, master_addr="10.0.0.5", hostfile=str(hostfile),
                             launcher="torchrun")
    assert "hostfile is for DeepSpeed" in errors["hostfile"]
    if not distributed.deepspeed_installed():
        _, errors = check_launch(config, two_gpus, nproc=2, launcher="deepspeed")
        assert "pip install deepspeed" in errors["launcher"]
        # ZeRO on a GPU imports deepspeed in the engine, one GPU or several: refused before anything loads
        assert "pip install deepspeed" in check_launch(zero, h100_profile, nproc=1)[1]["deepspeed"]


def cli_run(*argv: str, timeout_s: float = 150) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "elite_tui.cli", "run", *argv], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_run(process: subprocess.Popen, timeout_s: float = 150) -> str:
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, out[-3000:]
    return out


def reachable_address() -> str | None:
    """This machine's first non-loopback IPv4 address: the two 'nodes' meet over TCP, as two machines would."""
    import ipaddress

    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_together(tiny_repo, runs):
    address = reachable_address()
    if address is None:
        pytest.skip("no non-loopback network address for a two-node rendezvous")
    nodes = ["--nnodes", "2", "--master-addr", address, "--master-port", str(free_port())]
    node_0 = cli_run("--repo", str(tiny_repo), "--output", str(runs), "--run-name", "node0", "--node-rank", "0",
                     *nodes, *SMALL_RUN)
    node_1 = cli_run("--repo", str(tiny_repo), "--output", str(runs), "--run-name", "node1", "--node-rank", "1",
                     *nodes, *SMALL_RUN)
    try:
        out_1 = finished_run(node_1)
        out_0 = finished_run(node_0)
    finally:
        for process in (node_0, node_1):
            if process.poll() is None:
                process.kill()
    # node 0 holds rank 0: it reports the run; node 1 has no rank that reports, and says its part is done
    assert "finished at step 2" in out_0
    assert "node 0 has the run's results" in out_1 and "error:" not in out_1
    events = [json.loads(line) for line in (runs / "node0" / "events.jsonl").read_text().splitlines()]
    [started] = [e for e in events if e["type"] == "started"]
    assert started["tokens_per_step"] == 2 * (192 + 64)
    assert not (runs / "node1" / "events.jsonl").exists()
    assert distributed.read_launch(runs / "node1").node_rank == 1
