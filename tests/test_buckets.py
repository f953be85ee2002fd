"""Aspect-ratio bucketing (dataset-config.md §9, formats.md §2.2 bucket_info)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from library.data.buckets import (
    BucketAssignment,
    assign_bucket,
    assign_buckets,
    bucket_info,
    crop_box,
    fixed_bucket,
    format_bucket_table,
    make_bucket_resolutions,
    no_upscale_bucket,
    no_upscale_buckets,
)

BUCKETS_512 = make_bucket_resolutions((512, 512))
AREA_512 = 512 * 512


def random_sizes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(8, 5000, size=(n, 2))
    sizes[: n // 10] = np.array(BUCKETS_512)[rng.integers(0, len(BUCKETS_512), n // 10)]  # exact matches too
    return sizes


# --- bucket sets ---------------------------------------------------------------------------------


def test_512_defaults_give_the_17_documented_buckets():
    expected = [(256, h) for h in (832, 896, 960, 1024)] + [(320, 704), (320, 768), (384, 640), (448, 576), (512, 512)]
    expected += [(h, w) for w, h in expected if w != h]
    assert BUCKETS_512 == sorted(expected)
    assert len(BUCKETS_512) == 17


def test_bucket_set_for_512x768():
    assert make_bucket_resolutions((512, 768)) == [
        (256, 1024), (320, 1024), (384, 896), (384, 960), (384, 1024), (448, 832), (512, 704), (512, 768),
        (576, 576), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384),
        (1024, 256), (1024, 320), (1024, 384),
    ]  # fmt: skip


def test_bucket_set_for_768():
    assert make_bucket_resolutions((768, 768)) == [
        (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024), (640, 896),
        (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256), (1024, 320), (1024, 384),
        (1024, 448), (1024, 512), (1024, 576),
    ]  # fmt: skip


@pytest.mark.parametrize("reso,limits", [((512, 512), (320, 960, 64)), ((768, 768), (256, 1536, 128))])
def test_bucket_sets_respect_step_limits_and_area(reso, limits):
    low, high, step = limits
    for w, h in make_bucket_resolutions(reso, low, high, step):
        assert w % step == 0 and h % step == 0
        assert w * h <= reso[0] * reso[1]
        assert (low <= w <= high and low <= h <= high) or w == h


# --- assignment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,bucket,resized",
    [
        ((1024, 768), (576, 448), (597, 448)),  # ar 1.333 -> nearest 1.286; heights match, width 597.3
        ((768, 1024), (448, 576), (448, 597)),
        ((1920, 1080), (640, 384), (683, 384)),
        ((512, 512), (512, 512), (512, 512)),
        ((2048, 2048), (512, 512), (512, 512)),
        ((100, 100), (512, 512), (512, 512)),  # small images are enlarged
        ((300, 2000), (256, 1024), (256, 1707)),  # beyond the most extreme bucket
    ],
)
def test_assign_typical_sizes(size, bucket, resized):
    result = assign_bucket(size, BUCKETS_512)
    assert result.bucket == bucket and result.resized_size == resized
    assert result.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_exact_size_match_wins_over_an_earlier_bucket_with_the_same_ratio():
    buckets = [(512, 512), (256, 256)]
    assert assign_bucket((256, 256), buckets).bucket == (256, 256)
    assert assign_bucket((300, 300), buckets) == BucketAssignment((512, 512), (512, 512), 0.0)  # tie: first


def test_resized_size_covers_the_bucket_with_one_side_equal():
    for size in random_sizes(500).tolist():
        result = assign_bucket(tuple(size), BUCKETS_512)
        (rw, rh), (bw, bh) = result.resized_size, result.bucket
        assert rw >= bw and rh >= bh and (rw == bw or rh == bh)


def test_vectorised_assignment_equals_the_scalar_rule():
    sizes = random_sizes(3000, seed=1)
    bulk = assign_buckets(sizes, BUCKETS_512)
    assert len(bulk) == len(sizes)
    assert list(bulk) == [assign_bucket(tuple(s), BUCKETS_512) for s in sizes.tolist()]


def test_empty_bucket_set_is_refused():
    with pytest.raises(ValueError):
        assign_bucket((10, 10), [])


# --- fixed bucket (bucketing off) and crops ------------------------------------------------------


def test_fixed_bucket_scales_to_cover_then_crops_the_centre():
    result = fixed_bucket((1024, 768), (512, 512))
    assert result.bucket == (512, 512) and result.resized_size == (683, 512)
    assert crop_box(result.resized_size, result.bucket, False) == (85, 0)
    tall = fixed_bucket((300, 600), (512, 768))
    assert tall.resized_size == (512, 1024)
    assert crop_box(tall.resized_size, tall.bucket, False) == (0, 128)


def test_random_crop_stays_inside_and_is_reproducible():
    boxes = [crop_box((700, 520), (512, 512), True, random.Random(s)) for s in range(50)]
    assert all(0 <= left <= 188 and 0 <= top <= 8 for left, top in boxes)
    assert len(set(boxes)) > 10
    assert crop_box((700, 520), (512, 512), True, random.Random(3)) == boxes[3]
    assert crop_box((512, 512), (512, 512), True, random.Random(0)) == (0, 0)
    with pytest.raises(ValueError):
        crop_box((700, 520), (512, 512), True, None)


# --- bucket_no_upscale ---------------------------------------------------------------------------


def test_no_upscale_keeps_small_images_and_floors_to_the_step():
    expected = BucketAssignment((448, 256), (500, 300), 448 / 256 - 500 / 300)
    assert no_upscale_bucket((500, 300), AREA_512, 64) == expected
    assert no_upscale_bucket((512, 512), AREA_512, 64).bucket == (512, 512)


def test_no_upscale_shrinks_large_images_to_the_area():
    assert no_upscale_bucket((3000, 2000), AREA_512, 64) == BucketAssignment((576, 384), (576, 384), 0.0)
    tall = no_upscale_bucket((1000, 3000), AREA_512, 64)
    # width-first rounding (256 wide -> 768 high) keeps the 1:3 ratio exactly, so it beats height-first
    assert tall.resized_size == (256, 768) and tall.bucket == (256, 768)
    for size in random_sizes(500, seed=2).tolist():
        result = no_upscale_bucket(tuple(size), AREA_512, 64)
        (rw, rh), (bw, bh) = result.resized_size, result.bucket
        assert bw % 64 == 0 and bh % 64 == 0 and bw >= 64 and bh >= 64
        assert bw * bh <= AREA_512 and rw >= bw and rh >= bh


@pytest.mark.parametrize(
    "size,bucket,resized",
    [
        ((30, 40), (64, 64), (64, 85)),  # tiny: short side raised to the step
        ((40, 600), (64, 960), (64, 960)),  # upstream would give a 0-wide bucket
        ((100000, 100), (4096, 64), (64000, 64)),  # upstream divides by zero here
        ((30, 8000), (64, 4096), (64, 17067)),  # long side capped by the area
    ],
)
def test_no_upscale_clamps_bucket_sides_to_the_step(size, bucket, resized):
    result = no_upscale_bucket(size, AREA_512, 64)
    assert result.bucket == bucket and result.resized_size == resized


def test_vectorised_no_upscale_equals_the_scalar_rule():
    sizes = np.concatenate([random_sizes(3000, seed=3), [[30, 40], [40, 600], [100000, 100], [30, 8000]]])
    bulk = no_upscale_buckets(sizes, AREA_512, 64)
    assert list(bulk) == [no_upscale_bucket(tuple(s), AREA_512, 64) for s in sizes.tolist()]


# --- bucket_info and the table -------------------------------------------------------------------


def test_bucket_info_counts_repeats_and_indexes_the_predefined_set():
    images = [((1024, 768), 3), ((512, 512), 2), ((600, 600), 1), ((768, 1024), 1), ((1000, 1000), 0)]
    pairs = [(assign_bucket(size, BUCKETS_512), repeats) for size, repeats in images]
    info = bucket_info(pairs, BUCKETS_512)
    assert info["buckets"] == {
        "7": {"resolution": [448, 576], "count": 1},
        "8": {"resolution": [512, 512], "count": 3},
        "9": {"resolution": [576, 448], "count": 3},
    }
    # one term per image (without repeats); the repeats-0 image is skipped
    expected_error = (abs(576 / 448 - 4 / 3) + 0 + 0 + abs(448 / 576 - 3 / 4)) / 4
    assert info["mean_img_ar_error"] == pytest.approx(expected_error)
    assert json.loads(json.dumps(info)) == info


def test_bucket_info_without_a_set_indexes_the_sorted_used_buckets():
    pairs = [(no_upscale_bucket(size, AREA_512, 64), 1) for size in [(500, 300), (300, 500), (500, 300)]]
    info = bucket_info(pairs)
    assert info["buckets"] == {"0": {"resolution": [256, 448], "count": 1}, "1": {"resolution": [448, 256], "count": 2}}


def test_bucket_info_edge_cases():
    assert bucket_info([]) == {"buckets": {}, "mean_img_ar_error": 0.0}
    with pytest.raises(ValueError, match="not in the given bucket set"):
        bucket_info([(BucketAssignment((64, 64), (64, 64), 0.0), 1)], BUCKETS_512)


def test_bucket_table_lists_index_resolution_and_count():
    pairs = [(assign_bucket((1024, 768), BUCKETS_512), 3), (assign_bucket((512, 512), BUCKETS_512), 2)]
    table = format_bucket_table(bucket_info(pairs, BUCKETS_512))
    lines = table.splitlines()
    assert lines[0].split() == ["bucket", "resolution", "count"]
    assert lines[1].split() == ["8", "512x512", "2"]
    assert lines[2].split() == ["9", "576x448", "3"]
    assert lines[3].split() == ["total", "5"]
    assert "mean aspect-ratio error" in lines[4]
