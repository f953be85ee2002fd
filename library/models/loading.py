"""Load a base model from a diffusers folder, a Hugging Face model id or a single LDM file."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from library.errors import UserError
from library.models.components import StableDiffusionParts
from library.models.tokenizer import build_clip_tokenizer, load_clip_tokenizer

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
# Only what we load: a model repo's root often also holds multi-GB single-file checkpoints.
HUB_MODEL_FILES = (
    "model_index.json",
    "*/config.json",
    "scheduler/*.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
HUB_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors")
# A reference model lends configs, tokenizer and scheduler only: no weights are downloaded.
HUB_CONFIG_FILES = ("model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*")
CONFIG_HINT = (
    "convert it to a diffusers folder with tools/convert_diffusers20_original_sd.py "
    "--reference_model <a diffusers folder of the same architecture> and load that folder"
)


class ModelLoadError(UserError, RuntimeError):
    """A base model or VAE that cannot be loaded; the message says why and what to do."""


class ModelConfigError(ModelLoadError):
    """A single file whose architecture cannot be read off its weights.

    `reason` names the file, the part and what went wrong; callers that offer a way to
    supply the configs (the convert tool's --reference_model) replace the default hint.
    """

    def __init__(self, reason: str, hint: str = CONFIG_HINT):
        super().__init__(f"{reason}; {hint}")
        self.reason = reason


def make_noise_scheduler(v_parameterization: bool):
    """The DDPM schedule SD1.x/2.x were trained with (same settings as upstream's trainer)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def load_base_model(
    name_or_path: str,
    *,
    v2: bool = False,
    v_parameterization: bool = False,
    vae: str | None = None,
    tokenizer_cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    config_folder: str | os.PathLike | None = None,
) -> StableDiffusionParts:
    """Load `--pretrained_model_name_or_path` (+ `--vae`) into StableDiffusionParts.

    A path to a file is an LDM single-file checkpoint, a folder is a diffusers model,
    anything else is a Hugging Face model id.

    `config_folder` (a diffusers folder or hub id of the same architecture) supplies the
    unet/vae/text_encoder configs of a single file instead of inferring them from its
    weights, which cannot tell e.g. GroupNorm group counts or attention head counts.
    It is not used for diffusers sources, which carry their own configs.
    """
    location = resolve_model_location(name_or_path)
    if location.is_file():
        from library.models.single_file import load_single_file

        tokenizer = _single_file_tokenizer(v2, tokenizer_cache_dir)
        reference = resolve_model_location(str(config_folder), HUB_CONFIG_FILES) if config_folder else None
        text_encoder, unet, vae_model = load_single_file(
            location, v2=v2, v_parameterization=v_parameterization, dtype=dtype, config_folder=reference
        )
        source_format = "single_file"
    else:
        tokenizer, text_encoder, unet, vae_model = _load_diffusers_folder(location, dtype)
        _warn_if_v2_mismatch(tokenizer, v2, name_or_path)
        source_format = "diffusers"
    if vae:
        vae_model = load_vae(vae, dtype=dtype)
    if vae_model is None:
        raise ModelLoadError(f"{name_or_path} has no VAE weights; pass one with --vae")
    return StableDiffusionParts(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae_model,
        noise_scheduler=make_noise_scheduler(v_parameterization),
        v2=v2,
        v_parameterization=v_parameterization,
        source=str(name_or_path),
        source_format=source_format,
    )


def resolve_model_location(name_or_path: str, hub_files=HUB_MODEL_FILES) -> Path:
    """A local file or folder for `name_or_path`, downloading a hub id into the HF cache if needed."""
    path = Path(os.path.expanduser(name_or_path))
    if path.exists():
        return path
    if _looks_like_local_path(name_or_path):
        raise ModelLoadError(f"model not found: {name_or_path} is neither an existing file nor a folder")
    return _download_from_hub(name_or_path, hub_files)


def model_source_problem(option: str, name_or_path: str | None) -> str | None:
    """What is wrong with a local model path, found without loading it (hub ids are checked when loaded)."""
    if not name_or_path:
        return None
    path = Path(os.path.expanduser(name_or_path))
    if path.is_file():
        from library.models.checkpoint_io import checkpoint_file_problem

        problem = checkpoint_file_problem(path)
        return f"{option} {problem}" if problem else None
    if path.is_dir():
        return None
    if _looks_like_local_path(name_or_path):
        return f"{option} {name_or_path}: no such file or folder"
    return None


def _looks_like_local_path(name: str) -> bool:
    return (
        name.lower().endswith(SINGLE_FILE_SUFFIXES)
        or name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or "\\" in name
    )


def _download_from_hub(repo_id: str, allow_patterns) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=list(allow_patterns)))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            hint = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
        else:
            hint = "the Hugging Face Hub could not be reached and it is not in the local cache"
        raise ModelLoadError(
            f"cannot load model '{repo_id}': {hint}. Download it once with network access "
            "(and HF_HUB_OFFLINE unset), or pass a local diffusers folder or .safetensors/.ckpt file."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"cannot load model '{repo_id}': no such model on the Hugging Face Hub (or it is private: "
            "log in with `hf auth login`), and no local file or folder has that name"
        ) from None
    except HfHubHTTPError as err:
        raise ModelLoadError(f"cannot download model '{repo_id}' from the Hugging Face Hub: {err}") from None


def _single_file_tokenizer(v2: bool, tokenizer_cache_dir: str | None):
    # The CLIP vocabulary is built locally (identical to the hub's), so no download is needed.
    if tokenizer_cache_dir:
        return build_clip_tokenizer(tokenizer_cache_dir, v2=v2)
    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(tmp, v2=v2)


def _load_diffusers_folder(folder: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = [p for p in ("unet", "text_encoder", "tokenizer") if not (folder / p).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{folder} is not a diffusers Stable Diffusion folder: missing sub-folder(s) {', '.join(missing)}"
        )
    tokenizer = load_clip_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype) if (folder / "vae").is_dir() else None
    return tokenizer, text_encoder, unet, vae


def _warn_if_v2_mismatch(tokenizer, v2: bool, name: str) -> None:
    # SD2's tokenizer pads with "!" (id 0), SD1's with the end token.
    looks_v2 = tokenizer.pad_token_id != tokenizer.eos_token_id
    if looks_v2 != v2:
        logger.warning(
            "%s looks like an SD%s model (tokenizer padding) but --v2 is %s; check the --v2 option",
            name,
            "2" if looks_v2 else "1",
            "set" if v2 else "not set",
        )


def load_vae(name_or_path: str, dtype: torch.dtype = torch.float32):
    """`--vae`: a single VAE file, a full LDM checkpoint, a diffusers folder (model or VAE) or a hub id."""
    from diffusers import AutoencoderKL

    location = resolve_model_location(name_or_path, HUB_VAE_FILES)
    if location.is_file():
        from library.models.single_file import load_vae_file

        return load_vae_file(location, dtype=dtype)
    if (location / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(str(location), subfolder="vae", torch_dtype=dtype)
    if (location / "config.json").is_file():
        return AutoencoderKL.from_pretrained(str(location), torch_dtype=dtype)
    raise ModelLoadError(f"--vae {name_or_path}: the folder has neither config.json nor vae/config.json")
