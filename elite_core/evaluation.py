"""Held-out compile rate: does the model's greedy completion of a held-out file still parse in that file?

Each prompt is a held-out file cut where a top-level definition starts; the model sees up to the run's context window
before the cut and generates the run's target window greedily (KV cache on). The first top-level unit it writes is
parsed together with the real text before it: Python with `ast`, other languages with tree-sitter grammars from
tree-sitter-language-pack. A completion that never finishes its first unit within the target window counts as
"unfinished", not as parsed. The same prompts run with the adapter disabled (before) and enabled (after).
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EVALUATION_FILE = "evaluation.json"
DEFAULT_PROMPTS = 16
TREE_SITTER_NAMES = {
    "JavaScript": "javascript", "TypeScript": "typescript", "TSX": "tsx", "Go": "go", "Rust": "rust", "C": "c",
    "C++": "cpp", "Java": "java", "C#": "csharp", "Ruby": "ruby", "PHP": "php", "Kotlin": "kotlin",
    "Scala": "scala", "Swift": "swift", "Shell": "bash", "Lua": "lua", "Haskell": "haskell", "OCaml": "ocaml",
    "Julia": "julia", "R": "r", "Elixir": "elixir", "Dart": "dart", "Zig": "zig",
}
PYTHON_CONTINUATION_WORDS = frozenset({"else", "elif", "except", "finally"})
PYTHON_CONTINUATION_MARKS = (")", "]", "}", "#", "@")
"""Column-0 lines that do not start a new top-level unit in Python (a decorator belongs to what follows it)."""
MAX_COMPLETION_TOKENS = 512
"""Completions stop here even when the target window is longer: the check reads the first definition written, and
greedy decoding of a 32K target for every prompt would take longer than many training runs."""


@dataclass(frozen=True)
class HeldOutPrompt:
    path: str
    language: str
    prefix_text: str
    """The file's text before the cut: the context the completion must parse in."""
    reference_text: str
    """What the file really holds after the cut (for reading the report, not for scoring)."""


@dataclass(frozen=True)
class CompletionCheck:
    path: str
    language: str
    verdict: str
    """"parses", "syntax error" or "unfinished"."""


@dataclass(frozen=True)
class CompileRate:
    label: str
    """"before" (adapter disabled) or "after"."""
    prompts: int
    parses: int
    syntax_errors: int
    unfinished: int
    generated_tokens: int
    elapsed_s: float
    checks: tuple[CompletionCheck, ...]

    @property
    def rate(self) -> float:
        return self.parses / self.prompts if self.prompts else 0.0


@dataclass(frozen=True)
class CompileEvaluation:
    before: CompileRate
    after: CompileRate
    target_tokens: int
    context_tokens: int

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("before", "after"):
            data[key]["rate"] = getattr(self, key).rate
        return data


def tree_sitter_parser(language: str):
    """A parser for a manifest language name, or None when tree-sitter-language-pack has no grammar for it."""
    name = TREE_SITTER_NAMES.get(language)
    if name is None:
        return None
    try:
        from tree_sitter_language_pack import get_parser

        return get_parser(name)
    except Exception:  # the package is missing, or this version cannot load the grammar offline
        return None


def can_check(language: str) -> bool:
    return language == "Python" or tree_sitter_parser(language) is not None


def _python_unit_starts(text: str) -> list[int]:
    """Character offsets of the top-level statements of a Python file (decorators belong to their definition)."""
    tree = ast.parse(text)
    line_offsets = np.cumsum([0] + [len(line) for line in text.splitlines(keepends=True)])
    starts = []
    for node in tree.body:
        line = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        starts.append(int(line_offsets[line - 1]))
    return starts


def _tree_sitter_unit_starts(text: str, parser) -> list[int]:
    data = text.encode("utf-8")
    root = parser.parse(data).root_node
    if root.has_error:
        raise SyntaxError("the file itself does not parse")
    return [len(data[:child.start_byte].decode("utf-8", errors="replace")) for child in root.named_children]


def unit_starts(text: str, language: str) -> list[int]:
    """Where each top-level unit of a file starts; raises SyntaxError when the file itself does not parse."""
    if language == "Python":
        return _python_unit_starts(text)
    parser = tree_sitter_parser(language)
    if parser is None:
        raise SyntaxError(f"no grammar for {language}")
    return _tree_sitter_unit_starts(text, parser)


PYTHON_UNIT_KEYWORDS = ("def", "class", "async")
"""Column-0 words that start a unit even inside an unclosed bracket: a bracket cannot hold a statement, so the
completion left the bracket open and moved on (a syntax error), rather than going on inside it."""


