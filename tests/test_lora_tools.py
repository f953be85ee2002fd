"""The LoRA and checkpoint tools against their definitions, on the tiny SD models (in-process runs).

merge_lora (into a model = diffusers' own LoRA loading at that scale; --concat = applying both), resize_lora
(= SVD truncation of ΔW), extract_lora_from_models (recovers a known rank-4 delta), svd_merge_lora,
check_lora_weights, tools/merge_models.py; every LoRA written loads in diffusers and in train_network.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.hashing import precalculate_safetensors_hashes
from library.lora_tools.factors import dynamic_rank, lowrank_svd, split_modules
from library.models.loading import load_base_model
from networks import check_lora_weights, extract_lora_from_models, merge_lora, resize_lora, svd_merge_lora
from networks import lora as lora_module
from tools import merge_models


def make_lora(model, path, *, dim=4, alpha=2.0, conv_dim=None, seed=1, text_encoder=True, std=0.3):
    """A LoRA file with random (non-zero) up and down weights for `model`; returns its path."""
    parts = load_base_model(str(model))
    extra = {"conv_dim": str(conv_dim), "conv_alpha": "1"} if conv_dim else {}
    network = lora_module.create_network(1.0, dim, alpha, parts.vae, parts.text_encoder, parts.unet, **extra)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            for weight in (module.lora_up.weight, module.lora_down.weight):
                weight.copy_(torch.randn(weight.shape, generator=gen) * std)
    if not text_encoder:
        network.apply_to(parts.text_encoder, parts.unet, apply_text_encoder=False)
    network.save_weights(path, None, {"ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_network_dim": str(dim),
                                      "ss_network_alpha": str(alpha), "ss_training_comment": "test"})  # fmt: skip
    return path


def deltas(path, multiplier=1.0):
    modules, _ = split_modules(load_file(str(path)))
    return {name: m.delta(multiplier) for name, m in modules.items()}


def assert_deltas_close(a: dict, b: dict, rtol=1e-4):
    assert set(a) == set(b)
    for name in a:
        scale = float(b[name].abs().max()) + 1e-12
        assert float((a[name] - b[name]).abs().max()) <= rtol * scale, name


def unet_and_text_out(parts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    with torch.no_grad():
        cond = parts.text_encoder(ids)[0]
        return parts.unet(sample, 10, cond).sample


def metadata_of(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def assert_hashes_match(path):
    metadata = metadata_of(path)
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == precalculate_safetensors_hashes(
        load_file(str(path)), metadata
    )


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(tiny_models["sd1"], folder / "a.safetensors", conv_dim=4, seed=1),
        "b": make_lora(tiny_models["sd1"], folder / "b.safetensors", dim=2, alpha=1, seed=2),
        "folder": folder,
    }


# ---------------------------------------------------------------------- merge into a model


def test_merge_into_a_checkpoint_gives_the_images_diffusers_gives_at_that_scale(tiny_models, loras, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_models["sd1_file"]), "--save_to", str(out),
                            "--models", str(loras["a"]), "--ratios", "0.7"]) == 0  # fmt: skip
    scheduler = DDIMScheduler.from_pretrained(str(tiny_models["sd1"]), subfolder="scheduler")

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=3, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    merged = generate(load_base_model(str(out)).to_pipeline(scheduler=scheduler))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd1"]), safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    pipe.scheduler = scheduler
    base = generate(pipe)
    pipe.load_lora_weights(str(loras["folder"]), weight_name="a.safetensors")
    pipe.fuse_lora(lora_scale=0.7)
    with_diffusers = generate(pipe)
    assert abs(merged - base).max() > 0.05  # the LoRA changes the image
    assert abs(merged - with_diffusers).max() <= 2e-3
    metadata = metadata_of(out)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    # the merged file keeps every key of the source checkpoint
    assert set(load_file(str(out))) == set(load_file(str(tiny_models["sd1_file"])))


def test_merge_into_a_diffusers_folder_in_fp16_is_w_plus_ratio_delta(tiny_models, loras, tmp_path):
    out = tmp_path / "merged_folder"
    assert merge_lora.main(["--sd_model", str(tiny_models["sd1"]), "--save_to", str(out), "--models",
                            str(loras["b"]), "--ratios", "-0.5", "--save_precision", "fp16"]) == 0  # fmt: skip
    base, merged = load_base_model(str(tiny_models["sd1"])), load_base_model(str(out))
    assert merged.unet.dtype == torch.float32  # loaded in fp32 from an fp16 folder
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    expected = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight + deltas(loras["b"], -0.5)[name]
    got = merged.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert torch.allclose(got, expected.half().float(), atol=1e-3)


# ---------------------------------------------------------------------- LoRAs into one LoRA


def test_concat_merge_is_exactly_both_loras_applied(tiny_models, loras, tmp_path):
    out = tmp_path / "ab.safetensors"
    assert merge_lora.main(["--save_to", str(out), "--models", str(loras["a"]), str(loras["b"]),
                            "--ratios", "0.6", "-1.5", "--concat"]) == 0  # fmt: skip
    a, b, ab = deltas(loras["a"], 0.6), deltas(loras["b"], -1.5), deltas(out)
    assert_deltas_close(ab, {n: a[n] + b.get(n, 0) for n in a})
    sd = load_file(str(out))
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 4 + 2
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 4  # only a has 3x3 convs

    # the same U-Net output as applying both networks at their ratios
    parts = load_base_model(str(tiny_models["sd1"]))
    applied = []
    for path, ratio in ((loras["a"], 0.6), (loras["b"], -1.5)):
        network, weights = lora_module.create_network_from_weights(ratio, str(path), None, parts.text_encoder, parts.unet)
        network.load_weights(weights)
        network.apply_to(parts.text_encoder, parts.unet)
        applied.append(network)
    both = unet_and_text_out(parts)
    for network in applied:
        network.restore()
    network, weights = lora_module.create_network_from_weights(1.0, str(out), None, parts.text_encoder, parts.unet)
    network.load_weights(weights)
    network.apply_to(parts.text_encoder, parts.unet)
    assert torch.allclose(unet_and_text_out(parts), both, atol=1e-4)
    metadata = metadata_of(out)
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_v2"] == "False"
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == "4"
    assert "modelspec.architecture" in metadata
    assert_hashes_match(out)


def test_merging_one_lora_without_concat_scales_it_exactly_no_ratio_times_abs_ratio(loras, tmp_path):
    out = tmp_path / "neg.safetensors"
    assert merge_lora.main(["--save_to", str(out), "--models", str(loras["a"]), "--ratios", "-0.5"]) == 0
    assert_deltas_close(deltas(out), deltas(loras["a"], -0.5))
    sd = load_file(str(out))
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 4  # rank kept
    assert metadata_of(out)["ss_network_alpha"] == "2.0"  # alpha/rank kept too


def test_svd_merge_is_the_best_rank_k_approximation_of_the_weighted_sum(loras, tmp_path):
    out = tmp_path / "svd.safetensors"
    assert svd_merge_lora.main(["--save_to", str(out), "--models", str(loras["a"]), str(loras["b"]),
                                "--ratios", "1", "0.5", "--new_rank", "3", "--new_conv_rank", "2"]) == 0  # fmt: skip
    a, b, merged = deltas(loras["a"]), deltas(loras["b"], 0.5), deltas(out)
    for name in ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", "lora_te_text_model_encoder_layers_0_mlp_fc1",
                 "lora_unet_down_blocks_0_resnets_0_conv1"):  # fmt: skip
        total = a[name] + b.get(name, 0)
        u, s, vh = torch.linalg.svd(total.flatten(1).double(), full_matrices=False)
        k = 2 if total.dim() == 4 and total.shape[-1] == 3 else 3
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(merged[name].flatten(1).double(), best, atol=1e-4 * float(s[0]))
    metadata = metadata_of(out)
    assert metadata["ss_network_dim"] == "3" and metadata["ss_network_alpha"] == "3.0"
    # --lbws: a zero for BASE (the text encoder) removes it from the sum
    out0 = tmp_path / "svd_lbw.safetensors"
    zero_te = json.dumps([0] + [1] * 16)
    assert svd_merge_lora.main(["--save_to", str(out0), "--models", str(loras["a"]), "--lbws", zero_te,
                                "--new_rank", "4"]) == 0  # fmt: skip
    lbw = deltas(out0)
    assert float(lbw["lora_te_text_model_encoder_layers_0_mlp_fc1"].abs().max()) < 1e-6
    assert_deltas_close({"x": lbw["lora_unet_down_blocks_1_attentions_0_proj_in"]},
                        {"x": deltas(loras["a"])["lora_unet_down_blocks_1_attentions_0_proj_in"]})  # IN04 kept


# ---------------------------------------------------------------------- resize


def test_resize_to_the_same_rank_changes_nothing_and_lower_is_the_svd_truncation(loras, tmp_path):
    same, small = tmp_path / "same.safetensors", tmp_path / "small.safetensors"
    assert resize_lora.main(["--model", str(loras["a"]), "--save_to", str(same), "--new_rank", "4"]) == 0
    assert_deltas_close(deltas(same), deltas(loras["a"]))
    assert resize_lora.main(["--model", str(loras["a"]), "--save_to", str(small), "--new_rank", "2",
                             "--new_conv_rank", "3", "--save_precision", "float"]) == 0  # fmt: skip
    original, resized = deltas(loras["a"]), deltas(small)
    sd = load_file(str(small))
    for name, delta in original.items():
        k = 3 if delta.dim() == 4 and delta.shape[-1] == 3 else 2
        u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
        assert torch.allclose(resized[name].flatten(1).double(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-4 * float(s[0])), name
        assert sd[f"{name}.lora_down.weight"].shape[0] == k
    # alpha rescaled so alpha/rank is kept: 2/4 -> 1/2 (Linear), 1/4 -> 0.75/3 (3x3)
    assert float(sd["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == pytest.approx(1.0)
    assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == pytest.approx(0.75)
    metadata = metadata_of(small)
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "1.0"
    assert "resized to 2" in metadata["ss_training_comment"] and metadata["ss_training_comment"].endswith("test")
    assert_hashes_match(small)


def test_dynamic_rank_rules_follow_their_definitions():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0])
    assert dynamic_rank(s, "sv_ratio", 2, 8) == 2  # 10 and 5 are within a factor 2 of 10
    assert dynamic_rank(s, "sv_ratio", 1.5, 8) == 1
    assert dynamic_rank(s, "sv_cumulative", 15 / 18, 8) == 2  # 10+5 = 15 of 18
    assert dynamic_rank(s, "sv_cumulative", 0.84, 8) == 3
    assert dynamic_rank(s, "sv_fro", (125 / 130) ** 0.5, 8) == 2  # sqrt(100+25) of sqrt(130)
    assert dynamic_rank(s, "sv_fro", 0.99, 2) == 2  # capped by the limit
    assert dynamic_rank(torch.zeros(4), "sv_fro", 0.9, 8) == 1
    up, down = torch.randn(40, 3, dtype=torch.float64), torch.randn(3, 30, dtype=torch.float64)
    u, s, vh = lowrank_svd(up, down)
    assert torch.allclose((u * s) @ vh, up @ down) and s.numel() == 3


def test_dynamic_resize_of_peft_keys_keeps_the_style_and_reports_energy(loras, tmp_path, capsys):
    sd = load_file(str(loras["a"]))
    peft = {}
    for key, value in sd.items():
        if key.endswith(".alpha"):
            continue  # PEFT files have no alpha: scale 1
        name, _, leaf = key.partition(".")
        new_name = name.replace("lora_unet_", "unet.", 1)
        peft[f"{new_name}.{leaf.replace('lora_down', 'lora_A').replace('lora_up', 'lora_B')}"] = value
    src, out = tmp_path / "peft.safetensors", tmp_path / "peft_small.safetensors"
    save_file(peft, str(src))
    assert resize_lora.main(["--model", str(src), "--save_to", str(out), "--new_rank", "4", "--dynamic_method",
                             "sv_fro", "--dynamic_param", "0.9", "--verbose"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "fro retained" in printed and "Frobenius norm retained: mean" in printed
    result = load_file(str(out))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in result)  # no alpha added, style kept
    before, after = split_modules(peft)[0], split_modules(result)[0]
    for name, module in before.items():
        delta = module.delta()
        s = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False).S
        k = dynamic_rank(s, "sv_fro", 0.9, 4)
        assert after[name].rank == k
        kept = float(after[name].delta().norm() / delta.norm())
        assert kept >= 0.9 - 1e-4 or k == 4
        assert k == 1 or float(torch.sqrt((s[: k - 1] ** 2).sum() / (s**2).sum())) < 0.9  # no rank too many


# ---------------------------------------------------------------------- extract


def test_extract_recovers_a_known_rank_4_delta_and_keeps_a_changed_text_encoder(tiny_models, loras, tmp_path, capsys):
    tuned = tmp_path / "tuned.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_models["sd1_file"]), "--save_to", str(tuned),
                            "--models", str(loras["a"])]) == 0  # fmt: skip
    out = tmp_path / "extracted.safetensors"
    capsys.readouterr()
    assert extract_lora_from_models.main(["--model_org", str(tiny_models["sd1_file"]), "--model_tuned", str(tuned),
                                          "--save_to", str(out), "--dim", "4", "--conv_dim", "4",
                                          "--clamp_quantile", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "text encoder: largest |ΔW|" in printed and "threshold 0: extracted" in printed
    known, extracted = deltas(loras["a"]), deltas(out)
    assert set(known) <= set(extracted)
    assert_deltas_close({n: extracted[n] for n in known}, known, rtol=1e-3)
    assert metadata_of(out)["ss_network_dim"] == "4"

    # as a function: a model whose text encoder did not change gets none (threshold reported)
    from library.lora_tools.extract import extract_lora

    unet_only = make_lora(tiny_models["sd1"], tmp_path / "u.safetensors", seed=3, text_encoder=False)
    tuned_unet = tmp_path / "tuned_unet.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_models["sd1_file"]), "--save_to", str(tuned_unet),
                            "--models", str(unet_only)]) == 0  # fmt: skip
    result = extract_lora(str(tiny_models["sd1_file"]), str(tuned_unet), dim=4, clamp_quantile=None)
    assert not result.text_encoder_kept and result.text_encoder_max_diff == 0 and result.text_encoder_threshold == 0
    assert not any(n.startswith("lora_te") for n in result.modules)
    assert_deltas_close({n: result.modules[n].delta() for n in deltas(unet_only)}, deltas(unet_only), rtol=1e-3)


# ---------------------------------------------------------------------- every output loads


def test_outputs_load_in_diffusers_and_as_network_weights(tiny_models, loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    import train_network
    from library.training.entry import run_recipe
    from tests.training_helpers import dreambooth_folders, lora_args

    concat, dynamic = tmp_path / "concat.safetensors", tmp_path / "dynamic.safetensors"
    assert merge_lora.main(["--save_to", str(concat), "--models", str(loras["a"]), str(loras["b"]), "--concat"]) == 0
    assert resize_lora.main(["--model", str(loras["a"]), "--save_to", str(dynamic), "--new_rank", "4",
                             "--dynamic_method", "sv_ratio", "--dynamic_param", "2"]) == 0  # fmt: skip
    svd = tmp_path / "svd.safetensors"
    assert svd_merge_lora.main(["--save_to", str(svd), "--models", str(loras["a"]), str(loras["b"]),
                                "--new_rank", "3", "--new_conv_rank", "2"]) == 0  # fmt: skip
    for path in (concat, dynamic, svd):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd1"]), safety_checker=None,
                                                       requires_safety_checker=False)  # fmt: skip
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
        modules = split_modules(load_file(str(path)))[0]
        peft_modules = sum(hasattr(m, "lora_A") for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()])
        assert peft_modules == len(modules)
        # and diffusers applies it as we do (mixed ranks included: one alpha per kind of module)
        parts = load_base_model(str(tiny_models["sd1"]))
        network, weights = lora_module.create_network_from_weights(1.0, str(path), None, parts.text_encoder, parts.unet)
        network.load_weights(weights)
        network.apply_to(parts.text_encoder, parts.unet)
        assert torch.allclose(unet_and_text_out(parts), unet_and_text_out(pipe), atol=1e-4), path.name
    data = dreambooth_folders(tmp_path / "data", count=1)
    for path in (concat, dynamic):
        args = lora_args(tiny_models["sd1"], data, tmp_path / f"run_{path.stem}", "--max_train_steps", "1",
                         "--network_weights", str(path), "--dim_from_weights")  # fmt: skip
        assert run_recipe(train_network.NetworkRecipe(), args) == 0
        trained = load_file(str(tmp_path / f"run_{path.stem}" / "tiny.safetensors"))
        assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in load_file(str(path)).items()}


# ---------------------------------------------------------------------- check, merge_models


def test_check_lora_weights_lists_tensors_and_modules(loras, capsys):
    assert check_lora_weights.main([str(loras["b"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    key_line = next(line for line in lines if line.startswith("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight,"))
    key, shape, mean, minimum = key_line.split(",")
    assert shape == "(2-64-1-1)" and float(mean) > float(minimum) >= 0
    assert any(line.startswith("lora_unet_mid_block_attentions_0_proj_in: rank 2, alpha 1") for line in lines)
    assert check_lora_weights.main([str(loras["b"]), "-s"]) == 0
    all_lines = capsys.readouterr().out.splitlines()
    assert sum(1 for line in all_lines if line.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha,")) == 1


def test_merge_models_weighted_average_and_unet_only(tiny_models, loras, tmp_path):
    other = tmp_path / "other.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_models["sd1_file"]), "--save_to", str(other),
                            "--models", str(loras["a"])]) == 0  # fmt: skip
    first, second = load_file(str(tiny_models["sd1_file"])), load_file(str(other))
    out, unet_only = tmp_path / "avg.safetensors", tmp_path / "avg_unet"
    assert merge_models.main(["--models", str(tiny_models["sd1_file"]), str(other), "--ratios", "0.25", "0.75",
                              "--output", str(out)]) == 0  # fmt: skip
    merged = load_file(str(out))
    assert set(merged) == set(first)
    for key in first:
        if first[key].is_floating_point():
            expected = 0.25 * first[key].float() + 0.75 * second[key].float()
            assert torch.allclose(merged[key], expected, atol=1e-6), key
        else:
            assert torch.equal(merged[key], first[key])
    assert merge_models.main(["--models", str(tiny_models["sd1_file"]), str(other), "--unet_only",
                              "--output", str(unet_only)]) == 0  # fmt: skip
    merged = load_file(str(tmp_path / "avg_unet.safetensors"))
    te_key = next(k for k in first if k.startswith("cond_stage_model.") and k.endswith("fc1.weight"))
    unet_key = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert not torch.equal(first[te_key], second[te_key])
    assert torch.equal(merged[te_key], first[te_key].float())
    assert torch.allclose(merged[unet_key], 0.5 * (first[unet_key].float() + second[unet_key].float()), atol=1e-6)
    assert "modelspec.merged_from" in metadata_of(out)
