"""Offline byte-level tokenizer for tiny DeepSeek-V4 test checkpoints.

The vocabulary is the V4 special strings (ids 0..14, BOS = 0 and EOS = 1 as in
the real model; the other ids are ours, the real ones are unknown) followed by
the 256 bytes (id = ``len(SPECIAL_TOKENS) + byte``). There are no merges, so any
UTF-8 text encodes to one token per byte and decodes back exactly. Building it is
deterministic and needs no data or network.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from v4_plugin.text.chat import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    PAD,
    PREVIEW_PROFILE,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    EffortProfile,
    build_chat_template,
)

SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    PAD,
    USER,
    ASSISTANT,
    LATEST_REMINDER,
    THINK_START,
    THINK_END,
    DSML,
    *TASK_TOKENS.values(),
)
"""Single-token strings, in id order (BOS = 0, EOS = 1, PAD = 2, ...)."""

CONTROL_TOKENS = frozenset({BOS, EOS, PAD})
"""Tokens marked ``special`` (dropped by ``skip_special_tokens``); the others must
survive decoding so reasoning and tool-call parsers can see them."""

MODEL_MAX_LENGTH = 1 << 20


def _byte_alphabet() -> list[str]:
    """GPT-2 byte-to-unicode mapping: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tokenizer() -> Tokenizer:
    """Build the byte-level BPE tokenizer (no merges) with the V4 special tokens."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *_byte_alphabet()])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [
            AddedToken(token, special=token in CONTROL_TOKENS, normalized=False)
            for token in SPECIAL_TOKENS
        ]
    )
    return tokenizer


def write_tokenizer(out_dir: pathlib.Path, profile: EffortProfile = PREVIEW_PROFILE) -> int:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)``
    as a ``PreTrainedTokenizerFast`` carrying the V4 chat template with the
    reasoning-effort ``profile``. No BOS is added on encode: the chat encoding writes it.

    Returns:
        The vocabulary size.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": build_chat_template(profile),
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out_dir / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return tokenizer.get_vocab_size()
