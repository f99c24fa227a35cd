import json
import math

import pytest

from elite_core import protocol


EVENTS = [
    protocol.Started(run_dir="/r", pid=1, device="cpu", total_steps=10, tokens_per_step=4608, trainable_params=5,
                     total_params=50, predicted_peak_bytes=123, start_step=0, time=1.0),
    protocol.StepMetrics(step=3, epoch=0.5, loss=2.5, lr=1e-4, tokens_per_s=1000.0, memory_bytes=2**30,
                         elapsed_s=3.0, grad_norm=0.7, time=2.0),
    protocol.EvalMetrics(step=3, loss=2.4, perplexity=math.exp(2.4), time=3.0),
    protocol.CheckpointSaved(step=3, path="/r/checkpoints/step-00000003", reason="requested", seconds=0.2, time=4.0),
    protocol.Warning(message="careful", time=5.0),
    protocol.Error(message="boom", traceback="Traceback ...", kind="oom", time=6.0),
    protocol.Finished(step=10, final_loss=1.0, adapter_path="/r/adapter", report_path="/r/report.md",
                      stopped_early=False, elapsed_s=9.0, time=7.0),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_every_event_round_trips(event):
    line = protocol.encode(event)
    assert "\n" not in line
    payload = json.loads(line)
    assert payload["type"] == event.type and payload["v"] == protocol.PROTOCOL_VERSION
    assert protocol.decode_event(line) == event


def test_step_events_carry_step_and_loss_for_jsonl_readers():
    payload = json.loads(protocol.encode(EVENTS[1]))
    assert payload["step"] == 3 and payload["loss"] == 2.5


@pytest.mark.parametrize("command", [protocol.CheckpointNow(), protocol.Stop(checkpoint=False)], ids=lambda c: c.type)
def test_commands_round_trip(command):
    assert protocol.decode_command(protocol.encode(command)) == command


@pytest.mark.parametrize("line, problem", [
    ("not json", "not a JSON line"),
    ('{"v": 1}', "no 'type'"),
    ('{"type": "step", "v": 99}', "protocol version"),
    ('{"type": "nonsense", "v": 1}', "unknown message type"),
    ('{"type": "step", "v": 1, "step": 1}', "bad 'step' message"),
])
def test_bad_lines_raise_protocol_errors(line, problem):
    with pytest.raises(protocol.ProtocolError, match=problem):
        protocol.decode_event(line)


def test_an_event_is_not_a_command():
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_command(protocol.encode(EVENTS[4]))
