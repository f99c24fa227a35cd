"""Build the training set from a repository: scan, drop secrets, tokenise in worker processes, pack into token files.

Layout of a dataset directory:
  manifest.json   settings, tokenizer identity, and one entry per file seen (hash, decision, split, token range)
  train.tokens    flat little-endian uint32 token stream: file, EOS, file, EOS, ...
  eval.tokens     the held-out files, same format

Files are tokenised into per-worker shard files first (so results never travel through a pipe and memory stays
bounded), then copied into the split files in training order with copy_file_range.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from elite_core import repo_scan
from elite_core.repo_scan import display_path

DATASET_FORMAT_VERSION = 1
FILE_RULES_VERSION = 2
"""Bump when the rules that decide a file's fate change (secrets, junk): no verdict of an older build is then reused.
2: keyword rules by file type, "token" keys, more key formats, names and lock files (2026-12-07)."""
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")
TOKEN_DTYPE = np.dtype("<u4")
IGNORE_INDEX = -100
# Below this much new text, starting worker processes costs more than it saves.
MIN_BYTES_FOR_WORKER_PROCESSES = 8 * 1024 * 1024
PROGRESS_INTERVAL_S = 0.1
TASK_CHUNK_FILES = 16
TASK_CHUNK_BYTES = 4 * 1024 * 1024
# After a file this large, freed memory goes back to the OS (a 1 MB file briefly takes ~50 MB of encoder buffers).
TRIM_AFTER_FILE_BYTES = 256 * 1024


class DatasetError(Exception):
    """A problem the user must fix, in one line: repository missing or unreadable, nothing trainable, ..."""


class BuildCancelled(Exception):
    """The caller's `cancelled` said stop (the app quits or leaves the screen): the previous build is left as it was."""


@dataclass(frozen=True)
class SkippedFile:
    path: str
    """Display form of the path (control characters and undecodable bytes escaped)."""
    reason: str


@dataclass(frozen=True)
class LanguageStats:
    language: str
    files: int
    bytes: int
    tokens: int


@dataclass(frozen=True)
class BuildProgress:
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        if self.bytes_total > 0:
            return min(1.0, self.bytes_done / self.bytes_total)
        return 1.0 if self.files_total == 0 else min(1.0, self.files_done / self.files_total)

    @property
    def files_per_s(self) -> float:
        return self.files_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_done / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _window_count(stream_tokens: int, window_tokens: int) -> int:
    if stream_tokens <= 0 or window_tokens <= 0:
        return 0
    return max(1, math.ceil(stream_tokens / window_tokens))


@dataclass(frozen=True)
class DatasetSummary:
    dataset_dir: str
    files: int
    """Files in the token streams (after skips, secrets and duplicates)."""
    bytes: int
    tokens: int
    """train_tokens + eval_tokens."""
    train_tokens: int
    """Length of the train stream, EOS separators included."""
    eval_tokens: int
    train_files: int
    eval_files: int
    languages: tuple[LanguageStats, ...]
    skipped: tuple[SkippedFile, ...]
    secrets_excluded: tuple[SkippedFile, ...]
    duplicates_removed: int
    rebuilt: bool
    tokenizer_source: str = "demo"
    elapsed_s: float = 0.0
    files_tokenized: int = 0
    """Files read and tokenised by this build; the rest came from the previous build."""

    def train_windows(self, window_tokens: int) -> int:
        return _window_count(self.train_tokens, window_tokens)

    def eval_windows(self, window_tokens: int) -> int:
        return _window_count(self.eval_tokens, window_tokens)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["languages"] = [asdict(item) for item in self.languages]
        data["skipped"] = [asdict(item) for item in self.skipped]
        data["secrets_excluded"] = [asdict(item) for item in self.secrets_excluded]
        return data

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetSummary":
        data = dict(d)
        data["languages"] = tuple(LanguageStats(**item) for item in data.get("languages", ()))
        data["skipped"] = tuple(SkippedFile(**item) for item in data.get("skipped", ()))
        data["secrets_excluded"] = tuple(SkippedFile(**item) for item in data.get("secrets_excluded", ()))
        return cls(**data)


def _load_tokenizer(source: str, trust_remote_code: bool):
    from elite_core.model_loading import ModelSourceError, load_tokenizer

    try:
        return load_tokenizer(source, trust_remote_code=trust_remote_code)
    except ModelSourceError as error:
        raise DatasetError(str(error)) from error


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-symbol table, which the tokenizers ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            symbols.append(256 + extra)
            extra += 1
    return {byte: chr(symbol) for byte, symbol in zip(printable, symbols)}


_BYTE_PROBE_TEXTS = (
    "def f(x):\n\treturn x  # comment\r\n",
    "".join(chr(c) for c in range(1, 128)),
    "naïve café – ελληνικά – 日本語 – emoji \U0001f600 – <|endoftext|> <|pad|>",
)


