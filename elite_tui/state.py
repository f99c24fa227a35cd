"""What the wizard has learnt so far; each screen reads it and fills in its part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elite_core.config import RunConfig


@dataclass
class WizardState:
    config: RunConfig
    profile: Any = None
    """HardwareProfile, once profiled (or given by the caller)."""
    shape: Any = None
    """ModelShape of config.model, read from its config alone."""
    plans: tuple[Any, ...] = ()
    """TierPlan for every tier, for the current profile, shape and config."""
    summary: Any = None
    """DatasetSummary of the built training set."""
    preflight_results: list[Any] = field(default_factory=list)
    preflight_config: RunConfig | None = None
    """The config the pre-flight results were checked against."""
    finished: Any = None
    """The Finished event of the training run, once it ended."""
    training_error: Any = None
    last_step: Any = None
    """The last StepMetrics, for the report screen's numbers."""
    launch: Any = None
    """distributed.LaunchSettings chosen on the Overrides screen (GPUs per node, nodes, rendezvous, launcher); None
    until then: a new run gets config.gpus processes on this machine, a resumed run its own launch.json."""
    resume: bool = False
    """True when the user picked a resumable run on the setup screen."""
    attach: bool = False
    """True when the monitor follows a child that is already training (elite-tui attach, or a live run on Setup)."""

    def take_config(self, config: RunConfig) -> None:
        """Set the config from Setup (a new run or a resumed one), dropping what was read or built for another: the
        model's shape and the tier plans when the model changes, the dataset and the pre-flight results when the
        repository, model or run directory changes."""
        old = self.config
        if (config.model, config.trust_remote_code) != (old.model, old.trust_remote_code):
            self.shape, self.plans = None, ()
        if (config.repo, config.model, config.run_dir, config.eval_fraction, config.seed) != (
                old.repo, old.model, old.run_dir, old.eval_fraction, old.seed):
            self.summary = None
            self.preflight_results, self.preflight_config = [], None
        self.config = config
