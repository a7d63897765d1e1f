"""The digits demo's tokenizer: a small byte-level BPE (the ``tokenizers`` library) with Qwen2.5-VL's markers.

Trained on the demo corpus (``data.demo_text``) in well under a second, deterministically, and shaped
like Qwen2's own tokenizer in miniature: NFC, Qwen2's pre-tokenizer regex (digits one by one, words
with their leading space), byte-level tokens, no BOS / EOS added. The vocabulary is ``VOCAB_SIZE``
ids: ``<|endoftext|>`` at 0 (Qwen's padding token), the byte-level alphabet of printable ASCII and
``\\n``, the BPE merges, ``<|unused_k|>`` fillers if the corpus runs out of merges, then the markers at
the top (``SPECIAL_TOKENS``). Those ids are the ones ``pretzel.tiny`` and the demo VLM configs use;
``vlm_token_fields()`` gives them as ``vlm.QwenTextConfig`` fields, so configs take them from here.
A character outside the alphabet is dropped by ``encode`` (the corpus holds none).

``write_tokenizer(tokenizer, directory)`` writes ``tokenizer.json`` and ``tokenizer_config.json``
(with a Qwen-style chat template): ``transformers.AutoTokenizer.from_pretrained(directory)`` and
``train.tasks.starflow2_data.HFTokenizer(directory)`` both read it and give the same ids.
"""

from __future__ import annotations

import json
import os
import string
from typing import Iterable

from starflow2_jax import atomic

VOCAB_SIZE = 256
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = {ENDOFTEXT: 0, "<|vision_start|>": 250, "<|vision_end|>": 251, "<|image_pad|>": 252,
                  "<|video_pad|>": 253, "<|im_start|>": 254, "<|im_end|>": 255}
FIRST_TOP_ID = min(i for i in SPECIAL_TOKENS.values() if i)  # the BPE vocabulary ends below it
ALPHABET = tuple(string.printable[:95]) + ("\n",)  # printable ASCII (space included) and the newline
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2.5-VL-7B-Instruct)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vlm_token_fields() -> dict:
    """The ``vlm.QwenTextConfig`` fields this tokenizer fixes: vocab_size, the marker ids, EOS
    (``<|im_end|>``, as Qwen2.5-VL-Instruct's), padding (``<|endoftext|>``) and no BOS."""
    return dict(vocab_size=VOCAB_SIZE, image_token_id=SPECIAL_TOKENS["<|image_pad|>"],
                video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
                vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
                vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"], bos_token_id=None,
                eos_token_ids=(SPECIAL_TOKENS["<|im_end|>"],), pad_token_id=SPECIAL_TOKENS[ENDOFTEXT])


def train_tokenizer(texts: Iterable[str]):
    """A ``tokenizers.Tokenizer`` trained on ``texts`` (strings without markers, e.g.
    ``demo_text.text_pieces(corpus)``); see the module docstring for the vocabulary's layout.

    Raises ValueError when ``texts`` is empty.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no text to train on; expected the corpus' text pieces")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted({piece for c in ALPHABET for piece, _ in byte_level.pre_tokenize_str(c)})
    trainer = trainers.BpeTrainer(vocab_size=FIRST_TOP_ID, special_tokens=[ENDOFTEXT], initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size < FIRST_TOP_ID:  # the corpus ran out of merges: fill up to the markers' ids
        tokenizer.add_special_tokens([f"<|unused_{k}|>" for k in range(FIRST_TOP_ID - size)])
    tokenizer.add_special_tokens([name for name, i in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]) if i])
    check_special_ids(tokenizer)
    return tokenizer


def check_special_ids(tokenizer, expected: dict[str, int] | None = None) -> None:
    """ValueError naming each marker whose id in ``tokenizer`` differs from ``expected`` (default
    ``SPECIAL_TOKENS``), and a vocabulary larger than the highest expected id + 1."""
    expected = SPECIAL_TOKENS if expected is None else expected
    wrong = {name: (tokenizer.token_to_id(name), want) for name, want in expected.items()
             if tokenizer.token_to_id(name) != want}
    if wrong:
        raise ValueError("tokenizer markers at the wrong ids: " + ", ".join(
            f"{name} is {have} (expected {want})" for name, (have, want) in wrong.items()))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > max(expected.values()) + 1:
        raise ValueError(f"tokenizer vocabulary of {size} ids: expected at most {max(expected.values()) + 1}")


def write_tokenizer(tokenizer, directory: os.PathLike | str) -> str:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (which must not exist
    or be empty; it appears complete or not at all). Returns the directory."""
    config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=32768, clean_up_tokenization_spaces=False,
                  eos_token="<|im_end|>", pad_token=ENDOFTEXT, bos_token=None, unk_token=None,
                  additional_special_tokens=[n for n in SPECIAL_TOKENS if n not in (ENDOFTEXT, "<|im_end|>")],
                  chat_template=CHAT_TEMPLATE)
    with atomic.output_directory(directory) as tmp:
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return os.fspath(directory)


def demo_tokenizer(documents):
    """The demo tokenizer of a corpus (``demo_text.demo_corpus``'s documents): ``train_tokenizer`` on
    their text pieces."""
    from starflow2_jax.data.demo_text import text_pieces

    return train_tokenizer(text_pieces(documents))
