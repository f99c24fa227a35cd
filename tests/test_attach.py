"""An SSH drop: the controller dies of SIGHUP, the child trains on, and `attach` takes the run back."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from elite_core import protocol
from elite_core.runner import AttachedRun, ControllerLock, live_child_pid
from elite_core.runs import list_runs, read_events

SMALL = ["context_tokens=192", "target_tokens=64", "lora_rank=8", "lora_alpha=16", "eval_every_steps=0",
         "checkpoint_every_seconds=0", "eval_fraction=0.0"]


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def steps_in(run_dir):
    return [e.step for e in read_events(run_dir) if isinstance(e, protocol.StepMetrics)]


def long_run_command(repo, output, name) -> list[str]:
    """`elite-tui run` of far more steps than a test waits for."""
    command = [sys.executable, "-m", "elite_tui.cli", "run", "--repo", str(repo), "--output", str(output),
               "--run-name", name, "--tier", "1", "--max-steps", "100000"]
    for setting in SMALL:
        command += ["--set", setting]
    return command


def end_both(controller, run_dir) -> None:
    """Whatever a test left running: the controller and its training child."""
    if controller.poll() is None:
        controller.kill()
    pid = live_child_pid(run_dir)
    if pid:
        os.kill(pid, signal.SIGKILL)


def test_training_outlives_a_sighup_to_its_controller_and_attach_takes_it_back(tiny_repo, tmp_path):
    output = tmp_path / "runs"
    run_dir = output / "drop"
    command = long_run_command(tiny_repo, output, "drop")
    # SIGHUP at its default, as in a login shell: under nohup (or a CI runner that ignores it) the controller would
    # inherit "ignore" and outlive the hang-up this test sends.
    controller = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        wait_for(lambda: len(steps_in(run_dir)) >= 2, 180, "the first steps")
        assert ControllerLock(run_dir).holder() == controller.pid
        os.kill(controller.pid, signal.SIGHUP)  # what a dropped SSH session sends
        assert controller.wait(timeout=30) != 0
        child = live_child_pid(run_dir)
        assert child is not None, "the training child died with its controller"
        os.kill(child, signal.SIGHUP)  # even a hang-up sent to the child itself does not end it
        seen = len(steps_in(run_dir))
        wait_for(lambda: len(steps_in(run_dir)) >= seen + 3, 60, "steps after the drop")

        assert [run.live for run in list_runs(output)] == [True]
        attached = AttachedRun(run_dir)
        second = subprocess.run([sys.executable, "-m", "elite_tui.cli", "attach", str(run_dir), "--print"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "controls" in second.stderr  # one controller at a time
        history, asked = [], []
        for event in attached.events():
            history.append(event)
            if isinstance(event, protocol.StepMetrics) and event.step >= seen + 5 and not asked:
                asked.append(attached.checkpoint_now())
            if isinstance(event, protocol.CheckpointSaved) and event.reason == "requested":
                assert attached.stop()
        assert asked == [True]
        assert isinstance(history[0], protocol.Started), "attach starts from the full history"
        reasons = [e.reason for e in history if isinstance(e, protocol.CheckpointSaved)]
        assert reasons[:1] == ["requested"] and reasons[-1] == "signal"
        assert isinstance(history[-1], protocol.Finished) and history[-1].stopped_early
        wait_for(lambda: live_child_pid(run_dir) is None, 30, "the child to exit")
        assert list_runs(output)[0].resumable
    finally:
        end_both(controller, run_dir)


def test_a_sigterm_to_the_run_command_checkpoints_and_stops_the_training(tiny_repo, tmp_path):
    """`timeout`, a scheduler's time limit or `kill` end the command: the run ends with it, checkpointed, instead of
    training on detached, holding the GPU that the next run's pre-flight then finds taken."""
    output = tmp_path / "runs"
    run_dir = output / "term"
    command = long_run_command(tiny_repo, output, "term")
    controller = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
    try:
        wait_for(lambda: len(steps_in(run_dir)) >= 2, 180, "the first steps")
        child = live_child_pid(run_dir)
        assert child is not None
        os.kill(controller.pid, signal.SIGTERM)
        out, err = controller.communicate(timeout=90)
        assert controller.returncode == 0, err
        assert "stopping (SIGTERM)" in err and "stopped at step" in out
        assert "continue it: elite-tui resume " in out
        wait_for(lambda: live_child_pid(run_dir) is None, 30, "the child to exit")
        events = read_events(run_dir)
        assert [e.reason for e in events if isinstance(e, protocol.CheckpointSaved)][-1:] == ["stop"]  # as a Ctrl+C
        assert isinstance(events[-1], protocol.Finished) and events[-1].stopped_early
        assert list_runs(output)[0].resumable
    finally:
        end_both(controller, run_dir)


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "controller.lock").write_text(str(dead.pid))
    lock = ControllerLock(tmp_path)
    assert lock.holder() is None
    lock.acquire()
    assert (tmp_path / "controller.lock").read_text() == str(os.getpid())
    lock.release()
    assert not (tmp_path / "controller.lock").exists()