def _python_line_kinds(completion: str) -> tuple[set[int], set[int], int | None]:
    """(rows that begin a logical line, rows inside a multi-line string, the row of an inconsistent dedent or None),
    1-based, from Python's own tokenizer: a
    column-0 line inside a string, a bracket or after a backslash does not start a unit. Unfinished text (an open
    bracket or string at the end) is read as far as it goes."""
    import io
    import tokenize

    starts: set[int] = set()
    in_string: set[int] = set()
    bad_dedent = None
    at_start = True
    try:
        for token in tokenize.generate_tokens(io.StringIO(completion).readline):
            if token.type == tokenize.NEWLINE:
                at_start = True
            elif token.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                continue
            else:
                if at_start:
                    starts.add(token.start[0])
                    at_start = False
                # Only string tokens (and an f-string's middle parts) span rows: the rows after their first.
                in_string.update(range(token.start[0] + 1, token.end[0] + 1))
    except tokenize.TokenError as error:
        message, (row, _) = error.args
        if "string" in message:  # everything after an unterminated string's first line is inside it
            in_string.update(range(row + 1, completion.count("\n") + 2))
    except (IndentationError, SyntaxError) as error:
        bad_dedent = error.lineno  # the unit ends with that line, and ast then calls it the syntax error it is
    return starts, in_string, bad_dedent


def _first_python_unit(completion: str) -> str | None:
    """The completion up to where its second top-level unit starts; None if it never gets that far. Comments and
    blank lines before the first unit are not a unit of their own."""
    logical_starts, in_string, bad_dedent = _python_line_kinds(completion)
    offset = 0
    seen_code = False
    after_decorator = False
    for row, line in enumerate(completion.splitlines(keepends=True), start=1):
        first_word = re.match(r"\w*", line).group()
        decorator = line.startswith("@")
        column_zero = bool(line[:1].strip()) and row not in in_string
        opens_statement = row in logical_starts or first_word in PYTHON_UNIT_KEYWORDS
        starts_unit = column_zero and opens_statement and (
            decorator or (not line.startswith(PYTHON_CONTINUATION_MARKS) and first_word not in PYTHON_CONTINUATION_WORDS))
        if starts_unit and seen_code and not after_decorator:
            return completion[:offset]
        if bad_dedent is not None and row >= bad_dedent:
            return completion[:offset + len(line)]
        if line.strip() and not line.lstrip().startswith("#"):
            seen_code = True
            after_decorator = decorator or (after_decorator and not starts_unit)
        offset += len(line)
    return None


def check_python(prefix: str, completion: str) -> str:
    unit = _first_python_unit(completion)
    if unit is not None:
        try:
            ast.parse(prefix + unit)
            return "parses"
        except SyntaxError:
            return "syntax error"
    # The first unit ran to the end of the window: it passes only if it is already complete up to its last full line.
    complete_lines = completion[:completion.rfind("\n") + 1]
    try:
        ast.parse(prefix + complete_lines)
        return "parses" if complete_lines.strip() else "unfinished"
    except SyntaxError:
        return "unfinished"


def check_tree_sitter(prefix: str, completion: str, parser) -> str:
    prefix_bytes = len(prefix.encode("utf-8"))
    root = parser.parse((prefix + completion).encode("utf-8")).root_node
    # Comments (extras in every grammar; an ERROR node may be one too, and counts) are not units: a doc comment must
    # not stand in for the code it precedes.
    generated = [child for child in root.children
                 if child.end_byte > prefix_bytes and not (child.is_extra and not child.is_error)]
    if not generated:
        return "unfinished"
    # A first unit that starts inside the real text is one the completion merged into: judge the merged unit.
    first = generated[0]
    if len(generated) == 1:
        return "parses" if not first.has_error else "unfinished"
    return "parses" if not first.has_error else "syntax error"


def check_completion(prefix: str, completion: str, language: str) -> str:
    if language == "Python":
        return check_python(prefix, completion)
    parser = tree_sitter_parser(language)
    if parser is None:
        raise ValueError(f"no grammar for {language}")
    return check_tree_sitter(prefix, completion, parser)