class TokenEncoder:
    """Text -> uint32 token ids with a tokenizers backend, in any process; built from the backend's JSON.

    Special-token strings inside a file are encoded as text: a file must not be able to inject an EOS.
    A byte-level tokenizer without merges (the demo's) maps each UTF-8 byte to one id; that case goes through a
    256-entry table instead, after checking that the table gives exactly the backend's ids.
    """

    def __init__(self, backend_json: str):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(backend_json)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = True
        self.byte_table = self._byte_table(backend_json)

    def _byte_table(self, backend_json: str) -> np.ndarray | None:
        spec = json.loads(backend_json)
        model = spec.get("model") or {}
        pre = spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or model.get("merges") or spec.get("normalizer") or pre.get("type") != "ByteLevel":
            return None
        vocab = model.get("vocab") or {}
        try:
            table = np.array([vocab[symbol] for _, symbol in sorted(_bytes_to_unicode().items())], dtype=TOKEN_DTYPE)
        except KeyError:
            return None
        for probe in _BYTE_PROBE_TEXTS:
            fast = table[np.frombuffer(probe.encode("utf-8"), dtype=np.uint8)]
            if not np.array_equal(fast, np.array(self.backend.encode(probe, add_special_tokens=False).ids, dtype=TOKEN_DTYPE)):
                return None
        return table

    def encode(self, text: str) -> np.ndarray:
        if self.byte_table is not None:
            return self.byte_table[np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)]
        if hasattr(self.backend, "encode_batch_fast"):
            # The same ids without computing offsets: about 30 % faster on a trained BPE.
            return np.array(self.backend.encode_batch_fast([text], add_special_tokens=False)[0].ids, dtype=TOKEN_DTYPE)
        return np.array(self.backend.encode(text, add_special_tokens=False).ids, dtype=TOKEN_DTYPE)


@dataclass(frozen=True)
class _TokenizerInfo:
    source: str
    backend_json: str
    eos_id: int
    pad_id: int
    identity: str


def _tokenizer_info(source: str, trust_remote_code: bool) -> tuple[_TokenizerInfo, object]:
    tokenizer = _load_tokenizer(source, trust_remote_code)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DatasetError(f"{source}: the tokenizer is not a fast (Rust) tokenizer")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DatasetError(f"{source}: the tokenizer has no EOS token to separate files")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    backend_json = backend.to_str()
    identity = hashlib.sha256(f"{backend_json}\0{eos_id}\0{pad_id}".encode("utf-8", "surrogatepass")).hexdigest()
    return _TokenizerInfo(source, backend_json, int(eos_id), int(pad_id), identity), tokenizer


class _FileProcessor:
    """Reads, classifies, scans and tokenises one file; lives once per worker process."""

    def __init__(self, root: str, shard_dir: str, backend_json: str, max_file_bytes: int, known_verdicts: frozenset[str]):
        from elite_core.secret_filter import SecretScanner

        self.root = root
        self.max_file_bytes = max_file_bytes
        self.known_verdicts = known_verdicts
        self.encoder = TokenEncoder(backend_json)
        self.scanner = SecretScanner()
        self.shard_name = f"shard-{os.getpid()}.tokens"
        self.shard_path = os.path.join(shard_dir, self.shard_name)
        self.shard = None
        self.shard_tokens = 0
        self._malloc_trim = _malloc_trim_function()
        # Decisions by content hash: a copy of a file this worker has already seen is not scanned or tokenised again.
        self.seen: dict[str, dict] = {}

    def process(self, candidate: tuple[str, int, int]) -> dict:
        result = self._process(candidate)
        if candidate[1] >= TRIM_AFTER_FILE_BYTES:
            self.release_memory()
        return result

    def _process(self, candidate: tuple[str, int, int]) -> dict:
        relative, size_bytes, mtime_ns = candidate
        entry = {"path": relative, "size": size_bytes, "mtime_ns": mtime_ns, "language": repo_scan.language_of(relative)}
        try:
            data = repo_scan.read_file_no_follow(os.path.join(self.root, relative), self.max_file_bytes)
        except OSError as error:
            return {**entry, "status": "skipped", "reason": f"unreadable: {error.strerror or error}"}
        if len(data) > self.max_file_bytes:
            return {**entry, "status": "skipped", "reason": f"too large (grew past cap {self.max_file_bytes} bytes)"}
        digest = hashlib.sha256(data).hexdigest()
        entry["sha256"] = digest
        verdict_key = _verdict_key(digest, relative)
        if verdict_key in self.known_verdicts:
            return {**entry, "status": "cached"}
        seen = self.seen.get(verdict_key)
        if seen is None:
            seen = self.seen[verdict_key] = self._classify_and_tokenize(relative, data)
        elif seen["status"] == "kept" and seen["language"] != entry["language"]:
            # Which imports count depends on the language, which the name decides.
            seen = {**seen, "language": entry["language"],
                    "imports": repo_scan.local_import_stems(relative, repo_scan.decode_text(data)[0])}
        result = {**entry, **seen}
        result["language"] = entry["language"]
        return result

    def _classify_and_tokenize(self, relative: str, data: bytes) -> dict:
        text, how = repo_scan.decode_text(data)
        if text is None:
            return {"status": "skipped", "reason": how}
        reason = repo_scan.content_skip_reason(text)
        if reason:
            return {"status": "skipped", "reason": reason}
        finding = self.scanner.scan(text, relative)
        if finding is not None:
            return {"status": "secret", "reason": finding.reason}
        tokens = self.encoder.encode(text)
        if self.shard is None:
            self.shard = open(self.shard_path, "ab")
            self.shard_tokens = self.shard.tell() // TOKEN_DTYPE.itemsize
        offset = self.shard_tokens
        self.shard.write(tokens.tobytes())
        self.shard.flush()
        self.shard_tokens += len(tokens)
        return {
            "status": "kept",
            "decoding": how,
            "tokens": int(len(tokens)),
            "imports": repo_scan.local_import_stems(relative, text),
            "language": repo_scan.language_of(relative),
            "source": [self.shard_name, offset],
        }

    def release_memory(self) -> None:
        if self._malloc_trim is not None:
            self._malloc_trim(0)

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None


