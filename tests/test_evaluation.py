"""Compile rate: the parse checks on known texts, and greedy completions of a real demo model on held-out files."""

import pytest

from elite_core.dataset import build_dataset
from elite_core.evaluation import (check_completion, evaluate_compile_rate, heldout_prompts,
                                   read_evaluation, tree_sitter_parser, unit_starts, write_evaluation)

PREFIX = "import os\n\n\ndef first():\n    return 1\n\n\n"


@pytest.mark.parametrize("completion, verdict", [
    ("def second(x):\n    return x + 1\n\n\ndef third(", "parses"),
    ("def second(x):\n    return (x +\n\ndef third(", "syntax error"),
    ("def second(x):\n    values = [1,\n", "unfinished"),
    ("def second(x):\n    return x\n", "parses"),
    ("@decorator\ndef second():\n    pass\nelse_value = 1\n", "parses"),
    # A comment before the unit is not the unit: the broken function after it is judged
    ("# Add one.\ndef second(x):\n    return x +\n\n\ndef third():\n    pass\n", "syntax error"),
    # Column-0 lines inside a string, a bracket or after a backslash do not start a unit
    ('USAGE = """\nusage: tool [options]\ndef not_code\n"""\n\n\ndef third(', "parses"),
    ('def second():\n    return f"""\nselect {1}\nfrom t\n"""\n\n\ndef third(', "parses"),
    ('NAMES = [\n"a",\n"b",\n]\n\n\ndef third(', "parses"),
    ('TOTAL = 1 + \\\n2\n\n\ndef third(', "parses"),
    ('DOC = """\nstill open\n', "unfinished"),
])
def test_python_completions_are_judged_in_their_file(completion, verdict):
    assert check_completion(PREFIX, completion, "Python") == verdict


def test_tree_sitter_judges_other_languages():
    assert tree_sitter_parser("JavaScript") is not None, "tree-sitter-language-pack (<1.0, grammars bundled) is missing"
    prefix = "const a = 1;\nfunction f() { return 1; }\n"
    assert unit_starts(prefix, "JavaScript") == [0, 13]
    assert check_completion(prefix, "function g(x) { return x + 1; }\nfunction h(", "JavaScript") == "parses"
    assert check_completion(prefix, "function g(x) { return x + ; }\nfunction h(", "JavaScript") == "syntax error"
    assert check_completion(prefix, "function g(x) { return x", "JavaScript") == "unfinished"
    rust = "fn a() -> i32 { 1 }\n"
    assert check_completion(rust, "fn b() -> i32 { 2 }\nfn c(", "Rust") == "parses"
    # A doc comment before a broken function does not pass for it
    assert check_completion(prefix, "/** Doc. */\nfunction g(x) { return x + ; }\nfunction h() {}\n",
                            "JavaScript") == "syntax error"
    assert check_completion(rust, "/// Doc.\nfn b() -> i32 { 2 + }\nfn c() {}\n", "Rust") == "syntax error"


def test_a_file_that_does_not_parse_gives_no_prompt():
    with pytest.raises(SyntaxError):
        unit_starts("def broken(:\n", "Python")


def test_greedy_completions_of_a_real_model_before_and_after(tmp_path, tiny_repo):
    from peft import LoraConfig, get_peft_model

    from elite_core.demo_model import demo_model, demo_tokenizer

    (tiny_repo / "web.js").write_text("const a = 1;\nfunction f() { return a; }\nfunction g() { return 2; }\n")
    dataset_dir = tmp_path / "dataset"
    build_dataset(str(tiny_repo), dataset_dir, tokenizer_source="demo", eval_fraction=0.3, seed=3)
    tokenizer = demo_tokenizer()
    prompts = heldout_prompts(dataset_dir, tokenizer, count=3)
    assert 1 <= len(prompts) <= 3
    for prompt in prompts:
        assert prompt.prefix_text and prompt.reference_text
        # the cut is where a top-level unit starts, so the real text before it parses on its own
        assert check_completion(prompt.prefix_text, prompt.reference_text, prompt.language) in ("parses", "unfinished")

    model = get_peft_model(demo_model(0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    result = evaluate_compile_rate(model, tokenizer, dataset_dir, context_tokens=128, target_tokens=24, prompts=3)
    assert result.before.prompts == result.after.prompts == len(prompts)
    assert result.before.generated_tokens > 0
    for rate in (result.before, result.after):
        assert rate.parses + rate.syntax_errors + rate.unfinished == rate.prompts
    # LoRA starts at zero: before training the adapter changes nothing, so both passes agree exactly
    assert [c.verdict for c in result.before.checks] == [c.verdict for c in result.after.checks]
    write_evaluation(tmp_path, result)
    assert read_evaluation(tmp_path)["after"]["prompts"] == len(prompts)


def test_completions_run_in_the_training_autocast_where_adapters_are_fp32_beside_bf16_weights(tmp_path, tiny_repo):
    """On a GPU the base is bf16, peft keeps the adapters in fp32, and the engine stops peft casting the adapters'
    input (lean_layers.share_adapter_inputs: right under the training's autocast); generating outside that autocast
    failed the compile rate of every GPU run ("expected mat1 and mat2 to have the same dtype", H200). The same model
    on a CPU."""
    import torch
    from peft import LoraConfig, get_peft_model

    from elite_core.demo_model import demo_model, demo_tokenizer
    from elite_core.lean_layers import share_adapter_inputs

    build_dataset(str(tiny_repo), tmp_path / "dataset", tokenizer_source="demo", eval_fraction=0.3, seed=3)
    model = get_peft_model(demo_model(0).to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert share_adapter_inputs(model) > 0
    settings = dict(context_tokens=128, target_tokens=8, prompts=1)
    with pytest.raises(RuntimeError, match="dtype"):
        evaluate_compile_rate(model, demo_tokenizer(), tmp_path / "dataset", **settings)
    result = evaluate_compile_rate(model, demo_tokenizer(), tmp_path / "dataset", **settings,
                                   forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert result.after.prompts == 1 and result.after.generated_tokens > 0
