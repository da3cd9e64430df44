"""Offline tokenizers for the smoke-test presets: a real-id CLIP tokenizer and a small deterministic T5 tokenizer.

Nothing here touches a network. The CLIP tokenizer is rebuilt from the OpenAI BPE merges that open_clip ships inside
its package, so its ids equal the ids of every real CLIP text encoder (SD 1.x, SDXL, Flux). The T5 tokenizer is a
small unigram vocabulary made from the most frequent CLIP words; it is only meant to feed tiny random T5 encoders.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fusion.errors import PresetError

CLIP_VOCAB_SIZE = 49408
"""Number of ids in the OpenAI CLIP BPE vocabulary: 512 byte symbols, 48,894 merges, 2 specials."""

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MERGE_COUNT = CLIP_VOCAB_SIZE - 512 - 2
_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

T5_WORD_COUNT = 1000
"""How many whole words the tiny T5 vocabulary holds (besides specials and single characters)."""


def clip_bpe_path() -> Path:
    """Locate open_clip's bundled BPE merges file without importing open_clip (which pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise PresetError(
            "open_clip is not installed, so the offline CLIP tokenizer cannot be built",
            hint="pip install open_clip_torch",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _CLIP_BPE_FILE
    if not path.is_file():
        raise PresetError("open_clip's bundled BPE file is missing", path=path, hint="reinstall open_clip_torch")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The CLIP vocabulary (token → id, 49,408 entries) and its 48,894 merges, in the order real CLIP uses.

    Ids: byte symbols, then byte symbols with ``</w>``, then one id per merge result, then the two specials.
    """
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _CLIP_MERGE_COUNT])
    if len(merges) != _CLIP_MERGE_COUNT or any(len(pair) != 2 for pair in merges):
        raise PresetError("open_clip's BPE file has an unexpected layout", path=clip_bpe_path())
    bytes_ = list(bytes_to_unicode().values())  # byte-level BPE's stand-ins for raw bytes, in CLIP's order
    tokens = bytes_ + [symbol + "</w>" for symbol in bytes_] + ["".join(pair) for pair in merges] + [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(*, pad_token: str = CLIP_EOS, model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose ids equal OpenAI CLIP's, built offline.

    ``pad_token`` is ``<|endoftext|>`` for SD 1.x / Flux and ``!`` for SDXL's second tokenizer, as in the real models.
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def t5_vocab(word_count: int = T5_WORD_COUNT) -> list[tuple[str, float]]:
    """A deterministic (piece, log-probability) unigram vocabulary in T5's layout.

    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then ``▁``, then the ``word_count`` most frequent purely alphabetic
    CLIP words (as ``▁word``, scored by frequency rank), then every printable ASCII character with and without the
    ``▁`` word-start mark so any ASCII text segments without unknowns. Whole words score higher than spelling them out.
    """
    vocab, _ = clip_vocab_and_merges()
    words: list[str] = []
    for token in sorted(vocab, key=vocab.__getitem__)[512:]:
        word = token.removesuffix("</w>")
        if token.endswith("</w>") and word.isascii() and word.isalpha():
            words.append(word)
            if len(words) == word_count:
                break
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -6.0)]
    pieces += [(f"▁{word}", -7.0 - rank / word_count) for rank, word in enumerate(words)]
    seen = {piece for piece, _ in pieces}
    for code in range(ord("!"), ord("~") + 1):
        for piece, score in ((f"▁{chr(code)}", -11.0), (chr(code), -12.0)):
            if piece not in seen:
                pieces.append((piece, score))
                seen.add(piece)
    return pieces


def build_t5_tokenizer(*, model_max_length: int = 512) -> T5Tokenizer:
    """A small T5 unigram tokenizer (about 1,200 ids) built offline for tiny random T5 encoders."""
    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=model_max_length)