def _malloc_trim_function():
    """glibc's malloc_trim, or None: it hands the freed heap of a large file back to the OS, which keeps RSS bounded."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_worker_processor: _FileProcessor | None = None


def _worker_init(*args) -> None:
    global _worker_processor
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_processor = _FileProcessor(*args)


def _worker_process_chunk(candidates: list[tuple[str, int, int]]) -> list[dict]:
    return [_worker_processor.process(candidate) for candidate in candidates]


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _settings(tokenizer: _TokenizerInfo, max_file_bytes: int) -> dict:
    """What decides each file's fate and tokens; when any of it changes, nothing from a previous build is reused."""
    return {
        "format_version": DATASET_FORMAT_VERSION,
        "file_rules_version": FILE_RULES_VERSION,
        "tokenizer_source": tokenizer.source,
        "tokenizer_identity": tokenizer.identity,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "max_file_bytes": max_file_bytes,
        "token_dtype": TOKEN_DTYPE.str,
    }


def read_manifest(dataset_dir: str | Path) -> dict | None:
    path = Path(dataset_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _walk_fingerprint(scan: repo_scan.RepositoryScan) -> str:
    """Changes when any file appears, disappears, changes size or mtime, or a name rule decides differently."""
    digest = hashlib.sha256()
    for candidate in scan.candidates:
        digest.update(f"{candidate.relative_path}\0{candidate.size_bytes}\0{candidate.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    for record in scan.skipped:
        if record.reason == repo_scan.OWN_OUTPUT_REASON:
            continue  # the dataset directory appears with the first build: not a change of the repository
        digest.update(f"skip\0{record.relative_path}\0{record.reason}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _check_repository(repo: Path) -> None:
    if not repo.exists():
        raise DatasetError(f"repository not found: {repo}")
    if not repo.is_dir():
        raise DatasetError(f"not a directory: {repo}")
    if not os.access(repo, os.R_OK | os.X_OK):
        raise DatasetError(f"repository not readable: {repo}")


def _secret_name_reason(relative_path: str) -> str | None:
    from elite_core.secret_filter import secret_file_name_rule

    finding = secret_file_name_rule(relative_path)
    return finding.reason if finding else None


def _eval_paths(paths: list[str], eval_fraction: float, seed: int) -> set[str]:
    """Files held out, chosen by a seeded hash of the path so the choice survives unrelated changes."""
    if eval_fraction <= 0 or len(paths) < 2:
        return set()
    count = min(len(paths) - 1, max(1, round(eval_fraction * len(paths))))
    ranked = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode("utf-8", "surrogateescape")).digest())
    return set(ranked[:count])


def _training_order(entries: list[dict]) -> list[dict]:
    """Directory by directory; inside one, files a sibling imports come before the sibling (where the import is seen)."""
    by_directory: dict[str, list[dict]] = defaultdict(list)
    for entry in entries:
        directory, _, _ = entry["path"].rpartition("/")
        by_directory[directory].append(entry)
    ordered: list[dict] = []
    for directory in sorted(by_directory, key=lambda d: d.split("/")):
        ordered.extend(_imports_first(sorted(by_directory[directory], key=lambda e: e["path"])))
    return ordered


def _imports_first(siblings: list[dict]) -> list[dict]:
    by_stem: dict[str, list[int]] = defaultdict(list)
    for index, entry in enumerate(siblings):
        by_stem[repo_scan.file_stem(entry["path"])].append(index)
    dependents: dict[int, set[int]] = defaultdict(set)
    pending = [0] * len(siblings)
    for index, entry in enumerate(siblings):
        for stem in entry.get("imports", ()):
            for dependency in by_stem.get(stem, ()):
                if dependency != index and index not in dependents[dependency]:
                    dependents[dependency].add(index)
                    pending[index] += 1
    import heapq

    ready = [index for index, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for dependent in sorted(dependents[index]):
            pending[dependent] -= 1
            if pending[dependent] == 0:
                heapq.heappush(ready, dependent)
    # Import cycles: the rest in name order.
    placed = set(order)
    order.extend(index for index in range(len(siblings)) if index not in placed)
    return [siblings[index] for index in order]


def _copy_range(source_fd: int, target_fd: int, source_offset: int, target_offset: int, count: int) -> None:
    while count > 0:
        try:
            copied = os.copy_file_range(source_fd, target_fd, count, source_offset, target_offset)
        except (AttributeError, OSError):
            copied = os.pwrite(target_fd, os.pread(source_fd, min(count, 1 << 24), source_offset), target_offset)
        if copied <= 0:
            raise DatasetError("token shard shorter than its index says: rebuild with a clean dataset directory")
        count -= copied
        source_offset += copied
        target_offset += copied


def _assemble_split(dataset_dir: Path, split: str, entries: list[dict], eos_id: int, sources: dict[str, Path]) -> int:
    """Write one split's token file in the given order; set each entry's start/end; return the stream length."""
    target_path = dataset_dir / f"{split}.tokens.partial"
    eos_bytes = np.array([eos_id], dtype=TOKEN_DTYPE).tobytes()
    item = TOKEN_DTYPE.itemsize
    open_sources: dict[str, int] = {}
    target_fd = os.open(target_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    position = 0
    try:
        for entry in entries:
            source_name, source_offset = entry["source"]
            if source_name not in open_sources:
                open_sources[source_name] = os.open(sources[source_name], os.O_RDONLY)
            _copy_range(open_sources[source_name], target_fd, source_offset * item, position * item, entry["tokens"] * item)
            entry["start"] = position
            entry["end"] = position + entry["tokens"]
            position += entry["tokens"]
            os.pwrite(target_fd, eos_bytes, position * item)
            position += 1
    finally:
        os.close(target_fd)
        for descriptor in open_sources.values():
            os.close(descriptor)
    return position


def _emit_progress(progress, state: dict, force: bool = False) -> None:
    if progress is None:
        return
    now = time.monotonic()
    if not force and now - state["last_emit"] < PROGRESS_INTERVAL_S:
        return
    state["last_emit"] = now
    progress(BuildProgress(state["files_done"], state["files_total"], state["bytes_done"], state["bytes_total"],
                           now - state["started"]))


def build_dataset(
    repo: str | Path,
    dataset_dir: str | Path,
    *,
    tokenizer_source: str = "demo",
    trust_remote_code: bool = False,
    eval_fraction: float = 0.05,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    max_file_bytes: int = repo_scan.DEFAULT_MAX_FILE_BYTES,
    output_dir: str | Path | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> DatasetSummary:
    """Build (or reuse) the token files for `repo` in `dataset_dir`. The runs' `output_dir` and `dataset_dir` are left
    out of the walk where they lie inside the repository (the default `elite-runs` does): the runs' logs and
    reports are not training data, and a run writing there changed the walk's fingerprint while it trained.

    An unchanged repository (same files, sizes and mtimes, same settings) is not rebuilt; a changed one re-reads only
    the files whose size or mtime changed and re-tokenises only those whose content hash is new.

    `cancelled` is asked after the walk and after each chunk of files; once it says True the build raises
    BuildCancelled, its worker processes end, and the dataset directory keeps the build before this one.
    """
    started = time.monotonic()
    stop_if_cancelled = _cancel_check(cancelled)
    repo = Path(repo).expanduser()
    dataset_dir = Path(dataset_dir).expanduser()
    _check_repository(repo)
    if not 0.0 <= eval_fraction < 1.0:
        raise DatasetError(f"eval_fraction must be from 0 up to 1, got {eval_fraction}")
    tokenizer, _ = _tokenizer_info(tokenizer_source, trust_remote_code)
    settings = _settings(tokenizer, max_file_bytes)

    scan = _scan(repo, dataset_dir, output_dir, max_file_bytes)
    stop_if_cancelled()
    fingerprint = _walk_fingerprint(scan)
    previous = read_manifest(dataset_dir)
    if previous is not None and (previous.get("settings") != settings or not _split_files_intact(dataset_dir, previous)):
        previous = None
    if (
        previous is not None
        and previous.get("walk_fingerprint") == fingerprint
        and previous.get("eval_fraction") == eval_fraction
        and previous.get("seed") == seed
        and previous.get("repo") == str(repo.resolve())
    ):
        summary = DatasetSummary.from_dict({**previous["summary"], "rebuilt": False, "elapsed_s": time.monotonic() - started,
                                            "files_tokenized": 0})
        if summary.files == 0:
            raise DatasetError(_nothing_trainable_message(repo, summary))
        state = {"files_done": summary.files, "files_total": summary.files, "bytes_done": summary.bytes,
                 "bytes_total": summary.bytes, "started": started, "last_emit": 0.0}
        _emit_progress(progress, state, force=True)
        return summary

    try:
        dataset_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(f"cannot create the dataset directory {dataset_dir}: {error.strerror or error}") from error
    previous_by_path: dict[str, dict] = {}
    previous_by_hash: dict[str, dict] = {}
    previous_by_verdict_key: dict[str, dict] = {}
    if previous is not None:
        for old in previous.get("files", []):
            previous_by_path[old["path"]] = old
            if old.get("sha256") and old["status"] != "duplicate":
                previous_by_hash.setdefault(old["sha256"], old)
                previous_by_verdict_key.setdefault(_verdict_key(old["sha256"], old["path"]), old)

    entries: list[dict] = []
    to_read: list[tuple[str, int, int]] = []
    for candidate in scan.candidates:
        old = previous_by_path.get(candidate.relative_path)
        if old and old["size"] == candidate.size_bytes and old["mtime_ns"] == candidate.mtime_ns and old.get("sha256"):
            entries.append(_reuse(old, candidate.relative_path, candidate.size_bytes, candidate.mtime_ns, previous_by_hash))
        else:
            to_read.append((candidate.relative_path, candidate.size_bytes, candidate.mtime_ns))

    state = {
        "files_done": len(entries), "files_total": len(scan.candidates),
        "bytes_done": sum(e["size"] for e in entries), "bytes_total": sum(c.size_bytes for c in scan.candidates),
        "started": started, "last_emit": 0.0,
    }
    _emit_progress(progress, state, force=True)

    shard_dir = dataset_dir / "shards.partial"
    shutil.rmtree(shard_dir, ignore_errors=True)
    shard_dir.mkdir()
    try:
        read_results = _process_files(repo, shard_dir, tokenizer, max_file_bytes, frozenset(previous_by_verdict_key),
                                      to_read, workers, progress, state, stop_if_cancelled)
        stop_if_cancelled()
        for result in read_results:
            if result["status"] == "cached":
                entries.append(_reuse(previous_by_verdict_key[_verdict_key(result["sha256"], result["path"])],
                                      result["path"], result["size"], result["mtime_ns"], previous_by_hash))
            else:
                entries.append(result)
        _emit_progress(progress, state, force=True)
        summary = _finish_build(repo, dataset_dir, shard_dir, scan, entries, tokenizer, settings, fingerprint,
                                eval_fraction, seed, started, files_tokenized=len(read_results))
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return summary


def _cancel_check(cancelled: Callable[[], bool] | None) -> Callable[[], None]:
    def stop_if_cancelled() -> None:
        if cancelled is not None and cancelled():
            raise BuildCancelled("the dataset build was cancelled")

    return stop_if_cancelled


def _verdict_key(digest: str, relative_path: str) -> str:
    """What a file's verdict depends on: its content, and the kind of path (the keyword rules follow the file type)."""
    from elite_core.secret_filter import content_rules

    return f"{digest}:{content_rules(relative_path)}"


def _reuse(old: dict, path: str, size_bytes: int, mtime_ns: int, previous_by_hash: dict[str, dict]) -> dict:
    """A previous build's decision and tokens for a file with known content, under its current path."""
    # A kept file whose path-entry was a duplicate points at the copy that holds the tokens.
    source_entry = old if old["status"] != "duplicate" else previous_by_hash.get(old["sha256"], old)
    entry = {key: source_entry[key] for key in ("sha256", "status", "reason", "language", "decoding", "tokens", "imports")
             if key in source_entry}
    entry.update(path=path, size=size_bytes, mtime_ns=mtime_ns, language=repo_scan.language_of(path))
    if source_entry["status"] in ("kept", "duplicate") and "split" in source_entry:
        entry["status"] = "kept"
        entry["source"] = [f"previous:{source_entry['split']}", source_entry["start"]]
    elif source_entry["status"] == "duplicate":
        entry["status"] = "skipped"
        entry["reason"] = "previous copy lost"
    return entry


def _scan(repo: Path, dataset_dir: Path, output_dir, max_file_bytes: int) -> repo_scan.RepositoryScan:
    own_dirs = [dataset_dir, *([output_dir] if output_dir is not None else [])]
    return repo_scan.scan_repository(repo, max_file_bytes=max_file_bytes, name_rule=_secret_name_reason,
                                     output_dirs=own_dirs)


def complete_build(dataset_dir: str | Path) -> dict | None:
    """The manifest of a finished build in dataset_dir whose token files are all there, or None."""
    manifest = read_manifest(dataset_dir)
    return manifest if manifest is not None and _split_files_intact(Path(dataset_dir), manifest) else None


def complete_build_summary(dataset_dir: str | Path) -> DatasetSummary | None:
    """The summary of a finished build in dataset_dir (complete_build), as it was built; None without one."""
    manifest = complete_build(dataset_dir)
    if manifest is None or "summary" not in manifest:
        return None
    return DatasetSummary.from_dict({**manifest["summary"], "rebuilt": False, "files_tokenized": 0})


def repository_changed_since(repo: str | Path, dataset_dir: str | Path, output_dir: str | Path | None = None) -> bool:
    """Whether the repository's files (names, sizes, mtimes, name rules) differ from what the build in dataset_dir
    read, or the repository is gone; a walk only, nothing is read or tokenised."""
    manifest = complete_build(dataset_dir)
    repo = Path(repo).expanduser()
    if manifest is None or not repo.is_dir():
        return True
    max_file_bytes = manifest.get("settings", {}).get("max_file_bytes", repo_scan.DEFAULT_MAX_FILE_BYTES)
    scan = _scan(repo, Path(dataset_dir).expanduser(), output_dir, max_file_bytes)
    return manifest.get("walk_fingerprint") != _walk_fingerprint(scan)


def _split_files_intact(dataset_dir: Path, manifest: dict) -> bool:
    lengths = manifest.get("split_tokens", {})
    for split in SPLITS:
        path = dataset_dir / f"{split}.tokens"
        if not path.exists() or path.stat().st_size != lengths.get(split, -1) * TOKEN_DTYPE.itemsize:
            return False
    return True


def _chunks(candidates: list[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
    """Tasks of up to TASK_CHUNK_FILES files and about TASK_CHUNK_BYTES, so progress moves on big files too."""
    chunks: list[list[tuple[str, int, int]]] = []
    chunk: list[tuple[str, int, int]] = []
    chunk_bytes = 0
    for candidate in candidates:
        chunk.append(candidate)
        chunk_bytes += candidate[1]
        if len(chunk) >= TASK_CHUNK_FILES or chunk_bytes >= TASK_CHUNK_BYTES:
            chunks.append(chunk)
            chunk, chunk_bytes = [], 0
    if chunk:
        chunks.append(chunk)
    return chunks


def _process_files(repo, shard_dir, tokenizer, max_file_bytes, known_verdicts, to_read, workers, progress, state,
                   stop_if_cancelled):
    results: list[dict] = []
    if not to_read:
        return results
    workers = _default_workers() if workers is None else max(1, int(workers))
    init_args = (str(repo), str(shard_dir), tokenizer.backend_json, max_file_bytes, known_verdicts)
    # Walk order, not largest first: neighbouring files share words, which keeps the BPE word cache warm (13 % faster).
    chunks = _chunks(to_read)

    def record(chunk_results):
        for result in chunk_results:
            results.append(result)
            state["files_done"] += 1
            state["bytes_done"] += result["size"]
        _emit_progress(progress, state)
        stop_if_cancelled()  # leaving the pool's block terminates its workers

    _check_worker_imports()
    if workers <= 1 or sum(size for _, size, _ in to_read) < MIN_BYTES_FOR_WORKER_PROCESSES:
        processor = _FileProcessor(*init_args)
        try:
            for chunk in chunks:
                record([processor.process(candidate) for candidate in chunk])
        finally:
            processor.close()
        return results
    # spawn, not fork: the caller may be a UI with threads, and a forked child would inherit their locks.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init, initargs=init_args) as pool:
        for chunk_results in pool.imap_unordered(_worker_process_chunk, chunks):
            record(chunk_results)
    return results


def _check_worker_imports() -> None:
    """What each file processor imports, imported here first, for one message on either path: a pool whose
    initializer fails starts new workers forever, so a missing package would hang the build instead of naming itself
    (seen with detect-secrets absent)."""
    try:
        from elite_core.secret_filter import SecretScanner

        SecretScanner()
    except ImportError as exc:
        raise DatasetError(f"the secret scanner cannot load: {exc}; install it with pip install detect-secrets") from exc


def _finish_build(repo, dataset_dir, shard_dir, scan, entries, tokenizer, settings, fingerprint, eval_fraction, seed,
                  started, files_tokenized) -> DatasetSummary:
    entries.sort(key=lambda e: e["path"])
    first_by_hash: dict[str, str] = {}
    kept: list[dict] = []
    for entry in entries:
        if entry["status"] != "kept":
            continue
        original = first_by_hash.get(entry["sha256"])
        if original is not None:
            entry["status"] = "duplicate"
            entry["reason"] = f"duplicate of {display_path(original)}"
            entry["duplicate_of"] = original
            continue
        first_by_hash[entry["sha256"]] = entry["path"]
        kept.append(entry)

    held_out = _eval_paths([e["path"] for e in kept], eval_fraction, seed)
    sources = {name: shard_dir / name for name in os.listdir(shard_dir)}
    for split in SPLITS:
        sources[f"previous:{split}"] = dataset_dir / f"{split}.tokens"
    split_tokens = {}
    for split in SPLITS:
        members = _training_order([e for e in kept if (e["path"] in held_out) == (split == "eval")])
        for entry in members:
            entry["split"] = split
        split_tokens[split] = _assemble_split(dataset_dir, split, members, tokenizer.eos_id, sources)
    # The duplicates point at their original's token range, so a later build can reuse them too.
    by_path = {e["path"]: e for e in kept}
    for entry in entries:
        entry.pop("source", None)
        if entry["status"] == "duplicate":
            original = by_path[entry["duplicate_of"]]
            entry.update(split=original["split"], start=original["start"], end=original["end"])
    for split in SPLITS:
        os.replace(dataset_dir / f"{split}.tokens.partial", dataset_dir / f"{split}.tokens")

    summary = _summarize(dataset_dir, scan, entries, kept, split_tokens, tokenizer.source, started, files_tokenized)
    if not kept:
        _write_manifest(dataset_dir, repo, settings, fingerprint, eval_fraction, seed, split_tokens, entries, summary)
        raise DatasetError(_nothing_trainable_message(repo, summary))
    _write_manifest(dataset_dir, repo, settings, fingerprint, eval_fraction, seed, split_tokens, entries, summary)
    return summary


def _nothing_trainable_message(repo: Path, summary: DatasetSummary) -> str:
    records = summary.skipped + summary.secrets_excluded
    if not records:
        return f"nothing to train on: {repo} has no files (outside .gitignore)"
    reasons = defaultdict(int)
    for item in records:
        reasons[item.reason.split(" (")[0].split(",")[0]] += 1
    top = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    # A skipped directory is one record however many files it holds: count it as a directory, not a file.
    directories = sum(item.path.endswith("/") for item in records)
    files = len(records) - directories
    counted = " and ".join(part for part in (_plural(files, "file"), _plural(directories, "directory", "directories"))
                           if not part.startswith("0 "))
    return f"nothing to train on: everything in {repo} was skipped, {counted} ({top})"


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def _summarize(dataset_dir, scan, entries, kept, split_tokens, tokenizer_source, started, files_tokenized):
    languages: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for entry in kept:
        stats = languages[entry["language"]]
        stats[0] += 1
        stats[1] += entry["size"]
        stats[2] += entry["tokens"]
    language_stats = tuple(
        LanguageStats(language, files, size, tokens)
        for language, (files, size, tokens) in sorted(languages.items(), key=lambda kv: (-kv[1][2], kv[0]))
    )
    skipped, secrets = [], []
    for record in scan.skipped:
        target = secrets if record.reason.startswith("secret:") else skipped
        target.append(SkippedFile(display_path(record.relative_path), record.reason))
    for entry in entries:
        if entry["status"] in ("skipped", "duplicate"):
            skipped.append(SkippedFile(display_path(entry["path"]), entry["reason"]))
        elif entry["status"] == "secret":
            secrets.append(SkippedFile(display_path(entry["path"]), entry["reason"]))
    train = [e for e in kept if e["split"] == "train"]
    return DatasetSummary(
        dataset_dir=str(dataset_dir),
        files=len(kept),
        bytes=sum(e["size"] for e in kept),
        tokens=split_tokens["train"] + split_tokens["eval"],
        train_tokens=split_tokens["train"],
        eval_tokens=split_tokens["eval"],
        train_files=len(train),
        eval_files=len(kept) - len(train),
        languages=language_stats,
        skipped=tuple(sorted(skipped, key=lambda s: s.path)),
        secrets_excluded=tuple(sorted(secrets, key=lambda s: s.path)),
        duplicates_removed=sum(1 for e in entries if e["status"] == "duplicate"),
        rebuilt=True,
        tokenizer_source=tokenizer_source,
        elapsed_s=time.monotonic() - started,
        files_tokenized=files_tokenized,
    )


def _write_manifest(dataset_dir, repo, settings, fingerprint, eval_fraction, seed, split_tokens, entries, summary):
    manifest = {
        "repo": str(Path(repo).resolve()),
        "settings": settings,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "walk_fingerprint": fingerprint,
        "split_tokens": split_tokens,
        "summary": summary.to_dict(),
        "files": entries,
    }
    partial = dataset_dir / (MANIFEST_NAME + ".partial")
    # ensure_ascii keeps undecodable file names (surrogates) writable and readable back.
    partial.write_text(json.dumps(manifest, ensure_ascii=True), encoding="ascii")
    os.replace(partial, dataset_dir / MANIFEST_NAME)


def _require_manifest(dataset_dir: str | Path) -> dict:
    manifest = read_manifest(dataset_dir)
    if manifest is None:
        raise DatasetError(f"no dataset in {dataset_dir}: build it first")
    return manifest


def load_summary(dataset_dir: str | Path) -> DatasetSummary:
    return DatasetSummary.from_dict({**_require_manifest(dataset_dir)["summary"], "rebuilt": False})


class WindowDataset:
    """Fixed-length windows over one split's token stream, read through a numpy memmap (no torch needed).

    Window i covers stream[i*W, (i+1)*W) with W = context_tokens + target_tokens. Labels equal the input ids on the
    target part and are IGNORE_INDEX on the context part and on padding. The target part is the last target_tokens
    positions of a full window; in the last, partial window it is the last target_tokens real tokens (so a repository
    smaller than one window still trains on its tail instead of on padding).
    """

    def __init__(self, dataset_dir, split: str, context_tokens: int, target_tokens: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if context_tokens < 0 or target_tokens < 1:
            raise ValueError("context_tokens must be >= 0 and target_tokens >= 1")
        manifest = _require_manifest(dataset_dir)
        self.split = split
        self.context_tokens = context_tokens
        self.target_tokens = target_tokens
        self.window_tokens = context_tokens + target_tokens
        self.pad_id = int(manifest["settings"]["pad_id"])
        length = int(manifest["split_tokens"][split])
        path = Path(dataset_dir) / f"{split}.tokens"
        self.tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(length,)) if length else np.zeros(0, TOKEN_DTYPE)
        self._length = _window_count(length, self.window_tokens)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index) -> tuple[np.ndarray, np.ndarray]:
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"window {index} out of range 0..{self._length - 1}")
        start = index * self.window_tokens
        real = np.asarray(self.tokens[start:start + self.window_tokens], dtype=np.int64)
        input_ids = np.full(self.window_tokens, self.pad_id, dtype=np.int64)
        input_ids[:len(real)] = real
        labels = np.full(self.window_tokens, IGNORE_INDEX, dtype=np.int64)
        target_start = max(0, len(real) - self.target_tokens)
        labels[target_start:len(real)] = real[target_start:]
        return input_ids, labels


def preview_text(dataset_dir, *, split: str = "train", tokenizer_source: str = "demo", max_files: int | None = None,
                 trust_remote_code: bool = False) -> str:
    """The token file decoded back to text, each file after a separator line naming its source path."""
    manifest = _require_manifest(dataset_dir)
    info, tokenizer = _tokenizer_info(tokenizer_source, trust_remote_code)
    if info.identity != manifest["settings"]["tokenizer_identity"]:
        raise DatasetError(f"{dataset_dir} was built with tokenizer {manifest['settings']['tokenizer_source']!r}, "
                           f"not {tokenizer_source!r}")
    members = sorted((e for e in manifest["files"] if e["status"] == "kept" and e.get("split") == split),
                     key=lambda e: e["start"])
    if max_files is not None:
        members = members[:max_files]
    length = int(manifest["split_tokens"][split])
    if not length:
        return ""
    tokens = np.memmap(Path(dataset_dir) / f"{split}.tokens", dtype=TOKEN_DTYPE, mode="r", shape=(length,))
    parts = []
    for entry in members:
        text = tokenizer.decode(tokens[entry["start"]:entry["end"]].tolist(), skip_special_tokens=False)
        parts.append(f"{'=' * 24} {display_path(entry['path'])} ({entry['tokens']} tokens) {'=' * 24}\n{text}")
        if not text.endswith("\n"):
            parts.append("\n")
    return "".join(part if part.endswith("\n") else part + "\n" for part in parts)


def _group_reasons(items: tuple[SkippedFile, ...], examples: int) -> list[str]:
    """One line per kind of reason: "minified (mean line 791 chars)" and "minified (a line over 5000 chars)" are one
    kind, each example keeping its own detail (a line per distinct reason had listed 14 minified files apart)."""
    by_kind: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        reason = item.reason.split(", line ")[0]
        kind = re.split(r" \(| of ", reason, maxsplit=1)[0]
        by_kind[kind].append((item.path, reason))
    lines = []
    for kind, entries in sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        reasons = {reason for _, reason in entries}
        if len(reasons) == 1:
            heading, shown = reasons.pop(), [path for path, _ in entries[:examples]]
        else:
            heading = kind
            shown = [f"{path} ({reason[len(kind):].strip(' ()')})" for path, reason in entries[:examples]]
        more = f", ... ({len(entries) - examples} more)" if len(entries) > examples else ""
        lines.append(f"  {len(entries):>6}  {heading}: {', '.join(shown)}{more}")
    return lines


def format_summary(summary: DatasetSummary, window_tokens: int | None = None, examples: int = 3) -> str:
    """Plain text for `elite-tui dataset`: files, languages, tokens, windows, skips and secrets with their rules."""
    from elite_core.units import format_bytes

    lines = [
        f"dataset: {summary.dataset_dir} ({'built' if summary.rebuilt else 'unchanged, not rebuilt'}"
        f"{f', {summary.files_tokenized} files tokenised' if summary.rebuilt else ''}, {summary.elapsed_s:.1f} s)",
        f"files: {summary.files:,} ({format_bytes(summary.bytes)}), train {summary.train_files:,}, "
        f"eval {summary.eval_files:,}; duplicates removed {summary.duplicates_removed:,}",
        f"tokens: {summary.tokens:,} (train {summary.train_tokens:,}, eval {summary.eval_tokens:,}), "
        f"tokenizer {summary.tokenizer_source}",
    ]
    if window_tokens:
        lines.append(f"windows of {window_tokens:,} tokens: train {summary.train_windows(window_tokens):,}, "
                     f"eval {summary.eval_windows(window_tokens):,}")
    else:
        from elite_core.tiers import TIERS

        lines.append("windows per tier (train/eval): " + ", ".join(
            f"{tier.label} {summary.train_windows(tier.total_tokens):,}/{summary.eval_windows(tier.total_tokens):,}"
            for tier in TIERS))
    lines.append("languages:")
    for stats in summary.languages:
        lines.append(f"  {stats.language:<18} {stats.files:>7,} files {format_bytes(stats.bytes):>10} {stats.tokens:>14,} tokens")
    lines.append(f"skipped: {len(summary.skipped):,}")
    lines.extend(_group_reasons(summary.skipped, examples))
    lines.append(f"secrets excluded: {len(summary.secrets_excluded):,}")
    for item in summary.secrets_excluded:
        lines.append(f"  {item.path}: {item.reason}")
    return "\n".join(lines)
