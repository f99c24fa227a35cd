"""The built-in demo: a small Llama-architecture model and a byte-level tokenizer, no download needed.

The weights ship with the package (DEMO_WEIGHTS, 1.8 MB): the architecture below pretrained on the CPython 3.11
standard library by bench/pretrain_demo_model.py (held-out loss 0.99 nats per byte; bench/results/
demo-pretrain-h200.txt). So the demo fine-tunes a model that already knows Python, as a user's run does.
"""

from __future__ import annotations

from pathlib import Path

DEMO_HIDDEN = 128
DEMO_LAYERS = 2
DEMO_HEADS = 4
DEMO_KV_HEADS = 2
DEMO_INTERMEDIATE = 384
DEMO_MAX_POSITIONS = 262144 + 32768
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|file|>")
DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights" / "model.safetensors"


def demo_tokenizer():
    """A fast byte-level tokenizer: 256 byte symbols plus three specials, no merges, so it needs no training data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|file|>"],
    )
    tokenizer.model_max_length = DEMO_MAX_POSITIONS
    return tokenizer


def demo_model_config():
    from transformers import LlamaConfig

    vocab_size = 256 + len(SPECIAL_TOKENS)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=DEMO_HIDDEN,
        intermediate_size=DEMO_INTERMEDIATE,
        num_hidden_layers=DEMO_LAYERS,
        num_attention_heads=DEMO_HEADS,
        num_key_value_heads=DEMO_KV_HEADS,
        max_position_embeddings=DEMO_MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=257,
    )


def demo_model(seed: int = 0, pretrained: bool = True):
    """The pretrained demo model; pretrained=False: random weights from `seed` (the seed also draws anything
    initialised later, such as LoRA's A matrices)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(demo_model_config())
    if pretrained:
        load_demo_weights(model)
    return model


def load_demo_weights(model) -> None:
    """The shipped pretrained weights into a model built from demo_model_config (any dtype or device)."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(DEMO_WEIGHTS), strict=False)
    # Buffers such as rotary frequencies are rebuilt from the config; every weight must come from the file.
    missing = [name for name in missing if not name.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"{DEMO_WEIGHTS} does not match the demo model: missing {missing}, unexpected {unexpected}")


def save_demo_model(directory: str | Path, seed: int = 0, pretrained: bool = True) -> Path:
    """Write the demo model and tokenizer with save_pretrained, as tests do to get a 'real' local model directory."""
    directory = Path(directory)
    demo_model(seed, pretrained).save_pretrained(directory)
    demo_tokenizer().save_pretrained(directory)
    return directory
