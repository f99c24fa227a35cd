"""Step 2: profile the machine (GPUs, memory, measured speed, optimisations) and read the model's shape."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import ProgressBar, Static
from textual.worker import Worker

from elite_core.units import format_duration, format_flops
from elite_tui.format import format_bytes
from elite_tui.screens.base import WizardScreen
from elite_tui.widgets.key_values import key_value_table


class ProfileProgress(Message):
    def __init__(self, text: str, fraction: float) -> None:
        super().__init__()
        self.text = text
        self.fraction = fraction


class ProfileReady(Message):
    def __init__(self, profile: Any) -> None:
        super().__init__()
        self.profile = profile


class ShapeReady(Message):
    def __init__(self, shape: Any) -> None:
        super().__init__()
        self.shape = shape


def gpu_lines(gpu: Any) -> Table:
    major, minor = gpu.compute_capability
    return key_value_table(
        [
            (f"GPU {gpu.index}", f"{gpu.name} ({gpu.architecture}, sm {major}.{minor}, driver {gpu.driver})"),
            ("memory", f"{format_bytes(gpu.total_bytes)} total, {format_bytes(gpu.free_bytes)} free, "
                       f"{format_bytes(gpu.usable_bytes)} usable (probe)"),
            ("measured matmul", f"bf16 {format_flops(gpu.tflops_bf16)}, fp16 {format_flops(gpu.tflops_fp16)}, "
                                f"fp32 {format_flops(gpu.tflops_fp32)}"),
            ("measured copy", f"{format_bytes(gpu.bandwidth_bytes_per_s)}/s"),
        ],
        key_width=16,
    )


def capability_table(capabilities: Any) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    table.add_column("optimisation", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("detail / fallback", overflow="fold")
    for capability in capabilities:
        available = Text("yes", style="green") if capability.available else Text("no", style="yellow")
        detail = capability.detail if capability.available else f"{capability.detail}; instead: {capability.fallback}"
        table.add_row(capability.name, available, detail.strip("; "))
    return table


def profile_renderable(profile: Any) -> Group:
    parts: list[Any] = []
    if profile.gpus:
        parts.extend(gpu_lines(gpu) for gpu in profile.gpus)
    else:
        parts.append(Text("No CUDA GPU: training runs on the CPU, slowly.", style="yellow"))
    source = "from the cache" if profile.from_cache else f"measured in {format_duration(profile.profiled_s)}"
    parts.append(
        key_value_table(
            [
                ("CPU", f"{profile.cpu_name}, {profile.cpu_cores} cores, {format_flops(profile.cpu_gflops_fp32 / 1000)}"),
                ("RAM", f"{format_bytes(profile.ram_total_bytes)} total, {format_bytes(profile.ram_available_bytes)} available"),
                ("disk free", format_bytes(profile.disk_free_bytes)),
                ("torch / CUDA", f"{profile.torch_version} / {profile.cuda_version or 'none'}"),
                ("profile", source),
            ],
            key_width=16,
        )
    )
    parts.append(capability_table(profile.capabilities))
    return Group(*parts)


def shape_text(shape: Any) -> str:
    billions = shape.total_params / 1e9
    size = f"{billions:.2f}B" if billions >= 0.1 else f"{shape.total_params / 1e6:.1f}M"
    return (f"Model: {escape(shape.name or 'model')} ({escape(shape.architecture)}), {size} parameters, {shape.layers} layers, "
            f"hidden {shape.hidden}, {shape.heads}/{shape.kv_heads} heads, vocabulary {shape.vocab:,}")


class HardwareScreen(WizardScreen):
    STEP_NAME = "Hardware"
    BINDINGS = [Binding("r", "reprofile", "Profile again")]

    def compose(self) -> ComposeResult:
        yield self.step_title()
        yield Static("Profiling the machine...", id="profile-status")
        yield ProgressBar(total=1.0, show_eta=False, id="profile-progress")
        yield Static("", id="shape")
        with VerticalScroll(id="profile-scroll"):
            yield Static("", id="profile")
        yield self.error_panel()
        yield self.footer()

    def on_mount(self) -> None:
        if self.state.profile is None:
            self.profile_machine(use_cache=not self.wizard.reprofile)
        else:
            self.show_profile(self.state.profile)
        if self.state.shape is None:
            self.query_one("#shape", Static).update(f"Reading the config of {escape(self.state.config.model)}...")
            self.read_shape(self.state.config.model, self.state.config.trust_remote_code)
        else:
            self.query_one("#shape", Static).update(shape_text(self.state.shape))

    @work(thread=True, exclusive=True, exit_on_error=False, group="profile", name="hardware profile")
    def profile_machine(self, use_cache: bool) -> None:
        self.app.call_from_thread(self.refresh_bindings)  # "Profile again" waits until this measurement ends

        def progress(text: str, fraction: float) -> None:
            self.post_message(ProfileProgress(text, fraction))

        profile = self.engine.profile_hardware(self.state.config.output_dir, progress, use_cache)
        self.post_message(ProfileReady(profile))

    @work(thread=True, exclusive=True, exit_on_error=False, group="shape", name="reading the model config")
    def read_shape(self, model: str, trust_remote_code: bool) -> None:
        self.post_message(ShapeReady(self.engine.load_model_shape(model, trust_remote_code)))

    @on(ProfileProgress)
    def profile_progress(self, message: ProfileProgress) -> None:
        self.query_one("#profile-status", Static).update(message.text)
        self.query_one(ProgressBar).update(progress=max(0.0, min(1.0, message.fraction)))

    @on(ProfileReady)
    def profile_ready(self, message: ProfileReady) -> None:
        self.state.profile = message.profile
        self.state.plans = ()
        self.show_profile(message.profile)
        self.refresh_bindings()

    @on(ShapeReady)
    def shape_ready(self, message: ShapeReady) -> None:
        self.state.shape = message.shape
        self.state.plans = ()
        self.query_one("#shape", Static).update(shape_text(message.shape))
        self.refresh_bindings()

    def show_profile(self, profile: Any) -> None:
        self.query_one("#profile-status", Static).update("Profile ready.")
        self.query_one(ProgressBar).update(progress=1.0)
        self.query_one("#profile", Static).update(profile_renderable(profile))

    def worker_failed(self, worker: Worker, error: BaseException) -> None:
        if worker.group == "profile":
            self.query_one("#profile-status", Static).update("Profiling failed; press r to try again.")
        else:
            self.query_one("#shape", Static).update("Cannot read the model; go back (Esc) and pick another.")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Two measurements at once would time each other: one profile at a time.
        if action == "reprofile":
            return None if self.profiling else True
        return super().check_action(action, parameters)

    @property
    def profiling(self) -> bool:
        return any(worker.group == "profile" and worker.is_running for worker in self.workers)

    def action_reprofile(self) -> None:
        if self.profiling:
            return
        self.clear_error()
        self.state.profile = None
        self.query_one(ProgressBar).update(progress=0.0)
        self.query_one("#profile-status", Static).update("Profiling the machine...")
        self.profile_machine(use_cache=False)

    def can_advance(self) -> bool:
        return self.state.profile is not None and self.state.shape is not None
