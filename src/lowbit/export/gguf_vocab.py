"""The tokenizer of a GGUF file: copied from the source GGUF when there is one, else built from the Hugging Face
tokenizer (byte-level BPE, as llama.cpp's converter does for ``gpt2``-style vocabularies)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf

from ..errors import ModelError


def copy_vocab(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copy every ``tokenizer.*`` key of the GGUF file ``source`` into ``writer``; returns the number of tokens."""
    reader = gguf.GGUFReader(source)
    tokens = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
        if name == gguf.Keys.Tokenizer.LIST:
            tokens = len(field.data)
    if not tokens:
        raise ModelError(f"{source} holds no tokenizer (no {gguf.Keys.Tokenizer.LIST}): export from its Hugging Face "
                         "folder instead")
    return tokens


def _bpe_vocab(folder: Path) -> gguf.vocab.BpeVocab:
    """gguf-py's reading of a saved byte-level BPE tokenizer, or a :class:`ModelError` naming what to do."""
    try:
        return gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ModelError(f"the model's tokenizer is not a byte-level BPE one that lowbit can describe in GGUF ({exc}); "
                         "export from a .gguf source, whose tokenizer is copied") from None


def build_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> int:
    """Write a Hugging Face byte-level BPE ``tokenizer`` as GGUF keys: tokens (padded with unused ``[PAD{i}]`` up to
    the embedding table's ``vocab_size`` rows), their types (special tokens CONTROL), merges, special token ids and
    the chat template. The pre-tokenizer is written as ``default`` (llama.cpp names known ones by a hash the
    converter computes; unknown ones fall back to it). Returns the number of tokens."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab = _bpe_vocab(Path(folder))
        special = gguf.vocab.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        entries = list(vocab.all_tokens())
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    tokens = [text if isinstance(text, bytes) else text.encode() for text, _, _ in entries]
    types = [gguf.TokenType.CONTROL if i in special_ids else kind for i, (_, _, kind) in enumerate(entries)]
    if len(tokens) > vocab_size:
        raise ModelError(f"the tokenizer has {len(tokens)} tokens but the embedding table only {vocab_size} rows: "
                         "pass the tokenizer that belongs to this model")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    return len(tokens)
