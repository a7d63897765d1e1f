"""A tiny word-level tokenizer over the vocabulary of qwen_hf_tiny (no download): Qwen's special
tokens at the ids the tiny configs use, words ``w20`` … ``w999`` at ids 20 … 999, and a chat template
shaped like Qwen2.5-VL's (one ``<|vision_start|><|image_pad|><|vision_end|>`` per image item).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qwen_hf_tiny import END, FIRST_WORD, IMAGE, START, VIDEO, VOCAB

SPECIAL = {"<unk>": 0, "<|endoftext|>": 1, "<|im_end|>": 2, "<|im_start|>": 3, IMAGE: "<|image_pad|>",
           VIDEO: "<|video_pad|>", START: "<|vision_start|>", END: "<|vision_end|>"}
WORDS = {"user": 4, "assistant": 5, "system": 6, "a": 7, "picture": 8, "describe": 9}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vocabulary() -> dict[str, int]:
    vocab = {name: i for name, i in SPECIAL.items() if isinstance(i, int)}
    vocab.update({name: i for i, name in SPECIAL.items() if isinstance(i, int) and isinstance(name, str)})
    vocab.update(WORDS)
    vocab.update({f"<|reserved_{i}|>": i for i in range(14, FIRST_WORD)})
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, VOCAB)})
    assert sorted(vocab.values()) == list(range(VOCAB)), "ids must cover the vocabulary exactly once"
    return vocab


def save_tiny_tokenizer(directory) -> PreTrainedTokenizerFast:
    """Writes the tokenizer files into ``directory`` and returns the tokenizer."""
    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    specials = [name for name in vocabulary() if name.startswith("<")]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[s for s in specials if s not in
                                                              ("<unk>", "<|endoftext|>", "<|im_end|>")])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(Path(directory)))
    return fast
