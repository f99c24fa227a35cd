"""The Overrides screen's Launch group on the real planner: the GPU count re-plans each GPU's memory and rebuilds the
command as it changes, bad multi-node settings block Next, and the tier table behind it follows the GPU count."""

from __future__ import annotations

import asyncio
import dataclasses

from elite_core.config import default_config
from elite_core.distributed import LaunchSettings, deepspeed_installed
from elite_core.planner import plan_for_config
from elite_tui.app import EliteApp
from elite_tui.format import format_bytes
from elite_tui.state import WizardState
from tui_helpers import screen_name, wait_until


def four_gpu_profile(h100_profile):
    return dataclasses.replace(h100_profile, gpus=h100_profile.gpus * 4)


def rendered(app, selector: str) -> str:
    return str(app.screen.query_one(selector).render())


def test_gpu_count_updates_the_command_and_the_per_gpu_prediction(h100_profile, qwen_shape, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = four_gpu_profile(h100_profile)
    config = default_config("demo", ".", "runs", run_name="r").with_tier(3)

    def predicted_total(**changes) -> str:
        return format_bytes(plan_for_config(qwen_shape, profile, config.replace(**changes)).breakdown.total_bytes)

    async def scenario():
        state = WizardState(config=config, profile=profile, shape=qwen_shape)
        app = EliteApp(config, start_at="overrides", state=state)
        seen = {}
        async with app.run_test(size=(100, 50)) as pilot:
            await pilot.pause()
            seen["one"] = rendered(app, "#launch-summary"), rendered(app, "#prediction")
            app.screen.query_one("#launch-nproc").value = 2
            await pilot.pause()
            seen["two"] = rendered(app, "#launch-summary"), rendered(app, "#prediction")
            app.screen.query_one("#field-deepspeed").value = "zero2-offload"
            await pilot.pause()
            seen["zero"] = rendered(app, "#launch-summary"), rendered(app, "#prediction")
            seen["zero message"] = rendered(app, "#message-deepspeed"), app.screen.can_advance()
            app.screen.query_one("#field-deepspeed").value = "off"
            await pilot.pause()

            app.screen.query_one("#launch-nnodes").value = "2"
            await pilot.pause()
            seen["no address"] = rendered(app, "#launch-message-master_addr")
            await pilot.press("ctrl+n")
            await pilot.pause()
            seen["blocked on"] = screen_name(pilot)
            app.screen.query_one("#launch-master_addr").value = "10.0.0.5"
            await pilot.pause()
            seen["nodes"] = rendered(app, "#launch-summary")
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: screen_name(pilot) != "OverridesScreen", 5, "the next screen")
        return app, seen

    app, seen = asyncio.run(scenario())
    summary, prediction = seen["one"]
    assert "this machine runs: python -m elite_core.child runs/r" in summary
    assert "one process" in summary and predicted_total(gpus=1) in prediction

    summary, prediction = seen["two"]
    assert "--nproc_per_node 2 --standalone --module elite_core.child runs/r" in summary
    assert "per GPU, 2 GPUs, DDP" in prediction and predicted_total(gpus=2) in prediction
    assert predicted_total(gpus=2) != predicted_total(gpus=1)  # DDP's gradient buckets: a real change, not a relabel

    summary, prediction = seen["zero"]
    assert "per GPU, 2 GPUs, ZeRO-2 offload" in prediction
    assert predicted_total(gpus=2, deepspeed="zero2-offload") in prediction
    assert "CPU RAM" in prediction  # the offloaded optimizer state lives in CPU RAM
    message, can_advance = seen["zero message"]
    if deepspeed_installed():
        assert "per GPU, 2 GPUs, ZeRO-2 offload" in summary and "CPU RAM" in summary and can_advance
    else:
        # the engine needs deepspeed for ZeRO on a GPU: Next waits until it is installed or ZeRO is off
        assert "pip install deepspeed" in message and not can_advance

    assert "node 0's address that the other nodes can reach" in seen["no address"]
    assert seen["blocked on"] == "OverridesScreen"
    assert "--nnodes 2 --nproc_per_node 2 --node_rank 0 --master_addr 10.0.0.5" in seen["nodes"]
    assert "node 1: the same with its --node_rank" in seen["nodes"]

    assert app.state.config.gpus == 4 and app.state.config.deepspeed == "off" and app.state.config.nodes == 2
    assert app.state.launch == LaunchSettings(nproc=2, nnodes=2, master_addr="10.0.0.5")


def test_a_multi_node_config_opens_the_launch_group_per_node(h100_profile, qwen_shape, tmp_path, monkeypatch):
    """A config of 4 processes on 2 nodes (a reused one, or --config) opens as 2 per node on 2 nodes, not 4 on one."""
    monkeypatch.chdir(tmp_path)
    config = default_config("demo", ".", "runs", run_name="r", gpus=4, nodes=2).with_tier(3)

    async def scenario():
        state = WizardState(config=config, profile=four_gpu_profile(h100_profile), shape=qwen_shape)
        app = EliteApp(config, start_at="overrides", state=state)
        async with app.run_test(size=(100, 50)) as pilot:
            await pilot.pause()
            return (app.screen.query_one("#launch-nproc").value, app.screen.query_one("#launch-nnodes").value)

    nproc, nnodes = asyncio.run(scenario())
    assert int(nproc) == 2 and int(nnodes) == 2


def test_tier_table_plans_per_gpu_after_going_back(h100_profile, qwen_shape, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = four_gpu_profile(h100_profile)

    async def scenario():
        config = default_config("demo", ".", "runs", run_name="r")
        state = WizardState(config=config, profile=profile, shape=qwen_shape)
        app = EliteApp(config, start_at="tiers", state=state)
        async with app.run_test(size=(100, 40)) as pilot:
            await wait_until(pilot, lambda: len(app.state.plans) == 7, 5, "the tier table")
            before = rendered(app, "#tiers-help")
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: screen_name(pilot) == "OverridesScreen", 5, "the overrides screen")
            app.screen.query_one("#launch-nproc").value = 4
            await pilot.pause()
            await pilot.press("escape")
            await wait_until(pilot, lambda: screen_name(pilot) == "TiersScreen", 5, "the tier table again")
            await pilot.pause()
            return app, before, rendered(app, "#tiers-help")

    app, before, after = asyncio.run(scenario())
    assert "per GPU" not in before
    assert "Budget 78.4 GiB per GPU, 4 GPUs, DDP" in after
    assert app.state.config.gpus == 4 and app.state.launch == LaunchSettings(nproc=4)
    assert {plan.setup.gpus for plan in app.state.plans} == {4}
