"""Going back and forth in the wizard: what is kept, what a change drops, one job at a time, text shown as typed."""

from __future__ import annotations

import threading
import time

from elite_core.config import default_config
from elite_core.dataset import BuildCancelled
from elite_core.hardware import fake_profile
from elite_core.model_loading import load_model_shape
from elite_tui.app import EliteApp
from elite_tui.engine import Engine
from elite_tui.state import WizardState
from tui_helpers import run_pilot, screen_name, wait_until


def test_back_from_overrides_keeps_the_picked_tier_and_what_was_typed(tiny_repo, tmp_path):
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), device="cuda")
    state = WizardState(config=config, profile=fake_profile("h100"), shape=load_model_shape("demo"))
    app = EliteApp(config, state=state, start_at="tiers")

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: bool(app.state.plans), 10, "the tier table")
            table = app.screen.query_one("#tiers")
            preselected = app.state.plans[table.cursor_row].tier.number
            await pilot.press("up", "enter")  # one tier below the preselected one
            await wait_until(pilot, lambda: screen_name(pilot) == "OverridesScreen", 10, "overrides")
            picked = app.state.config.tier
            app.screen.query_one("#field-learning_rate").value = "0.0005"
            app.screen.query_one("#field-max_steps").value = "7"
            await pilot.pause()
            await pilot.press("escape")
            await wait_until(pilot, lambda: screen_name(pilot) == "TiersScreen", 10, "tiers")
            await pilot.pause()
            on_tier = app.state.plans[app.screen.query_one("#tiers").cursor_row].tier.number
            await pilot.press("enter")
            await wait_until(pilot, lambda: screen_name(pilot) == "OverridesScreen", 10, "overrides again")
            return (preselected, picked, on_tier, app.screen.query_one("#field-learning_rate").value,
                    app.screen.query_one("#field-max_steps").value)

    preselected, picked, on_tier, rate, steps = run_pilot(scenario(), timeout_s=120)
    assert picked == preselected - 1 and on_tier == picked
    assert (rate, steps) == ("0.0005", "7")


def test_a_changed_model_or_repository_drops_what_was_read_or_built_for_the_old_one(tiny_repo, tmp_path):
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"))
    state = WizardState(config=config, profile=fake_profile("cpu"), shape="demo's shape", plans=("plan",),
                        summary="repo A's dataset", preflight_results=["passed"], preflight_config=config)
    state.take_config(config.replace(learning_rate=1e-4))  # neither model nor data: all is kept
    assert (state.shape, state.summary, state.preflight_results) == ("demo's shape", "repo A's dataset", ["passed"])
    state.take_config(state.config.replace(repo=str(tmp_path / "other-repo")))
    assert state.summary is None and state.preflight_results == [] and state.preflight_config is None
    assert state.shape == "demo's shape"
    state.take_config(state.config.replace(model=str(tmp_path / "other-model")))
    assert state.shape is None and state.plans == ()


def test_text_that_looks_like_markup_is_shown_as_typed_and_a_narrow_screen_still_shows_why(tmp_path):
    """"[/]" typed into a field crashed the app (its message quoted it as markup); at 60 columns the prediction beside
    the form left a field's message no room."""
    config = default_config("demo", ".", str(tmp_path / "runs")).with_tier(1)
    state = WizardState(config=config, profile=fake_profile("cpu"), shape=load_model_shape("demo"))
    app = EliteApp(config, state=state, start_at="overrides")

    async def scenario():
        async with app.run_test(size=(60, 20)) as pilot:
            await pilot.pause()
            app.screen.query_one("#field-lora_rank").value = "[/]"
            await pilot.pause(0.3)
            message = app.screen.query_one("#message-lora_rank")
            return str(message.render()), message.region.width, message.region.height

    text, width, height = run_pilot(scenario(), timeout_s=60)
    assert text == "'[/]' is not a whole number"
    assert width >= 15 and height >= 1