def test_attach_refuses_a_run_that_is_not_training(tmp_path, capsys):
    from elite_tui.cli import main

    (tmp_path / "config.yaml").write_text(json.dumps({"model": "demo"}))
    assert main(["attach", str(tmp_path)]) == 2
    assert "nothing is training" in capsys.readouterr().err


def test_attach_follows_a_resumed_run_past_its_first_session_and_an_early_signal_is_kept(tiny_repo, tmp_path):
    """The history ends with the first session's Finished, but a resumed child is training: attach follows it to
    its own end. A "checkpoint now" sent the moment child.pid appears (torch still importing) is honoured, not the
    signal's default action that ended the child."""
    import threading

    from elite_core.config import default_config
    from elite_core.runner import TrainingProcess

    config = default_config("demo", str(tiny_repo), str(tmp_path / "runs"), run_name="again", max_steps=3,
                            context_tokens=192, target_tokens=64, lora_rank=8, lora_alpha=16, eval_every_steps=0,
                            checkpoint_every_seconds=0, eval_fraction=0.0)
    first = list(TrainingProcess.start(config).events())
    assert isinstance(first[-1], protocol.Finished) and first[-1].step == 3
    run_dir = config.run_dir
    config.replace(max_steps=6).save(run_dir / "config.yaml")
    (run_dir / "child.pid").unlink()

    process = TrainingProcess.spawn(run_dir, resume=True)
    wait_for(lambda: (run_dir / "child.pid").exists(), 60, "the resumed child's pid file")
    os.kill(int((run_dir / "child.pid").read_text()), signal.SIGUSR1)
    drained = []
    reader = threading.Thread(target=lambda: drained.extend(process.events()), daemon=True)
    reader.start()
    attached = list(AttachedRun(run_dir).events())
    reader.join(timeout=240)

    assert isinstance(drained[-1], protocol.Finished) and drained[-1].step == 6
    assert isinstance(attached[-1], protocol.Finished) and attached[-1].step == 6
    assert sum(isinstance(e, protocol.Started) for e in attached) == 2
    assert [e.step for e in attached if isinstance(e, protocol.StepMetrics)] == [1, 2, 3, 4, 5, 6]
    assert any(isinstance(e, protocol.CheckpointSaved) and e.reason == "requested" for e in drained)


def test_a_refused_second_run_leaves_the_live_run_directory_as_it_was(tiny_repo, tmp_path, capsys):
    """Another live controller holds the run directory (its first run is still building the dataset, before any
    child exists): a second `run` there is refused before it writes anything."""
    from elite_tui.cli import main

    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "controller.lock").write_text(str(holder.pid))
        code = main(["run", "--repo", str(tiny_repo), "--output", str(tmp_path / "runs"), "--run-name", "busy",
                     "--tier", "1", "--max-steps", "3", "--preflight", "off"])
        assert code == 2
        assert f"another elite-tui (pid {holder.pid}) controls" in capsys.readouterr().err
        assert sorted(path.name for path in run_dir.iterdir()) == ["controller.lock"]
    finally:
        holder.kill()
        holder.wait()
