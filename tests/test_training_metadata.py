"""library/training/metadata.py: ss_* keys, --no_metadata, hashes (reference/formats.md §2)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re

import pytest
import safetensors.torch
import torch

from library.args import add_modelspec_arguments
from library.training import metadata as md
from library.training.network_args import add_network_arguments

ALWAYS = """ss_session_id ss_training_started_at ss_training_finished_at ss_output_name ss_learning_rate ss_unet_lr
ss_text_encoder_lr ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch
ss_num_epochs ss_max_train_steps ss_steps ss_epoch ss_gradient_checkpointing ss_gradient_accumulation_steps
ss_max_grad_norm ss_lr_warmup_steps ss_lr_scheduler ss_optimizer ss_network_module ss_network_dim ss_network_alpha
ss_network_dropout ss_mixed_precision ss_full_fp16 ss_fp8_base ss_fp8_base_unet ss_lowram ss_v2 ss_base_model_version
ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_noise_offset ss_noise_offset_random_strength
ss_adaptive_noise_scale ss_multires_noise_iterations ss_multires_noise_discount ss_ip_noise_gamma
ss_ip_noise_gamma_random_strength ss_zero_terminal_snr ss_min_snr_gamma ss_debiased_estimation ss_loss_type
ss_huber_schedule ss_huber_c ss_huber_scale ss_scale_weight_norms ss_prior_loss_weight ss_caption_dropout_rate
ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_validation_seed
ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs ss_validate_every_n_steps
ss_resize_interpolation ss_training_comment ss_sd_scripts_commit_hash""".split()
LEGACY = """ss_batch_size_per_device ss_total_batch_size ss_resolution ss_color_aug ss_flip_aug ss_random_crop
ss_shuffle_caption ss_enable_bucket ss_bucket_no_upscale ss_min_bucket_reso ss_max_bucket_reso ss_keep_tokens
ss_dataset_dirs ss_reg_dataset_dirs ss_tag_frequency ss_bucket_info""".split()

SUBSET = {"img_count": 3, "num_repeats": 10, "color_aug": False, "flip_aug": True, "random_crop": False,
          "shuffle_caption": True, "keep_tokens": 1, "keep_tokens_separator": "", "secondary_separator": None,
          "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None, "resize_interpolation": None,
          "image_dir": "10_cat", "class_tokens": "cat", "is_reg": False}  # fmt: skip
BUCKETS = {"buckets": {"0": {"resolution": [512, 512], "count": 30}}, "mean_img_ar_error": 0.0}
DATASET_METADATA = {  # the shape DatasetGroup.metadata() returns
    "ss_datasets": [{
        "is_dreambooth": True, "batch_size_per_device": 2, "num_train_images": 30, "num_reg_images": 5,
        "resolution": [512, 512], "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 1024,
        "tag_frequency": {"10_cat": {"cat": 3}}, "bucket_info": BUCKETS, "resize_interpolation": None,
        "subsets": [SUBSET, {**SUBSET, "image_dir": "1_animal", "num_repeats": 1, "img_count": 5, "is_reg": True}],
    }],
    "ss_tag_frequency": {"10_cat": {"cat": 3}},
    "ss_dataset_dirs": {"10_cat": {"n_repeats": 10, "img_count": 3}},
    "ss_bucket_info": BUCKETS,
}  # fmt: skip
COUNTS = {"num_train_images": 30, "num_reg_images": 5, "num_batches_per_epoch": 15, "num_epochs": 4,
          "max_train_steps": 60, "optimizer": "torch.optim.adamw.AdamW(weight_decay=0.1)"}  # fmt: skip


def make_args(argv=(), **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_network_arguments(parser)
    add_modelspec_arguments(parser)
    args = parser.parse_args(list(argv))
    defaults = dict(output_name="mylora", learning_rate=1e-4, v2=False, v_parameterization=False, seed=42,
                    resolution="512", train_batch_size=2, gradient_accumulation_steps=1, clip_skip=2,
                    pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5", vae=None)  # fmt: skip
    for key, value in {**defaults, **extra}.items():
        setattr(args, key, value)
    return args


def build(args, uses_dataset_config=True):
    meta = md.network_training_metadata(args, dataset_metadata=DATASET_METADATA, counts=COUNTS, session_id=123,
                                        started_at=1700000000.5, uses_dataset_config=uses_dataset_config)  # fmt: skip
    return md.finalize_metadata(meta, epoch=2, step=30, finished_at=1700000100.25)


def test_every_always_written_key_is_a_string_of_the_setting():
    args = make_args(["--network_dim", "8", "--text_encoder_lr", "5e-5", "--training_comment", "hi"])
    meta = build(args)
    assert set(ALWAYS) <= set(meta) and all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "1"  # upstream's int default
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dropout"] == "None"
    assert meta["ss_text_encoder_lr"] == "5e-05" and meta["ss_unet_lr"] == "None"
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_epoch"] == "2" and meta["ss_steps"] == "30" and meta["ss_training_finished_at"] == "1700000100.25"
    assert meta["ss_session_id"] == "123" and meta["ss_optimizer"] == COUNTS["optimizer"]
    assert meta["ss_training_comment"] == "hi" and meta["ss_clip_skip"] == "2" and meta["ss_seed"] == "42"
    assert json.loads(meta["ss_datasets"]) == DATASET_METADATA["ss_datasets"]
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 3}}
    assert "ss_network_args" not in meta and "ss_resolution" not in meta
    # hub id: name only, no hashes
    assert meta["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5" and "ss_sd_model_hash" not in meta
    commit = meta["ss_sd_scripts_commit_hash"]
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_v2_network_args_and_legacy_dataset_keys():
    args = make_args(["--network_args", "conv_dim=4", "conv_alpha=1"], v2=True, v_parameterization=True,
                     resolution="512,768", color_aug=True, bucket_no_upscale=True)  # fmt: skip
    meta = build(args, uses_dataset_config=False)
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1", "dropout": None}
    assert set(LEGACY) <= set(meta) and "ss_datasets" not in meta
    assert meta["ss_resolution"] == "(512, 768)" and meta["ss_total_batch_size"] == "2"
    assert meta["ss_color_aug"] == "True" and meta["ss_bucket_no_upscale"] == "True"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 3}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_animal": {"n_repeats": 1, "img_count": 5}}
    assert json.loads(meta["ss_bucket_info"]) == BUCKETS
    assert build(make_args(resolution="768"), uses_dataset_config=False)["ss_resolution"] == "(768, 768)"


def test_no_metadata_keeps_only_the_minimum():
    meta = build(make_args(["--network_args", "conv_dim=4", "--network_dropout", "0.1"]))
    assert json.loads(meta["ss_network_args"])["dropout"] == 0.1
    assert set(md.minimal_metadata(meta)) == {"ss_v2", "ss_base_model_version", "ss_network_module",
                                              "ss_network_dim", "ss_network_alpha", "ss_network_args"}  # fmt: skip
    assert "ss_network_args" not in md.minimal_metadata(build(make_args()))


def test_base_model_and_vae_file_hashes(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB
    model = tmp_path / "model.safetensors"
    model.write_bytes(data)
    legacy, full = md.model_file_hashes(model)
    assert legacy == hashlib.sha256(data[0x100000 : 0x110000]).hexdigest()[:8]
    assert full == hashlib.sha256(data).hexdigest()
    assert md.model_file_hashes(tmp_path / "missing") == ("NOFILE", "NOFILE")
    assert md.model_file_hashes(tmp_path) == ("IsADirectory", "IsADirectory")
    meta = build(make_args(pretrained_model_name_or_path=str(model), vae=str(tmp_path)))
    assert meta["ss_sd_model_name"] == "model.safetensors"
    assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == (legacy, full)
    assert meta["ss_vae_name"] == tmp_path.name and meta["ss_vae_hash"] == "IsADirectory"


def test_safetensors_hashes_follow_the_addnet_rules():
    small = {"a": torch.ones(3)}
    model_hash, legacy = md.precalculate_safetensors_hashes(small, {"ss_x": "1", "modelspec.title": "t"})
    assert legacy == "e3b0c442"  # buffers under 1 MiB hash the empty string
    raw = safetensors.torch.save(small, {"ss_x": "1"})
    n = int.from_bytes(raw[:8], "little")
    assert model_hash == hashlib.sha256(raw[8 + n :]).hexdigest()

    big = {"w": torch.arange(400_000, dtype=torch.float32)}  # 1.6 MB
    h1 = md.precalculate_safetensors_hashes(big, {"ss_a": "1", "modelspec.title": "x"})
    h2 = md.precalculate_safetensors_hashes(big, {"ss_a": "1", "modelspec.title": "other"})
    h3 = md.precalculate_safetensors_hashes(big, {"ss_a": "1" * 100})
    assert h1 == h2  # only ss_* keys take part
    assert h1[0] == h3[0] and h1[1] != h3[1]  # data hash ignores the header; legacy hash shifts with it
    buf = io.BytesIO(safetensors.torch.save(big, {"ss_a": "1"}))
    buf.seek(0x100000)
    assert h1[1] == hashlib.sha256(buf.read(0x10000)).hexdigest()[:8]


def test_modelspec_from_options():
    args = make_args(["--metadata_title", "My LoRA", "--metadata_author", "me", "--metadata_tags", "a,b"])
    spec = md.network_modelspec(args, timestamp=1700000000)
    assert spec["modelspec.title"] == "My LoRA" and spec["modelspec.author"] == "me"
    assert spec["modelspec.tags"] == "a,b" and spec["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert spec["modelspec.implementation"] == "diffusers" and spec["modelspec.encoder_layer"] == "2"
    assert md.network_modelspec(make_args(), timestamp=0)["modelspec.title"] == "mylora"
    assert "modelspec.timestep_range" not in spec
    assert md.network_modelspec(make_args(min_timestep=100), timestamp=0)["modelspec.timestep_range"] == "100,1000"


def test_the_other_modelspec_options_and_a_thumbnail_as_a_data_uri(tmp_path):
    import base64

    thumbnail = tmp_path / "thumb.png"
    thumbnail.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = make_args(["--metadata_usage_hint", "use at 0.8", "--metadata_trigger_phrase", "sks heart",
                      "--metadata_merged_from", "a, b", "--metadata_preprocessor", "none",
                      "--metadata_thumbnail", str(thumbnail), "--metadata_is_negative_embedding"])
    spec = md.network_modelspec(args, timestamp=0)
    assert spec["modelspec.usage_hint"] == "use at 0.8" and spec["modelspec.trigger_phrase"] == "sks heart"
    assert spec["modelspec.merged_from"] == "a, b" and spec["modelspec.preprocessor"] == "none"
    assert spec["modelspec.is_negative_embedding"] == "true"
    assert spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(thumbnail.read_bytes()).decode()
    assert "modelspec.is_negative_embedding" not in md.network_modelspec(make_args(), timestamp=0)
    assert md.modelspec_option_problems(make_args(["--metadata_thumbnail", str(tmp_path / "nope.png")])) == [
        f"--metadata_thumbnail {tmp_path / 'nope.png'}: file not found (give a .png/.jpg/.webp image)"]


@pytest.mark.parametrize("value, expected", [(None, None), ([], None), ([1e-4], 1e-4), (2e-4, 2e-4)])
def test_text_encoder_lr_value(value, expected):
    assert md.text_encoder_lr_value(value) == expected
