"""Dataset build end to end on real files with the demo tokenizer (and a small locally trained BPE)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from elite_core import dataset
from elite_core.dataset import (
    IGNORE_INDEX,
    BuildProgress,
    DatasetError,
    DatasetSummary,
    TokenEncoder,
    WindowDataset,
    build_dataset,
    format_summary,
    preview_text,
)
from elite_core.demo_model import demo_tokenizer

EOS_ID = 256
PAD_ID = 257


def write(root: Path, relative: str, content: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def make_repo(root: Path, files: int = 10) -> Path:
    for index in range(files):
        write(root, f"pkg/mod_{index:02d}.py", f"def function_{index}():\n    return {index}  # file {index}\n")
    write(root, "README.md", "# demo repository\n")
    return root


def manifest_files(dataset_dir: Path) -> dict[str, dict]:
    return {e["path"]: e for e in json.loads((dataset_dir / "manifest.json").read_text())["files"]}


def stream(dataset_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(dataset_dir / f"{split}.tokens", dtype="<u4")


def test_build_summary_languages_and_progress(tmp_path):
    repo = make_repo(tmp_path / "repo")
    write(repo, "tools/run.sh", "echo hi\n")
    write(repo, "assets/logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    seen: list[BuildProgress] = []

    summary = build_dataset(repo, tmp_path / "ds", workers=1, progress=seen.append)

    assert summary.rebuilt and summary.files == 12
    by_language = {stats.language: stats for stats in summary.languages}
    assert by_language["Python"].files == 10 and by_language["Shell"].files == 1
    assert sum(s.tokens for s in summary.languages) + summary.files == summary.tokens
    assert sum(s.bytes for s in summary.languages) == summary.bytes
    assert {(s.path, s.reason) for s in summary.skipped} == {("assets/logo.png", "binary (NUL bytes)")}
    assert seen[-1].fraction == 1.0 and seen[-1].files_done == seen[-1].files_total == 13
    assert summary.train_tokens == len(stream(tmp_path / "ds", "train"))
    assert DatasetSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
    text = format_summary(summary)
    assert "Python" in text and "binary (NUL bytes): assets/logo.png" in text and "windows per tier" in text


def test_files_are_separated_by_eos_and_indexed(tmp_path):
    repo = make_repo(tmp_path / "repo", files=3)
    build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.0)
    tokens = stream(tmp_path / "ds", "train")
    tokenizer = demo_tokenizer()
    for path, entry in manifest_files(tmp_path / "ds").items():
        assert tokens[entry["end"]] == EOS_ID
        assert tokenizer.decode(tokens[entry["start"]:entry["end"]].tolist()) == (repo / path).read_text()
    assert (tokens == EOS_ID).sum() == 4


def test_unchanged_repo_is_not_rebuilt_and_a_change_reuses_the_rest(tmp_path):
    repo = make_repo(tmp_path / "repo")
    first = build_dataset(repo, tmp_path / "ds", workers=1)
    assert first.rebuilt and first.files_tokenized == 11
    token_file_mtime = (tmp_path / "ds" / "train.tokens").stat().st_mtime_ns

    again = build_dataset(repo, tmp_path / "ds", workers=1)
    assert not again.rebuilt and again.files == first.files and again.tokens == first.tokens
    assert (tmp_path / "ds" / "train.tokens").stat().st_mtime_ns == token_file_mtime

    write(repo, "pkg/mod_03.py", "def changed():\n    return 'new content'\n")
    write(repo, "pkg/added.py", "ADDED = True\n")
    os.utime(repo / "pkg" / "mod_05.py")  # touched, same content: hashed, not tokenised
    changed = build_dataset(repo, tmp_path / "ds", workers=1)
    assert changed.rebuilt and changed.files == 12
    assert changed.files_tokenized == 3
    assert {"pkg/mod_03.py", "pkg/added.py"} <= set(manifest_files(tmp_path / "ds"))
    full = build_dataset(repo, tmp_path / "fresh", workers=1)
    for split in ("train", "eval"):
        assert np.array_equal(stream(tmp_path / "ds", split), stream(tmp_path / "fresh", split))

    changed_settings = build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.3)
    assert changed_settings.rebuilt and changed_settings.files_tokenized == 0
    assert full.eval_files < changed_settings.eval_files


def test_the_runs_inside_the_repository_are_not_training_data_and_do_not_trigger_a_rebuild(tmp_path, monkeypatch):
    # `elite-tui` in a repository writes its runs to ./elite-runs, which a user's .gitignore rarely names
    repo = make_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    output_dir, dataset_dir = Path("elite-runs"), Path("elite-runs") / "run-1" / "dataset"
    write(repo, "elite-runs/run-0/report.md", "# elite-tui report: run-0\n")
    write(repo, "elite-runs/run-0/config.yaml", "model: demo\n")
    first = build_dataset(".", dataset_dir, workers=1, output_dir=output_dir)
    assert first.files == 11
    assert not any(path.startswith("elite-runs/") for path in manifest_files(dataset_dir))
    assert ("elite-runs/", "elite-tui output directory") in {(s.path, s.reason) for s in first.skipped}
    # a run writing its events while it trains changes nothing the walk sees
    write(repo, "elite-runs/run-1/events.jsonl", '{"type": "step"}\n')
    again = build_dataset(".", dataset_dir, workers=1, output_dir=output_dir)
    assert not again.rebuilt and again.files == first.files
    # without the output directory named the runs' files are read; the dataset being built never is
    unnamed = build_dataset(".", "inside", workers=1)
    rebuilt = build_dataset(".", "inside", workers=1)
    assert any(path.startswith("elite-runs/run-0/") for path in manifest_files(Path("inside")))
    assert not any(path.startswith("inside/") for path in manifest_files(Path("inside")))
    assert unnamed.files > first.files and not rebuilt.rebuilt


def test_eval_split_is_by_file(tmp_path):
    repo = make_repo(tmp_path / "repo", files=20)
    summary = build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.2, seed=7)
    files = manifest_files(tmp_path / "ds")
    eval_paths = {p for p, e in files.items() if e["split"] == "eval"}
    assert summary.eval_files == len(eval_paths) == round(0.2 * 21)
    tokenizer = demo_tokenizer()
    train_text = tokenizer.decode(stream(tmp_path / "ds", "train").tolist())
    eval_text = tokenizer.decode(stream(tmp_path / "ds", "eval").tolist())
    for path in files:
        content = (repo / path).read_text()
        assert (content in eval_text) == (path in eval_paths)
        assert (content in train_text) == (path not in eval_paths)
    other_seed = build_dataset(repo, tmp_path / "ds2", workers=1, eval_fraction=0.2, seed=8)
    assert other_seed.eval_files == summary.eval_files
    assert {p for p, e in manifest_files(tmp_path / "ds2").items() if e["split"] == "eval"} != eval_paths


def test_exact_duplicates_are_removed(tmp_path):
    repo = make_repo(tmp_path / "repo", files=3)
    write(repo, "copy/one.py", (repo / "pkg" / "mod_01.py").read_text())
    write(repo, "copy/two.py", (repo / "pkg" / "mod_01.py").read_text())
    summary = build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.0)
    assert summary.duplicates_removed == 2 and summary.files == 4
    reasons = {s.path: s.reason for s in summary.skipped}
    assert reasons["pkg/mod_01.py"] == "duplicate of copy/one.py"
    assert reasons["copy/two.py"] == "duplicate of copy/one.py"
    text = demo_tokenizer().decode(stream(tmp_path / "ds", "train").tolist())
    assert text.count("def function_1()") == 1


def test_copies_reuse_the_first_decision_but_keep_their_own_language(tmp_path):
    repo = tmp_path / "repo"
    source = "from .z_models import User\n\ndef view():\n    return User()\n"
    write(repo, "app/a_views.py", source)
    write(repo, "app/notes.txt", source)
    secret = "AWS = '" + "AKIA" + "Z3MHQ7RT2XW4PB5N" + "'\n"
    write(repo, "a/keys.py", secret)
    write(repo, "b/keys.py", secret)
    summary = build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.0)
    files = manifest_files(tmp_path / "ds")
    assert files["app/a_views.py"]["language"] == "Python" and set(files["app/a_views.py"]["imports"]) == {"z_models", "User"}
    assert files["app/notes.txt"]["language"] == "Text" and files["app/notes.txt"]["imports"] == []
    assert files["app/notes.txt"]["status"] == "duplicate"
    assert {item.path for item in summary.secrets_excluded} == {"a/keys.py", "b/keys.py"}


def test_tasks_are_capped_by_files_and_bytes():
    small = [(f"s{i}", 10, 0) for i in range(40)]
    big = [(f"b{i}", dataset.TASK_CHUNK_BYTES // 2, 0) for i in range(5)]
    chunks = dataset._chunks(small + big)
    assert [len(chunk) for chunk in chunks] == [16, 16, 8 + 2, 2, 1]
    assert [c for chunk in chunks for c in chunk] == small + big


def test_related_files_are_placed_together_imports_first(tmp_path):
    repo = tmp_path / "repo"
    write(repo, "app/a_views.py", "from .z_models import User\n\ndef view():\n    return User()\n")
    write(repo, "app/z_models.py", "class User:\n    pass\n")
    write(repo, "app/m_util.py", "import os\n")
    write(repo, "lib/helpers.py", "def helper():\n    return 1\n")
    build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.0)
    order = [p for p, _ in sorted(manifest_files(tmp_path / "ds").items(), key=lambda kv: kv[1]["start"])]
    assert order == ["app/m_util.py", "app/z_models.py", "app/a_views.py", "lib/helpers.py"]


def test_windows_shapes_and_label_masking(tmp_path):
    repo = tmp_path / "repo"
    write(repo, "a.py", "a" * 49 + "\n")  # 50 tokens + EOS
    write(repo, "b.py", "b" * 29 + "\n")  # 30 tokens + EOS -> stream of 82
    build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.0)
    windows = WindowDataset(tmp_path / "ds", "train", context_tokens=24, target_tokens=8)
    tokens = stream(tmp_path / "ds", "train").astype(np.int64)
    assert len(tokens) == 82 and len(windows) == 3

    input_ids, labels = windows[0]
    assert input_ids.shape == labels.shape == (32,) and input_ids.dtype == labels.dtype == np.int64
    assert np.array_equal(input_ids, tokens[:32])
    assert (labels[:24] == IGNORE_INDEX).all() and np.array_equal(labels[24:], tokens[24:32])

    input_ids, labels = windows[2]  # 18 real tokens, then padding
    assert np.array_equal(input_ids[:18], tokens[64:82]) and (input_ids[18:] == PAD_ID).all()
    assert (labels[:10] == IGNORE_INDEX).all() and np.array_equal(labels[10:18], tokens[74:82])
    assert (labels[18:] == IGNORE_INDEX).all()
    assert np.array_equal(windows[-1][0], input_ids)
    with pytest.raises(IndexError):
        windows[3]


def test_a_repo_smaller_than_one_window_yields_one_window(tmp_path):
    repo = tmp_path / "repo"
    write(repo, "tiny.py", "x = 1\n")
    summary = build_dataset(repo, tmp_path / "ds", workers=1)
    windows = WindowDataset(tmp_path / "ds", "train", context_tokens=4096, target_tokens=512)
    assert summary.train_windows(4608) == len(windows) == 1
    assert summary.eval_windows(4608) == len(WindowDataset(tmp_path / "ds", "eval", 4096, 512)) == 0
    input_ids, labels = windows[0]
    assert input_ids.shape == (4608,) and (input_ids[7:] == PAD_ID).all()
    assert np.array_equal(labels[:7], input_ids[:7]) and (labels[7:] == IGNORE_INDEX).all()


def test_preview_shows_paths_and_text(tmp_path):
    repo = make_repo(tmp_path / "repo", files=2)
    write(repo, "odd name\n.py", "odd = True\n")
    build_dataset(repo, tmp_path / "ds", workers=1, eval_fraction=0.0)
    text = preview_text(tmp_path / "ds")
    assert "==== pkg/mod_00.py (" in text and "def function_0():\n    return 0" in text
    assert "==== odd name\\n.py (" in text and "odd = True" in text
    assert text.index("pkg/mod_00.py") < text.index("def function_0")
    assert preview_text(tmp_path / "ds", max_files=1).count("========================\n") == 1


def test_worker_processes_give_the_same_files(tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "repo", files=40)
    write(repo, "k.py", "AWS = '" + "AKIA" + "Z3MHQ7RT2XW4PB5N" + "'\n")
    serial = build_dataset(repo, tmp_path / "serial", workers=1)
    monkeypatch.setattr(dataset, "MIN_BYTES_FOR_WORKER_PROCESSES", 0)
    monkeypatch.setattr(dataset, "TASK_CHUNK_FILES", 3)
    parallel = build_dataset(repo, tmp_path / "parallel", workers=2)
    assert parallel.secrets_excluded == serial.secrets_excluded and parallel.files == 41
    for split in ("train", "eval"):
        assert np.array_equal(stream(tmp_path / "serial", split), stream(tmp_path / "parallel", split))
    assert not (tmp_path / "parallel" / "shards.partial").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_cancelled_build_stops_early_and_keeps_the_previous_one(tmp_path, monkeypatch, workers):
    """Quitting the app mid-build cancels it: it stops after the chunk in hand (worker processes ended), and the
    dataset directory still holds the build before it, whole."""
    repo = make_repo(tmp_path / "repo", files=30)
    first = build_dataset(repo, tmp_path / "data", workers=1)
    manifest_before = (tmp_path / "data" / "manifest.json").read_bytes()
    for index in range(30):
        write(repo, f"pkg/mod_{index:02d}.py", f"def changed_{index}():\n    return {index}\n")
    monkeypatch.setattr(dataset, "MIN_BYTES_FOR_WORKER_PROCESSES", 0)
    monkeypatch.setattr(dataset, "TASK_CHUNK_FILES", 2)
    asked: list[bool] = []

    def cancelled() -> bool:  # asked after the walk, then after each chunk of 2 files: says stop after the third
        asked.append(len(asked) >= 3)
        return asked[-1]

    with pytest.raises(dataset.BuildCancelled):
        build_dataset(repo, tmp_path / "data", workers=workers, cancelled=cancelled)
    assert asked == [False, False, False, True]  # 3 of the 15 chunks done, then no more
    assert (tmp_path / "data" / "manifest.json").read_bytes() == manifest_before
    assert not (tmp_path / "data" / "shards.partial").exists()
    assert dataset.complete_build_summary(tmp_path / "data").files == first.files
    rebuilt = build_dataset(repo, tmp_path / "data", workers=1)
    assert rebuilt.rebuilt and rebuilt.files == first.files


def test_byte_table_matches_the_tokenizer():
    tokenizer = demo_tokenizer()
    encoder = TokenEncoder(tokenizer.backend_tokenizer.to_str())
    assert encoder.byte_table is not None
    text = "def f():\n\treturn 'ü€😀' # <|endoftext|>\r\n" + "".join(map(chr, range(32, 600)))
    slow = np.array(encoder.backend.encode(text, add_special_tokens=False).ids, dtype="<u4")
    assert np.array_equal(encoder.encode(text), slow)
    assert EOS_ID not in encoder.encode("<|endoftext|>")


def test_a_trained_bpe_tokenizer_round_trips(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    repo = make_repo(tmp_path / "repo", files=6)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([(repo / "pkg" / f"mod_0{i}.py").read_text() for i in range(6)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    model_dir = tmp_path / "bpe"
    tokenizer.save_pretrained(model_dir)
    LlamaConfig(vocab_size=backend.get_vocab_size()).to_json_file(model_dir / "config.json")
    encoder = TokenEncoder(backend.to_str())
    assert encoder.byte_table is None
    sample = (repo / "pkg" / "mod_03.py").read_text() + "unseen wörds ✓"
    assert encoder.encode(sample).tolist() == backend.encode(sample, add_special_tokens=False).ids

    summary = build_dataset(repo, tmp_path / "ds", tokenizer_source=str(model_dir), workers=1, eval_fraction=0.0)
    assert summary.tokens < summary.bytes  # merges: fewer tokens than bytes
    text = preview_text(tmp_path / "ds", tokenizer_source=str(model_dir))
    assert "def function_5():\n    return 5  # file 5" in text
    with pytest.raises(DatasetError, match="built with tokenizer"):
        preview_text(tmp_path / "ds", tokenizer_source="demo")


def test_errors_are_one_clear_line(tmp_path):
    with pytest.raises(DatasetError, match="repository not found: .*nope"):
        build_dataset(tmp_path / "nope", tmp_path / "ds")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        build_dataset(tmp_path / "file.txt", tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="nothing to train on: .* has no files"):
        build_dataset(tmp_path / "empty", tmp_path / "ds")
    write(tmp_path / "binaries", "a.bin", bytes(range(256)))
    write(tmp_path / "binaries", ".env", "A=1\n")
    with pytest.raises(DatasetError, match=r"nothing to train on: everything in .* was skipped, 2 files \(1 binary, 1 secret: file name: environment file"):
        build_dataset(tmp_path / "binaries", tmp_path / "ds2")
    with pytest.raises(DatasetError, match="nothing to train on"):
        build_dataset(tmp_path / "binaries", tmp_path / "ds2")
    # A skipped directory counts once, as a directory, however many files it holds.
    for index in range(5):
        write(tmp_path / "vendored", f"node_modules/pkg{index}.js", "module.exports = 1;\n")
    write(tmp_path / "vendored", "blank.py", "")
    with pytest.raises(DatasetError, match=r"was skipped, 1 file and 1 directory \("):
        build_dataset(tmp_path / "vendored", tmp_path / "ds3")
    with pytest.raises(DatasetError, match="no dataset in"):
        WindowDataset(tmp_path / "missing", "train", 8, 4)


def test_a_missing_secret_scanner_fails_the_build_with_its_name_instead_of_hanging(tmp_path):
    """Worker processes that cannot import detect-secrets made the pool restart them forever (seen on a GPU machine
    without the package); the build must stop at once and say what to install."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    line = "def handler_{index}(request):\n    return {{'status': {index}, 'body': request.body[:{index}]}}\n"
    for number in range(12):  # over MIN_BYTES_FOR_WORKER_PROCESSES, so the build uses worker processes
        write(repo, f"pkg/module_{number}.py", "".join(line.format(index=i) for i in range(number * 9000, (number + 1) * 9000)))
    blocker = tmp_path / "no-detect-secrets" / "detect_secrets"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named detect_secrets (blocked by the test)')\n")
    script = (f"from elite_core.dataset import build_dataset\n"
              f"build_dataset({str(repo)!r}, {str(tmp_path / 'ds')!r}, workers=2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(Path(__file__).resolve().parents[1])])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "DatasetError" in result.stderr and "pip install detect-secrets" in result.stderr, result.stderr[-2000:]


def test_skips_are_grouped_by_kind_each_keeping_its_detail():
    from elite_core.dataset import SkippedFile, _group_reasons

    skipped = (SkippedFile("a.min.js", "minified (mean line 791 chars)"),
               SkippedFile("b.svg", "minified (a line over 5000 chars)"),
               SkippedFile("c.png", "binary file"), SkippedFile("d.png", "binary file"),
               SkippedFile("e.py", "duplicate of f.py"))
    assert _group_reasons(skipped, examples=3) == [
        "       2  binary file: c.png, d.png",
        "       2  minified: a.min.js (mean line 791 chars), b.svg (a line over 5000 chars)",
        "       1  duplicate of f.py: e.py",
    ]