class SlowBuild(Engine):
    """The real build, held until the test lets it go."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def build_dataset(self, config, progress, cancelled=None):
        self.release.wait(60)
        return super().build_dataset(config, progress, cancelled)


def test_rebuild_and_preview_wait_for_the_running_build(tiny_repo, tmp_path):
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"))
    engine = SlowBuild()
    app = EliteApp(config, state=WizardState(config=config, profile=fake_profile("cpu")), start_at="dataset",
                   engine=engine)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            screen = app.screen
            while_building = (screen.check_action("rebuild", ()), screen.check_action("preview", ()))
            await pilot.press("r")  # refused: a second build beside the first broke both
            engine.release.set()
            await wait_until(pilot, lambda: app.state.summary is not None, 60, "the build")
            await pilot.pause()
            return while_building, (screen.check_action("rebuild", ()), screen.check_action("preview", ()))

    while_building, after = run_pilot(scenario(), timeout_s=120)
    assert while_building == (None, None) and after == (True, True)


class BuildHeldUntilCancelled(Engine):
    """The real build; the first one is held after its walk until the app cancels its worker. Records how each ended."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.done = threading.Event()
        self.outcomes: list[str] = []

    def build_dataset(self, config, progress, cancelled=None):
        first = not self.started.is_set()

        def held(update):
            progress(update)
            if first:
                self.started.set()
                deadline = time.monotonic() + 30
                while not cancelled() and time.monotonic() < deadline:
                    time.sleep(0.02)

        try:
            result = super().build_dataset(config, held, cancelled)
            self.outcomes.append("finished")
            return result
        except BuildCancelled:
            self.outcomes.append("cancelled")
            raise
        finally:
            self.done.set()


def test_quitting_during_a_build_cancels_it(tiny_repo, tmp_path):
    """ctrl+q mid-build: the build stops at its next chunk of files (before, the app waited for the whole build)."""
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"))
    engine = BuildHeldUntilCancelled()
    app = EliteApp(config, state=WizardState(config=config, profile=fake_profile("cpu")), start_at="dataset",
                   engine=engine)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, engine.started.is_set, 30, "the build's walk")
            await pilot.press("ctrl+q")

    run_pilot(scenario(), timeout_s=60)
    assert engine.done.wait(30) and engine.outcomes == ["cancelled"]
    assert not (config.run_dir / "dataset" / "manifest.json").exists()


def test_leaving_the_dataset_screen_mid_build_cancels_it_and_coming_back_builds_again(tiny_repo, tmp_path):
    """Esc pops the screen and cancels its worker; entering again waits for that build to stop, then builds whole."""
    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs")).with_tier(1)
    state = WizardState(config=config, profile=fake_profile("cpu"), shape=load_model_shape("demo"))
    engine = BuildHeldUntilCancelled()
    app = EliteApp(config, state=state, start_at="overrides", engine=engine)

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            app.screen.action_next()
            await wait_until(pilot, engine.started.is_set, 30, "the first build's walk")
            await pilot.press("escape")
            await wait_until(pilot, lambda: screen_name(pilot) == "OverridesScreen", 10, "overrides")
            app.screen.action_next()
            await wait_until(pilot, lambda: app.state.summary is not None, 30, "the second build")
            await pilot.pause(0.2)
            return app.screen.building, app.screen.check_action("next", ())

    building, can_go_on = run_pilot(scenario(), timeout_s=90)
    assert engine.outcomes == ["cancelled", "finished"]
    assert building is False and can_go_on is True


def test_a_resumed_run_keeps_its_settings_and_its_own_training_set(tiny_repo, tmp_path):
    """Resumed from the Setup list, the wizard walks the screens again: Enter on the Tiers screen must not swap in the
    tier's default windows and rank (the checkpoint holds this adapter), and the Dataset screen shows the run's own
    set, not one rebuilt from the repository as edited since."""
    from elite_core.dataset import build_dataset

    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="resumed").with_tier(1).replace(
        context_tokens=192, target_tokens=64, lora_rank=8, lora_alpha=16)  # the run's own window, not tier 1's
    built = build_dataset(tiny_repo, config.run_dir / "dataset", workers=1, eval_fraction=config.eval_fraction,
                          seed=config.seed)
    (tiny_repo / "added_since.py").write_text("def later():\n    return 1\n" * 50, encoding="utf-8")
    state = WizardState(config=config, profile=fake_profile("cpu"), shape=load_model_shape("demo"), resume=True)
    app = EliteApp(config, state=state, start_at="tiers")

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: bool(app.state.plans), 10, "the tier table")
            await pilot.press("enter")
            await wait_until(pilot, lambda: screen_name(pilot) == "OverridesScreen", 10, "overrides")
            after_tiers = app.state.config
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: screen_name(pilot) == "DatasetScreen", 10, "dataset")
            await wait_until(pilot, lambda: app.state.summary is not None, 30, "the summary")
            return after_tiers, app.state.summary, app.screen.check_action("rebuild", ())

    after_tiers, summary, rebuild = run_pilot(scenario(), timeout_s=120)
    assert (after_tiers.context_tokens, after_tiers.target_tokens, after_tiers.lora_rank) == (192, 64, 8)
    assert summary.files == built.files and summary.train_tokens == built.train_tokens
    assert rebuild is None
