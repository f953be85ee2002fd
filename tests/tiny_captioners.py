"""Tiny random BLIP and GIT captioners saved like hub models (no weights exist offline): real transformers
classes, a 20-odd word BERT vocabulary, 32-pixel images. Their captions are random words, but every code
path of the captioning scripts (loading, batching, beam search, sampling, decoding) runs for real."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "red", "blue", "square", "circle", "on", "white", "background", "the", "with", "words", "picture",
         "of", "shape", "green", "star"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 takes the vocabulary itself (`vocab`); 4.x took a vocab.txt path (`vocab_file`).
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, additional_special_tokens=["[DEC]"])


def build_tiny_blip(folder: Path) -> Path:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _tokenizer(folder)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        text_config={"vocab_size": len(SPECIAL + WORDS), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "bos_token_id": ids("[DEC]"), "pad_token_id": ids("[PAD]"),
                     "sep_token_id": ids("[SEP]"), "eos_token_id": ids("[SEP]")},
    )  # fmt: skip
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(folder)
    return folder


def build_tiny_git(folder: Path) -> Path:
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = _tokenizer(folder)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = GitConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        vocab_size=len(SPECIAL + WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, bos_token_id=ids("[CLS]"), eos_token_id=ids("[SEP]"),
        pad_token_id=ids("[PAD]"),
    )  # fmt: skip
    GitForCausalLM(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder
