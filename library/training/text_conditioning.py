"""Captions -> U-Net conditioning during training, with an optional cache when the text encoder is frozen."""

from __future__ import annotations

from typing import Any

import torch

from library.models.text_encoding import TextEncoding, encode_prompts


class TextConditioner(torch.nn.Module):
    """Encode a batch of captions with the run's text-encoding settings (clip_skip, length, weights).

    `trains`: gradients flow into the text encoder (its own weights or a network applied to it).
    `cache_outputs` (--cache_text_encoder_outputs, only when nothing in the encoder trains): each
    distinct caption is encoded once and its hidden states reused, so later steps skip the
    encoder. Keyed by the final caption text, the cache stays correct with shuffled or dropped tags;
    it only saves time when captions repeat, which they do from the second epoch on.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        settings: TextEncoding,
        trains: bool,
        cache_outputs: bool = False,
        output_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if trains and cache_outputs:
            raise ValueError("--cache_text_encoder_outputs needs a frozen text encoder (it would not learn)")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.settings = settings
        self.trains = trains
        self.output_dtype = output_dtype
        self._cache: dict[str, torch.Tensor] | None = {} if cache_outputs else None

    @property
    def cached_captions(self) -> int:
        return 0 if self._cache is None else len(self._cache)

    def forward(self, captions: list[str]) -> torch.Tensor:
        if self._cache is not None:
            missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
            if missing:
                for caption, states in zip(missing, self._encode(missing)):
                    self._cache[caption] = states
            hidden = torch.stack([self._cache[c] for c in captions])
        else:
            hidden = self._encode(captions)
        return hidden if self.output_dtype is None else hidden.to(self.output_dtype)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        if self.trains:
            return encode_prompts(self.tokenizer, self.text_encoder, captions, self.settings)
        with torch.no_grad():
            return encode_prompts(self.tokenizer, self.text_encoder, captions, self.settings).detach()
