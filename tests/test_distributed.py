"""Data-parallel training on one CPU machine: the real child under torchrun, 2 processes over gloo, against one process."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from elite_core import distributed, protocol
from elite_core.config import default_config
from elite_core.memory_model import TrainingSetup, lora_param_count, predict_memory
from elite_core.runner import prepare_run_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
# device cpu: gloo ranks on the CPU, on any machine (a machine of one GPU has no GPU for rank 1)
SMALL = {"device": "cpu", "context_tokens": 192, "target_tokens": 64, "lora_rank": 8, "lora_alpha": 16, "warmup_steps": 2,
         "eval_every_steps": 0, "checkpoint_every_seconds": 0, "eval_fraction": 0.0, "max_steps": 3}


def small_config(tmp_path, repo, **overrides):
    return default_config("demo", str(repo), str(tmp_path / "runs"), **{**SMALL, **overrides})


def launch(config, nproc: int, env: dict | None = None, timeout_s: float = 120):
    """Start a run exactly as the runner does (a pipe passed by fd number, the command from spawn_command) and read
    every event line from the pipe until it closes."""
    run_dir = prepare_run_dir(config.replace(gpus=nproc)).resolve()  # planned for the processes it runs
    if nproc > 1:
        distributed.save_launch(run_dir, distributed.LaunchSettings(nproc=nproc))
    read_fd, write_fd = os.pipe()
    command = distributed.spawn_command(run_dir, ["--event-fd", str(write_fd)])
    with open(run_dir / "child.log", "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                   pass_fds=(write_fd,), start_new_session=True, env={**os.environ, **(env or {})})
    os.close(write_fd)
    deadline = time.monotonic() + timeout_s
    with os.fdopen(read_fd, "r", encoding="utf-8") as pipe:
        events = [protocol.decode_event(line) for line in pipe if line.strip()]
    code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    return run_dir, events, code


def steps_of(events):
    return [e for e in events if isinstance(e, protocol.StepMetrics)]


def test_two_ranks_train_like_one_process_at_the_same_global_batch(tmp_path, tiny_repo):
    # One process accumulates grad_accum x world micro-batches; two ranks take one each: the same windows per update.
    one_dir, one, one_code = launch(small_config(tmp_path, tiny_repo, run_name="one", grad_accum=2), nproc=1)
    two_dir, two, two_code = launch(small_config(tmp_path, tiny_repo, run_name="two", grad_accum=1), nproc=2)
    assert one_code == 0 and two_code == 0, (two_dir / "child.log").read_text()[-3000:]
    assert isinstance(two[-1], protocol.Finished) and not two[-1].stopped_early

    one_losses = [s.loss for s in steps_of(one)]
    two_losses = [s.loss for s in steps_of(two)]
    assert [s.step for s in steps_of(two)] == [1, 2, 3]
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two[0].tokens_per_step == one[0].tokens_per_step == 2 * (192 + 64)

    # Only rank 0 reports: events.jsonl holds the pipe's stream once, not once per rank.
    lines = [json.loads(line) for line in (two_dir / "events.jsonl").read_text().splitlines()]
    assert [line["type"] for line in lines] == [e.type for e in two]
    assert sum(line["type"] == "started" for line in lines) == 1
    assert (two_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (two_dir / "report.md").is_file()
    assert int((two_dir / "child.pid").read_text()) == two[0].pid


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_a_failing_rank_is_reported_by_its_rank(tmp_path, tiny_repo, failing_rank):
    config = small_config(tmp_path, tiny_repo, run_name="fails", max_steps=4)
    run_dir, events, code = launch(config, nproc=2, env={distributed.FAULT_FAIL_RANK: str(failing_rank),
                                                         distributed.FAULT_FAIL_STEP: "2"})
    assert code != 0
    # Only the first failure is reported; the other rank's echo of it (a closed connection) stays in child.log.
    errors = [e for e in events if isinstance(e, protocol.Error)]
    assert len(errors) == 1, errors
    assert errors[0].message.startswith(f"rank {failing_rank} of 2: ") and "injected failure" in errors[0].message
    assert distributed.first_failure(run_dir).message == errors[0].message
    assert errors[0].traceback
    assert [s.step for s in steps_of(events)] == [1]
    recorded = [json.loads(line)["type"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert recorded.count("error") == 1


def test_launch_commands_for_one_process_torchrun_and_multi_node(tmp_path):
    config = default_config("demo", ".", str(tmp_path))
    run_dir = tmp_path / "run"
    assert distributed.launch_command(config, run_dir, nproc=1) == [sys.executable, "-m", "elite_core.child", str(run_dir)]

    local = distributed.launch_command(config, run_dir, nproc=4)
    assert local[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in local and local[local.index("--nproc_per_node") + 1] == "4"
    assert local[-3:] == ["--module", "elite_core.child", str(run_dir)]

    node_1 = distributed.launch_command(config, run_dir, nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.5",
                                        master_port=29611)
    assert "--standalone" not in node_1
    for flag, value in (("--nnodes", "2"), ("--node_rank", "1"), ("--master_addr", "10.0.0.5"),
                        ("--master_port", "29611")):
        assert node_1[node_1.index(flag) + 1] == value

    settings = distributed.LaunchSettings(nproc=8, nnodes=2, master_addr="10.0.0.5")
    commands = distributed.node_commands(config, run_dir, settings)
    assert [c[c.index("--node_rank") + 1] for c in commands] == ["0", "1"]
    with pytest.raises(distributed.LaunchError, match="hostfile"):
        distributed.launch_command(config, run_dir, nproc=2, hostfile="hosts", launcher="torchrun")
    with pytest.raises(distributed.LaunchError, match="node_rank"):
        distributed.LaunchSettings(nproc=2, nnodes=2, node_rank=2)


def test_deepspeed_launch_command(tmp_path, monkeypatch):
    config = default_config("demo", ".", str(tmp_path), deepspeed="zero2")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: False)
    assert "torch.distributed.run" in distributed.launch_command(config, run_dir, nproc=2)
    with pytest.raises(distributed.LaunchError, match="pip install deepspeed"):
        distributed.launch_command(config, run_dir, nproc=2, launcher="deepspeed")

    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: True)
    single = distributed.launch_command(config, run_dir, nproc=2)
    assert single[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert single[single.index("--num_gpus") + 1] == "2" and "--num_nodes" not in single
    assert single[-4:] == ["--no_local_rank", "--module", "elite_core.child", str(run_dir)]
    multi = distributed.launch_command(config, run_dir, nproc=8, nnodes=2, master_addr="10.0.0.5", hostfile="hosts")
    assert multi[multi.index("--hostfile") + 1] == "hosts" and multi[multi.index("--num_nodes") + 1] == "2"
    assert len(distributed.node_commands(config, run_dir, distributed.LaunchSettings(
        nproc=8, nnodes=2, master_addr="10.0.0.5", hostfile="hosts"))) == 1
    with pytest.raises(distributed.LaunchError, match="hostfile"):
        distributed.launch_command(config, run_dir, nproc=8, nnodes=2, master_addr="10.0.0.5")


def test_spawn_command_names_the_pipe_only_under_a_launcher(tmp_path):
    config = default_config("demo", ".", str(tmp_path), run_name="r")
    run_dir = prepare_run_dir(config)
    read_fd, write_fd = os.pipe()
    try:
        plain = distributed.spawn_command(run_dir, ["--event-fd", str(write_fd), "--resume"])
        assert plain == [sys.executable, "-m", "elite_core.child", str(run_dir), "--event-fd", str(write_fd), "--resume"]
        distributed.save_launch(run_dir, distributed.LaunchSettings(nproc=2))
        assert distributed.read_launch(run_dir) == distributed.LaunchSettings(nproc=2)
        launched = distributed.spawn_command(run_dir, ["--event-fd", str(write_fd), "--resume"])
        name = launched[launched.index("--event-pipe") + 1]
        assert name == distributed.pipe_name(write_fd) and "--event-fd" not in launched
        assert launched[-1] == "--resume"
        # The pipe is found again by its identity (here in this very process) and written to.
        reopened = distributed.open_event_pipe(name)
        assert reopened is not None
        os.write(reopened, b"hello\n")
        os.close(reopened)
        assert os.read(read_fd, 6) == b"hello\n"
        assert distributed.open_event_pipe("9999:1:1") is None
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_rank_beyond_the_nodes_gpus_is_named_before_cuda_fails():
    """More GPU processes on a node than it has GPUs (a launcher started by hand): the rank says so, instead of CUDA's
    'invalid device ordinal'. Rank 1 of 2 finds no second GPU here, on a CPU machine or a machine of one GPU."""
    import torch

    beyond = torch.cuda.device_count() + 1
    rank = distributed.RankInfo(rank=beyond, world_size=beyond + 1, local_rank=beyond, local_world_size=beyond + 1)
    with pytest.raises(RuntimeError, match=rf"local rank {beyond} has no GPU: this node has {beyond - 1} .*"
                                           rf"start at most {beyond - 1} process"):
        distributed.init_process_group("cuda", rank)


def test_rank_info_and_disjoint_slices():
    rank = distributed.rank_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (rank.rank, rank.world_size, rank.local_rank, rank.is_main) == (3, 4, 1, False)
    assert distributed.rank_info({}) == distributed.RankInfo()
    windows = list(range(100, 108))
    slices = [distributed.rank_slice(windows, distributed.RankInfo(rank=r, world_size=4)) for r in range(4)]
    assert [w for part in slices for w in part] == windows
    assert distributed.rank_slice(windows, distributed.RankInfo()) == windows


def test_deepspeed_config_contents():
    config = default_config("demo", ".", "out", deepspeed="zero2", micro_batch=2, grad_accum=4, max_grad_norm=0.5,
                            learning_rate=1e-4)
    ds = distributed.deepspeed_config(config.replace(deepspeed="zero2-offload"), world_size=8, compute_dtype="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero
    # our torch AdamW steps the offloaded partitions: no DeepSpeed optimizer section, no compiled CPU Adam
    assert "optimizer" not in ds and ds["zero_force_ds_cpu_optimizer"] is False
    json.dumps(ds)  # DeepSpeed reads it as JSON

    stage3 = distributed.deepspeed_config(config.replace(deepspeed="zero3-offload"), world_size=2, compute_dtype="fp16")
    zero3 = stage3["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["offload_param"]["device"] == "cpu"
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True
    plain3 = distributed.deepspeed_config(config.replace(deepspeed="zero3"), world_size=2)["zero_optimization"]
    assert "offload_optimizer" not in plain3 and "offload_param" not in plain3
    assert stage3["zero_allow_untested_optimizer"] is True and stage3["fp16"]["enabled"] is True
    with pytest.raises(distributed.LaunchError):
        distributed.deepspeed_config(config.replace(deepspeed="off"), world_size=2)


def test_zero_memory_per_gpu_and_cpu(qwen_shape):
    setup = TrainingSetup(device="cuda", seq_tokens=4608, target_tokens=512, lora_rank=48)
    single = predict_memory(qwen_shape, setup)

    def per_gpu(deepspeed: str, gpus: int):
        return predict_memory(qwen_shape, replace(setup, deepspeed=deepspeed, gpus=gpus))

    ddp = per_gpu("off", 2)
    # DDP's buckets hold a whole copy of the adapter gradients (fp32) on top of what one GPU needs
    assert ddp.total_bytes == single.total_bytes + 4 * 55_394_304 or ddp.total_bytes - single.total_bytes == pytest.approx(
        4 * 55_394_304, abs=2)

    zero2 = {g: per_gpu("zero2", g).total_bytes for g in (1, 2, 8)}
    assert zero2[1] > zero2[2] > zero2[8]  # optimizer state and fp32 gradients are split
    offloaded = per_gpu("zero2-offload", 2)
    assert offloaded.total_bytes < zero2[2] and offloaded.optimizer_bytes == 0
    # LoRA r=48 on Qwen2.5-Coder-1.5B: 55.4M adapter parameters, 16 B each of ZeRO state (fp32 master, Adam m and v,
    # fp32 gradient) in CPU RAM with offload, over both GPUs' partitions
    assert lora_param_count(qwen_shape, 48) == 55_394_304
    assert offloaded.cpu_offload_bytes - per_gpu("zero2", 2).cpu_offload_bytes == pytest.approx(16 * 55_394_304, abs=2)

    zero3 = per_gpu("zero3", 8)
    assert zero3.total_bytes < zero2[8]  # the frozen weights are split too
    zero3_offload = per_gpu("zero3-offload", 8)
    assert zero3_offload.total_bytes < zero3.total_bytes
    assert zero3_offload.cpu_offload_bytes > zero3.cpu_offload_bytes + single.weights_bytes // 2
    # over 2 nodes a host holds its own processes' partitions only: 16 processes on 2 nodes, 8 a host, hold half of
    # what 8 on one node hold (each partition is a sixteenth, not an eighth)
    for deepspeed in ("zero2-offload", "zero3-offload"):
        one_node = per_gpu(deepspeed, 8).cpu_offload_bytes
        two_nodes = predict_memory(qwen_shape, replace(setup, deepspeed=deepspeed, gpus=16, nodes=2)).cpu_offload_bytes
        assert two_nodes == pytest.approx(one_node / 2, rel=1e-6)


def test_multigpu_benchmark_parses_and_explains_itself():
    script = REPO_ROOT / "bench" / "multigpu_throughput.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "tokens_per_s" in result.stdout


def test_largest_layer_elements_counts_one_decoder_layer():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    one_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert distributed.largest_layer_elements(model) == one_layer == 32 * (32 + 16 + 16 + 32) + 3 * 32 * 48 + 2 * 32
