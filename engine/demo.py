"""A tiny demo model folder: random Llama weights, a byte-level BPE tokenizer, two PEFT adapters.

It is the embedded default for `loraplex serve` and a fixture for tests, so it must be made in a few
seconds on a CPU from nothing but code in this file (no downloads).
"""

from __future__ import annotations

from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|im_end|>"
PAD = "<|end_of_text|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = (BOS, PAD, IM_START, EOS)

# ChatML: simple to read, and its turn end doubles as the stop token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough varied English for BPE to learn a few hundred useful merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello, world! How are you today? I am fine, thank you. What is the weather like in the city?
Language models predict the next token from the tokens before it. Each customer may bring an adapter
that changes how the shared base model answers, without copying the whole model for every tenant.
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
The sea was calm and blue, and the robot counted the waves: one, two, three, four, five, six, seven.
Numbers like 12, 345 and 6789 appear in text, as do dates such as 2024-05-17 and times like 10:30.
Please summarise the following paragraph in one sentence. Translate this sentence into French.
def add(a, b):\n    return a + b\nprint(add(2, 3))\nfor i in range(10):\n    print(i * i)\n
Émilie a réservé une table au café près de la gare. Größe, naïve, coöperate, résumé, déjà vu.
Servers stream tokens back to clients as soon as they are ready, so the first token arrives quickly.
""".strip()


def write_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE on the built-in text and save it where AutoTokenizer finds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-style: encode() prepends BOS; the chat template writes it itself.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(out_dir))


def demo_config(vocab_size: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }
