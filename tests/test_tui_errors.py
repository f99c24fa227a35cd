"""Bad input gets a message on the screen where it happened, and the wizard does not move on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from elite_core.config import default_config
from elite_tui.app import EliteApp
from elite_tui.state import WizardState
from tui_helpers import error_text, press_to_exit, screen_name, wait_until


def setup_message(app, field: str) -> str:
    return str(app.screen.query_one(f"#message-{field}").render())


async def try_setup(config, edits: dict[str, str]):
    app = EliteApp(config)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        for field, value in edits.items():
            app.screen.query_one(f"#field-{field}").value = value
        await pilot.pause()
        await pilot.press("ctrl+n")
        await pilot.pause()
        return screen_name(pilot), {field: setup_message(app, field) for field in ("model", "repo", "output_dir")}


@pytest.mark.parametrize(
    "edits, field, expected",
    [
        ({"repo": "missing-repo"}, "repo", "no such directory"),
        ({"repo": "empty"}, "repo", "is empty"),
        ({"model": "./no/such/model"}, "model", "no such directory"),
        ({"model": "not a model id"}, "model", "neither a local directory nor a hub id"),
        ({"output_dir": "a-file/runs"}, "output_dir", "is a file"),
    ],
)
def test_setup_blocks_next_with_a_message_beside_the_field(edits, field, expected, tiny_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    screen, messages = asyncio.run(try_setup(default_config("demo", str(tiny_repo), "runs"), edits))
    assert screen == "SetupScreen"
    assert expected in messages[field]


def test_setup_refuses_the_name_of_a_run_that_started_and_takes_another(tiny_repo, tmp_path, monkeypatch):
    from elite_tui.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ELITE_TUI_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["run", "--repo", str(tiny_repo), "--output", "runs", "--run-name", "done", "--tier", "1",
                 "--max-steps", "1", "--set", "device=cpu", "--set", "context_tokens=192",
                 "--set", "target_tokens=64", "--set", "eval_every_steps=0", "--set", "compile_eval_prompts=0",
                 "--set", "eval_fraction=0"]) == 0

    async def scenario():
        app = EliteApp(default_config("demo", str(tiny_repo), "runs", run_name="done"))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.press("ctrl+n")
            await pilot.pause()
            refused_on, message = screen_name(pilot), setup_message(app, "run_name")
            app.screen.query_one("#field-run_name").value = "another"
            await pilot.pause()
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: screen_name(pilot) != "SetupScreen", 5, "the next screen")
            return refused_on, message, app.state.config.run_name

    refused_on, message, run_name = asyncio.run(scenario())
    assert refused_on == "SetupScreen"
    assert "already holds a run: pick another name, or resume it from the list below" in message
    assert run_name == "another"


def test_overrides_block_next_until_the_value_is_fixed(h100_profile, qwen_shape, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    async def scenario():
        state = WizardState(config=default_config("demo", ".", "runs").with_tier(2), profile=h100_profile,
                            shape=qwen_shape)
        app = EliteApp(state.config, start_at="overrides", state=state)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.press("a", "b", "c")  # focus starts on the LoRA rank, its text selected
            await pilot.pause()
            message = str(app.screen.query_one("#message-lora_rank").render())
            await pilot.press("ctrl+n")
            await pilot.pause()
            blocked_on = screen_name(pilot)
            await pilot.press("backspace", "backspace", "backspace", "0")
            await pilot.pause()
            range_message = str(app.screen.query_one("#message-lora_rank").render())
            await pilot.press("backspace", "1", "6", "ctrl+n")
            await wait_until(pilot, lambda: screen_name(pilot) != "OverridesScreen", 5, "the next screen")
            return message, blocked_on, range_message, app.state.config.lora_rank

    message, blocked_on, range_message, rank = asyncio.run(scenario())
    assert "'abc' is not a whole number" in message
    assert blocked_on == "OverridesScreen"
    assert "between 1 and 1024" in range_message
    assert rank == 16


def test_qlora_without_bitsandbytes_is_marked_on_its_field_and_blocks_next(h100_profile, qwen_shape, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not h100_profile.can("bitsandbytes")

    async def scenario():
        state = WizardState(config=default_config("demo", ".", "runs", device="cuda").with_tier(2),
                            profile=h100_profile, shape=qwen_shape)
        app = EliteApp(state.config, start_at="overrides", state=state)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            app.screen.query_one("#field-qlora").value = True
            await pilot.pause()
            message = setup_message(app, "qlora")
            await pilot.press("ctrl+n")
            await pilot.pause()
            blocked_on = screen_name(pilot)
            app.screen.query_one("#field-qlora").value = False
            await pilot.pause()
            cleared = setup_message(app, "qlora")
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: screen_name(pilot) != "OverridesScreen", 5, "the next screen")
            return message, blocked_on, cleared, app.state.config.qlora

    message, blocked_on, cleared, qlora = asyncio.run(scenario())
    assert "QLoRA needs bitsandbytes" in message
    assert blocked_on == "OverridesScreen"
    assert cleared == "" and qlora is False


@pytest.mark.slow
def test_a_crashing_child_shows_an_error_panel_and_keeps_the_run_dir(tiny_repo, tmp_path):
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{ this is not json")
    config = default_config(str(broken_model), str(tiny_repo), str(tmp_path / "runs"), run_name="crash", max_steps=2)

    async def scenario():
        app = EliteApp(config, start_at="monitor")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.state.training_error is not None, 90, "the child's error")
            await pilot.pause()
            text = error_text(pilot)
            running = app.screen.running
            await press_to_exit(pilot, "q")  # training is over: quits at once, no question
            return app.state.training_error, text, running

    error, text, running = asyncio.run(scenario())
    assert not running
    assert error.message and error.message in text
    assert str(config.run_dir) in text
    assert (config.run_dir / "config.yaml").is_file()
    assert Path(config.run_dir / "events.jsonl").exists() or Path(config.run_dir / "child.log").exists()


def test_the_dataset_screen_pages_through_the_decoded_training_text(tiny_repo, tmp_path):
    """`p` on the Dataset screen shows what will be trained on: each file's path, then its text."""
    import asyncio

    from elite_core.config import default_config
    from elite_tui.app import EliteApp
    from elite_tui.screens.preview import PreviewScreen
    from tui_helpers import wait_until

    async def walk():
        app = EliteApp(default_config("demo", str(tiny_repo), str(tmp_path / "runs")), start_at="dataset")
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.state.summary is not None, 120, "the dataset")
            await pilot.press("p")
            await wait_until(pilot, lambda: isinstance(app.screen, PreviewScreen), 30, "the preview")
            text = app.screen.text
            await pilot.press("escape")
            await pilot.pause()
            return text, type(app.screen).__name__

    text, after = asyncio.run(walk())
    assert "tiny/module_00.py" in text and "def add_0_0(left: int, right: int) -> int:" in text
    assert after == "DatasetScreen"
