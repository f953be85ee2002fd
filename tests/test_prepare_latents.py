"""The guide's data chapter end to end, and latents prepared outside training that training then reuses.

images -> BLIP captions -> WD14 tags -> merge captions -> merge tags -> clean -> prepare_buckets_latents.py
-> fine_tune.py --in_json trains on those latents without encoding any image again."""

from __future__ import annotations

import json
import os

import pytest

from finetune import (
    clean_captions_and_tags,
    make_captions,
    merge_captions_to_metadata,
    merge_dd_tags_to_metadata,
    prepare_buckets_latents,
    tag_images_by_wd14_tagger,
)
from tests.tiny_captioners import build_tiny_blip
from tests.tiny_taggers import WD14_REPO, write_wd14_model
from tests.training_helpers import assert_ok, dreambooth_folders, lora_args, run_script, write_image_folder
from tools import cache_latents

BUCKETS = ["--min_bucket_reso", "64", "--max_bucket_reso", "256", "--bucket_reso_steps", "64"]


@pytest.fixture
def images(tmp_path):
    folder = write_image_folder(tmp_path / "images", count=2, size=(128, 128))
    wide = write_image_folder(tmp_path / "wide", count=2, size=(256, 64))
    for i, path in enumerate(sorted(wide.glob("*.png"))):
        path.rename(folder / f"wide{i}.png")
    return folder


def test_the_whole_chapter_ends_in_training_that_encodes_nothing(images, tmp_path, tiny_models):
    blip = build_tiny_blip(tmp_path / "blip")
    assert make_captions.main([str(images), "--caption_weights", str(blip), "--max_length", "10"]) == 0
    write_wd14_model(tmp_path / "tagger" / WD14_REPO.replace("/", "_"))
    assert tag_images_by_wd14_tagger.main([str(images), "--model_dir", str(tmp_path / "tagger"), "--repo_id", WD14_REPO,
                                           "--thresh", "0.3"]) == 0
    cap, dd, clean, lat = (tmp_path / f"{name}.json" for name in ("meta_cap", "meta_cap_dd", "meta_clean", "meta_lat"))
    assert merge_captions_to_metadata.main([str(images), str(cap), "--full_path"]) == 0
    assert merge_dd_tags_to_metadata.main([str(images), str(dd), "--full_path", "--in_json", str(cap)]) == 0
    assert clean_captions_and_tags.main([str(dd), str(clean)]) == 0
    assert prepare_buckets_latents.main([str(images), str(clean), str(lat), str(tiny_models["sd1"]),
                                         "--max_resolution", "128,128", "--batch_size", "2", *BUCKETS]) == 0
    metadata = json.loads(lat.read_text())
    assert len(metadata) == 4 and all(entry["caption"] and entry["tags"] for entry in metadata.values())
    assert all("long hair" in entry["tags"] for entry in metadata.values())  # cleaned: long_hair -> long hair
    resolutions = {tuple(entry["train_resolution"]) for entry in metadata.values()}
    assert resolutions == {(128, 128), (256, 64)}  # the wide images got their own bucket
    assert len(list(images.glob("*_sd.npz"))) == 4

    result = run_script("fine_tune.py", "--pretrained_model_name_or_path", str(tiny_models["sd1"]),
                        "--train_data_dir", str(images), "--in_json", str(lat), "--resolution", "128,128",
                        "--enable_bucket", *BUCKETS, "--cache_latents_to_disk", "--output_dir", str(tmp_path / "out"),
                        "--max_train_steps", "2", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors")
    assert_ok(result)
    assert "latents: 0 image(s) encoded, 4 reused from disk" in result.stdout


def test_skip_existing_keeps_valid_files_and_redoes_changed_images(images, tmp_path, tiny_models, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({p.stem: {"caption": "a square"} for p in images.glob("*.png")}), encoding="utf-8")
    argv = [str(images), str(meta), str(tmp_path / "lat.json"), str(tiny_models["sd1"]), "--max_resolution", "128,128",
            *BUCKETS]
    assert prepare_buckets_latents.main(argv) == 0
    assert "4 image(s) encoded, 0 still valid" in capsys.readouterr().out
    assert prepare_buckets_latents.main([*argv, "--skip_existing"]) == 0
    assert "0 image(s) encoded, 4 still valid" in capsys.readouterr().out
    write_image_folder(tmp_path / "other", count=1, size=(128, 128))
    os.replace(tmp_path / "other" / "img000.png", images / "img000.png")  # the image changed since
    assert prepare_buckets_latents.main([*argv, "--skip_existing"]) == 0
    assert "1 image(s) encoded, 3 still valid" in capsys.readouterr().out
    assert prepare_buckets_latents.main(argv) == 0  # without --skip_existing every file is written again
    assert "4 image(s) encoded" in capsys.readouterr().out


def test_cache_latents_tool_takes_a_training_runs_options(tmp_path, tiny_models):
    data = dreambooth_folders(tmp_path / "data", count=3)
    common = lora_args(tiny_models["sd1"], data, tmp_path / "out")
    assert cache_latents.main([*common, "--vae_batch_size", "2"]) == 0
    result = run_script("train_network.py", *common, "--cache_latents_to_disk", "--max_train_steps", "1")
    assert_ok(result)
    assert "latents: 0 image(s) encoded, 3 reused from disk" in result.stdout
