"""Sentence embeddings the way all-MiniLM-L6-v2 is served (mean pooling, then L2 norm), and the sentence
split the encoder evaluation uses."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ============================================================================================
# Encoders
# ============================================================================================


def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                        max_length: int = 256) -> torch.Tensor:
    """L2-normalized sentence embeddings ``[N, D]`` (float32) as sentence-transformers computes them for
    all-MiniLM-L6-v2: tokens truncated at ``max_length`` (its ``max_seq_length`` is 256), mask-weighted
    mean of the last hidden state, then L2 normalization."""
    texts = list(texts)
    if not texts:
        raise ValueError("sentence_embeddings: texts is empty")
    if any(not isinstance(t, str) for t in texts):
        raise ValueError("sentence_embeddings: every text must be a string")
    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            parts.append(pool_embeddings(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(parts)


def pool_embeddings(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token states ``[B, T, D]`` -> unit-length sentence embeddings ``[B, D]`` (float32)."""
    return l2_normalize(mean_pooling(last_hidden_state, attention_mask)).to(torch.float32)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_sentences(texts: Sequence[str], min_chars: int = 20, max_chars: int = 300) -> list[str]:
    """Sentences of running text (paragraphs split at ``. `` before a capital), whitespace collapsed,
    keeping those of ``min_chars``..``max_chars`` characters: short, varied encoder inputs."""
    out = []
    for text in texts:
        for paragraph in text.split("\n\n"):
            for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                if min_chars <= len(sentence) <= max_chars:
                    out.append(sentence)
    return out


def mean_pooling(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings ``[B, D]`` from token states ``[B, T, D]`` as sentence-transformers does.

    Mask-weighted mean over tokens: ``sum(h * m) / clamp(sum(m), min=1e-9)``, in the dtype of
    ``last_hidden_state`` (the all-MiniLM-L6-v2 pooling; normalization is a separate step,
    :func:`l2_normalize`).
    """
    if last_hidden_state.dim() != 3:
        raise ValueError(f"last_hidden_state must be [batch, tokens, dim], got shape {tuple(last_hidden_state.shape)}")
    if tuple(attention_mask.shape) != tuple(last_hidden_state.shape[:2]):
        raise ValueError(
            f"attention_mask must have shape {tuple(last_hidden_state.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    weights = attention_mask.unsqueeze(-1).expand(last_hidden_state.shape).to(last_hidden_state.dtype)
    summed = (last_hidden_state * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return summed / counts


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Unit-length rows along the last dim (``F.normalize(p=2, eps=1e-12)``, sentence-transformers' Normalize)."""
    return F.normalize(embeddings, p=2, dim=-1)
