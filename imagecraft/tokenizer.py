"""A standard CLIPTokenizer whose byte-level BPE vocabulary is trained on a corpus of our own.

The real CLIP merges table cannot be downloaded here, so small models (the built-in shapes model, the tests'
tiny pipelines) train their own with the `tokenizers` library, with CLIP's normalisation, pre-tokenisation and
`</w>` end-of-word suffix. Every byte, with and without the suffix, is in the vocabulary, so any text encodes.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def train_clip_tokenizer(texts: list[str], vocab_size: int = 1000, model_max_length: int = 77) -> CLIPTokenizer:
    """Trains a BPE vocabulary on `texts` and returns it as a CLIPTokenizer (save it with `save_pretrained`)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte characters
    base = SPECIAL + alphabet + [c + "</w>" for c in alphabet]
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be at least {len(base)} (the bytes, with and without </w>), got {vocab_size}")
    reference = CLIPTokenizer()  # empty, but it carries CLIP's normaliser and pre-tokeniser
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=SPECIAL[1]))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(base) + len(alphabet), special_tokens=SPECIAL,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(texts, trainer)

    learned = bpe.get_vocab()
    vocab = {token: i for i, token in enumerate(base)}
    for token in sorted(learned, key=learned.get):
        vocab.setdefault(token, len(vocab))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