def heldout_prompts(dataset_dir: str | Path, tokenizer, count: int = DEFAULT_PROMPTS, split: str = "eval") -> list[HeldOutPrompt]:
    """One prompt per held-out file that parses in a language we can check, cut before its middle top-level unit."""
    from elite_core.dataset import TOKEN_DTYPE, read_manifest

    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if manifest is None:
        return []
    length = int(manifest["split_tokens"].get(split, 0))
    if not length:
        return []
    tokens = np.memmap(dataset_dir / f"{split}.tokens", dtype=TOKEN_DTYPE, mode="r", shape=(length,))
    entries = sorted((e for e in manifest["files"] if e.get("status") == "kept" and e.get("split") == split),
                     key=lambda e: e["path"])
    prompts = []
    for entry in entries:
        if len(prompts) >= count:
            break
        language = entry.get("language", "")
        if not can_check(language):
            continue
        text = tokenizer.decode(tokens[entry["start"]:entry["end"]].tolist(), skip_special_tokens=True)
        try:
            starts = [s for s in unit_starts(text, language) if s > 0]
        except (SyntaxError, ValueError):
            continue
        if not starts:
            continue
        cut = starts[len(starts) // 2]
        prompts.append(HeldOutPrompt(path=entry["path"], language=language, prefix_text=text[:cut],
                                     reference_text=text[cut:]))
    return prompts


def compile_rate(model, tokenizer, prompts: list[HeldOutPrompt], context_tokens: int, target_tokens: int,
                 label: str, device: str = "cpu", forward_context: Callable[[], AbstractContextManager] = nullcontext
                 ) -> CompileRate:
    """Greedy completions of every prompt with the KV cache, each judged in its file, inside `forward_context`: the
    training's autocast on a GPU, where peft keeps the adapters in fp32 beside bf16 weights (without it the adapted
    layers fail on the mixed dtypes)."""
    import torch

    started = time.monotonic()
    checks = []
    generated_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for prompt in prompts:
            ids = tokenizer(prompt.prefix_text, add_special_tokens=False)["input_ids"][-context_tokens:]
            input_ids = torch.tensor([ids], device=device)
            with torch.no_grad(), forward_context():
                output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=min(target_tokens, MAX_COMPLETION_TOKENS), do_sample=False, use_cache=True,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_ids = output[0, input_ids.shape[1]:].tolist()
            generated_tokens += len(new_ids)
            completion = tokenizer.decode(new_ids, skip_special_tokens=True)
            verdict = check_completion(prompt.prefix_text, completion, prompt.language)
            checks.append(CompletionCheck(path=prompt.path, language=prompt.language, verdict=verdict))
    finally:
        if was_training:
            model.train()
    return CompileRate(
        label=label, prompts=len(checks), parses=sum(c.verdict == "parses" for c in checks),
        syntax_errors=sum(c.verdict == "syntax error" for c in checks),
        unfinished=sum(c.verdict == "unfinished" for c in checks), generated_tokens=generated_tokens,
        elapsed_s=time.monotonic() - started, checks=tuple(checks),
    )


def evaluate_compile_rate(model, tokenizer, dataset_dir: str | Path, context_tokens: int, target_tokens: int,
                          device: str = "cpu", prompts: int = DEFAULT_PROMPTS,
                          forward_context: Callable[[], AbstractContextManager] = nullcontext) -> CompileEvaluation | None:
    """Before (adapter disabled) and after (adapter on) on the same held-out prompts; None without held-out files
    that a parser can check."""
    held_out = heldout_prompts(dataset_dir, tokenizer, prompts)
    if not held_out:
        return None
    with model.disable_adapter():
        before = compile_rate(model, tokenizer, held_out, context_tokens, target_tokens, "before", device,
                              forward_context)
    after = compile_rate(model, tokenizer, held_out, context_tokens, target_tokens, "after", device, forward_context)
    return CompileEvaluation(before=before, after=after, target_tokens=target_tokens, context_tokens=context_tokens)


def evaluate_run(engine, prompts: int = DEFAULT_PROMPTS) -> CompileEvaluation | None:
    """The child's hook after training: evaluate the engine's model and keep the result in RUN_DIR/evaluation.json."""
    from elite_core.model_loading import load_tokenizer
    from elite_core.training import forward_context as training_context

    config = engine.config
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    result = evaluate_compile_rate(engine.model, tokenizer, engine.dataset_dir, config.context_tokens,
                                   config.target_tokens, device=engine.device, prompts=prompts,
                                   forward_context=lambda: training_context(engine.setup_choice,
                                                                            engine.model.config.hidden_size))
    if result is not None:
        write_evaluation(engine.run_dir, result)
    return result


def write_evaluation(run_dir: str | Path, result: CompileEvaluation) -> Path:
    path = Path(run_dir) / EVALUATION_FILE
    path.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    return path


def read_evaluation(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / EVALUATION_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
