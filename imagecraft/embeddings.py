"""Word embeddings of their own (textual inversion's files): a taught word gets a token whose input embedding is
trained, so the text encoder reads the word as a new vector and every prompt without it encodes exactly as before.

A fine-tune writes one file per word, `embeddings/<word>.safetensors`, holding {word: (1, dim)}: the layout diffusers'
`pipe.load_textual_inversion(file)` and AUTOMATIC1111's embeddings folder (the file's name is the word) both read.
`ImageCraftPipeline.load_lora` loads them with the LoRA beside them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FOLDER = "embeddings"


class EmbeddingError(ValueError):
    """An embedding file that cannot be used with this model; the message says why."""


def add_word_tokens(tokenizer, text_encoder, words) -> dict[str, int]:
    """Adds each of `words` that the tokenizer has no entry for as a token of its own, its input embedding
    initialised to the mean of the pieces the tokenizer split the word into (so training starts from the word as it
    was read). Returns {word: token id} for the words added; a word the vocabulary already holds is left out."""
    pieces = {w: tokenizer(w, add_special_tokens=False).input_ids for w in words if w not in tokenizer.get_vocab()}
    if not pieces:
        return {}
    tokenizer.add_tokens(list(pieces))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in pieces}
    with torch.no_grad():
        for word, token in ids.items():
            table[token] = table[pieces[word]].float().mean(0).to(table.dtype)
    return ids


def word_rows(text_encoder, ids: dict[str, int]) -> dict[str, torch.Tensor]:
    """{word: its embedding (1, dim)}, copied to the CPU in fp32."""
    table = text_encoder.get_input_embeddings().weight
    return {w: table[i:i + 1].detach().float().cpu().clone() for w, i in ids.items()}


@torch.no_grad()
def set_rows(text_encoder, ids: dict[str, int], rows: dict[str, torch.Tensor]):
    table = text_encoder.get_input_embeddings().weight
    for word, row in rows.items():
        table[ids[word]] = row.reshape(-1).to(table.device, table.dtype)


def save(folder: Path, text_encoder, ids: dict[str, int]) -> list[Path]:
    """One file per word under folder/embeddings (see the module's docstring); nothing without words."""
    if not ids:
        return []
    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for word, row in word_rows(text_encoder, ids).items():
        path = out / f"{word}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({word: row.contiguous()}, str(tmp))
        tmp.replace(path)
        files.append(path)
    return files


def files_beside(lora_file: Path) -> list[Path]:
    """The embedding files of a LoRA: those in an `embeddings` folder beside it, sorted."""
    folder = Path(lora_file).parent / FOLDER
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def read(files: list[Path], dim: int) -> dict[str, torch.Tensor]:
    """{word: (1, dim)} from embedding files of one vector each; an EmbeddingError naming the file otherwise."""
    rows = {}
    for path in files:
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same sentence
            raise EmbeddingError(f"embedding {path} is not a readable safetensors file ({e})") from e
        if len(state) != 1:
            raise EmbeddingError(f"embedding {path} holds {len(state)} tensors; a word's embedding file holds one "
                                 f"(its word and vector)")
        (word, row), = state.items()
        if row.ndim == 1:
            row = row[None]
        if row.ndim != 2 or row.shape != (1, dim):
            raise EmbeddingError(f"embedding {path} has shape {tuple(row.shape)}; this text encoder takes one vector "
                                 f"of {dim} (another base model's, or a multi-vector embedding, is not supported)")
        if not torch.isfinite(row).all():
            raise EmbeddingError(f"embedding {path} holds NaN or infinite values")
        if not word.strip() or any(c.isspace() for c in word):
            raise EmbeddingError(f"embedding {path} names the word {word!r}; a word has no spaces")
        rows[word] = row.float()
    return rows
