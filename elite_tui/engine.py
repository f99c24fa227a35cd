"""The one place the UI calls the engine; imports stay inside the methods so the wizard starts without torch.

Tests pass a subclass to slow a call down (a real call that waits on an event), never a fake engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator


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

    def config_for_plan(self, config: Any, plan: Any) -> Any:
        from elite_core.planner import config_for_plan

        return config_for_plan(config, plan)

    def dataset_dir(self, config: Any) -> Path:
        return config.run_dir / "dataset"

    def build_dataset(self, config: Any, progress: Callable[[Any], None]) -> Any:
        from elite_core.dataset import build_dataset

        return build_dataset(
            config.repo,
            self.dataset_dir(config),
            tokenizer_source=config.model,
            trust_remote_code=config.trust_remote_code,
            eval_fraction=config.eval_fraction,
            seed=config.seed,
            progress=progress,
        )

    def preview_text(self, config: Any, max_files: int) -> str:
        from elite_core.dataset import preview_text

        return preview_text(self.dataset_dir(config), tokenizer_source=config.model,
                            trust_remote_code=config.trust_remote_code, max_files=max_files)

    def run_preflight(self, config: Any, profile: Any, summary: Any, shape: Any) -> Iterator[Any]:
        from elite_core.preflight import run_preflight

        return run_preflight(config, profile, summary, shape)

    def start_training(self, config: Any, resume: bool = False) -> Any:
        from elite_core.runner import SupervisedRun

        return SupervisedRun(config, resume=resume)

    def attach_training(self, run_dir: Path) -> Any:
        from elite_core.runner import AttachedRun

        return AttachedRun(run_dir)

    def list_runs(self, output_dir: str) -> list[Any]:
        from elite_core.runs import list_runs

        if not Path(output_dir).is_dir():
            return []
        return list_runs(output_dir)
