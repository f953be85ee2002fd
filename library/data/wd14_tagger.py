"""WD14-style image tagging (finetune/tag_images_by_wd14_tagger.py): model files, preprocessing, tag choice, outputs.

Two model formats, as in kohya-ss/sd-scripts, both run through onnxruntime:

- SmilingWolf's WD14 v2/v3 (`--repo_id namespace/name`): `model.onnx` + `selected_tags.csv`
  (`tag_id,name,category,count`; category 9 rating, 0 general, 4 character). Input NHWC float32, BGR 0..255;
  output one probability per CSV row. Tags keep the CSV order.
- The tag_mapping format (`--repo_id namespace/name/subdir`, e.g. cella110n/cl_tagger/cl_tagger_1_01):
  `model_optimized.onnx` + `tag_mapping.json` (`{"<output index>": {"tag": ..., "category": "General"}}`).
  Input NCHW in [-1, 1] (the same BGR picture), output logits (the sigmoid is applied here). More categories
  (copyright, artist, meta, model, quality); tags are ordered by confidence.

Fixes over sd-scripts: character tags work in the WD14 format (upstream raises UnboundLocalError),
`--tag_replacement` works in both formats (upstream's loop shadows its own list), a missing file is
downloaded even when the model folder exists, and a fixed-batch model gets its last batch padded.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import cv2
import numpy as np

from library.data.images import ImageReadError, interpolation_flag, load_image, read_image_size
from library.data.metadata_tools import find_images
from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
DEFAULT_MODEL_DIR = "wd14_tagger_model"
DEFAULT_IMAGE_SIZE = 448  # used when the model's input shape leaves the size open
WHITE = 255

CATEGORIES = ("rating", "general", "character", "copyright", "artist", "meta", "model", "quality")
# selected_tags.csv category numbers (Danbooru's); SmilingWolf's files only use 9, 0 and 4.
CSV_CATEGORIES = {"9": "rating", "0": "general", "4": "character", "1": "artist", "3": "copyright", "5": "meta"}
# Categories of which exactly one tag (the most probable) is written, when asked for.
ONE_OF = ("rating", "quality")


class TaggerError(UserError, RuntimeError):
    """A tagger model, option or output the tool cannot use; the message says what to do."""


# ---------------------------------------------------------------- model files


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Where a tagger model lives locally and on the hub."""

    repo_id: str  # hub repository, "namespace/name"
    subfolder: str | None  # set for the tag_mapping format
    repo_folder: Path  # <model_dir>/<repo_id with _>: hf_hub_download's local_dir (it adds the subfolder)
    folder: Path  # local folder holding the two files
    model_candidates: tuple[str, ...]  # ONNX file names, preferred first
    tags_file: str

    @property
    def default_format(self) -> bool:
        return self.subfolder is None

    @property
    def tags_path(self) -> Path:
        return self.folder / self.tags_file

    @property
    def model_path(self) -> Path:
        """The first candidate present locally (the preferred name when none is)."""
        for name in self.model_candidates:
            if (self.folder / name).is_file():
                return self.folder / name
        return self.folder / self.model_candidates[0]

    def missing(self) -> list[str]:
        names = [] if self.model_path.is_file() else [self.model_candidates[0]]
        return names + ([] if self.tags_path.is_file() else [self.tags_file])

    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}" + (f"/tree/main/{self.subfolder}" if self.subfolder else "")


def resolve_model_files(repo_id: str, model_dir: str | os.PathLike) -> ModelFiles:
    """`<model_dir>/<repo_id with / -> _>` (plus `/<subdir>` for `namespace/name/subdir` repo ids), as sd-scripts."""
    parts = repo_id.strip().strip("/").split("/")
    if not parts[0] or any(p in ("", ".", "..") for p in parts):
        raise TaggerError(f"--repo_id {repo_id!r}: give a Hugging Face repo id such as {DEFAULT_REPO_ID}")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    folder = Path(model_dir) / repo.replace("/", "_")
    if subfolder is None:
        return ModelFiles(repo, None, folder, folder, ("model.onnx",), "selected_tags.csv")
    # sd-scripts fetches model_optimized.onnx; some repos of this format only hold model.onnx
    candidates = ("model_optimized.onnx", "model.onnx")
    return ModelFiles(repo, subfolder, folder, folder / subfolder, candidates, "tag_mapping.json")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_file(repo_id: str, filename: str, subfolder: str | None, local_dir: Path, force: bool) -> None:
    """One file of a hub repo into `local_dir` (`local_dir/<subfolder>/<filename>` when subfolder is set)."""
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo_id=repo_id, filename=filename, subfolder=subfolder, local_dir=local_dir, force_download=force)


def ensure_model_files(files: ModelFiles, force_download: bool = False) -> ModelFiles:
    """Download what is missing (everything with `force_download`); offline without the files is one clear error."""
    wanted = [files.model_candidates[0], files.tags_file] if force_download else files.missing()
    if not wanted:
        logger.info("using the tagger model in %s", files.folder)
        return files
    needed = f"{' and '.join(wanted)} from {files.hub_url()}"
    if _hub_offline():
        raise TaggerError(
            f"{files.folder}: the tagger model is missing there ({', '.join(wanted)}) and HF_HUB_OFFLINE is set; "
            f"put {needed} into that folder, or run once with network access"
        )
    logger.info("downloading %s of %s into %s", ", ".join(wanted), files.repo_id, files.folder)
    for name in wanted:
        candidates = files.model_candidates if name == files.model_candidates[0] else (name,)
        for i, candidate in enumerate(candidates):
            try:
                download_file(files.repo_id, candidate, files.subfolder, files.repo_folder, force_download)
                break
            except Exception as err:  # noqa: BLE001 - any hub or network failure becomes the same one-line error
                if i + 1 < len(candidates) and _is_missing_entry(err):
                    continue
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise TaggerError(
                    f"cannot download {candidate} of {files.repo_id} ({reason}); check --repo_id and the network, "
                    f"or put {needed} into {files.folder}"
                ) from None
    return files


def _is_missing_entry(err: Exception) -> bool:
    return type(err).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError")


# ---------------------------------------------------------------- tag names


@dataclasses.dataclass(frozen=True)
class TagNaming:
    """How a model's tag name is written: --character_tag_expand, --remove_underscore, --tag_replacement."""

    separator: str = ", "
    character_tag_expand: bool = False
    remove_underscore: bool = False
    replacements: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Label:
    """One model output: its index, category, name in the model and the tag(s) written for it."""

    index: int
    category: str
    raw: str
    units: tuple[str, ...]  # the tags written: usually one, two for an expanded `name_(series)`

    def text(self, separator: str) -> str:
        return separator.join(self.units)


def parse_tag_replacement(text: str | None) -> dict[str, str]:
    """`src,dst;src2,dst2` -> {src: dst}; `\\,` and `\\;` stand for a literal comma and semicolon."""
    if not text:
        return {}
    pairs, fields, current = [], [], []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            current.append(following if following in (",", ";") else char + following)
        elif char == ",":
            fields.append("".join(current))
            current = []
        elif char == ";":
            pairs.append(fields + ["".join(current)])
            fields, current = [], []
        else:
            current.append(char)
    pairs.append(fields + ["".join(current)])
    result = {}
    for pair in pairs:
        if len(pair) == 1 and not pair[0].strip():
            continue  # an empty entry, e.g. after a trailing ';'
        if len(pair) != 2 or not pair[0].strip():
            shown = ",".join(pair)
            raise TaggerError(
                f"--tag_replacement: {shown!r} is not 'source,target'; separate pairs with ';' and write a comma or "
                r"semicolon inside a tag as \, or \;"
            )
        source, target = pair[0].strip(), pair[1].strip()
        if not target:
            raise TaggerError(f"--tag_replacement: {source!r} has an empty target; use --undesired_tags to drop a tag")
        result[source] = target
    return result


def expand_character_tag(tag: str) -> tuple[str, ...]:
    """`name_(series)` -> (name, series); `name_(costume)_(series)` -> (name_(costume), series); else (tag,)."""
    if not tag.endswith(")") or "(" not in tag:
        return (tag,)
    cut = tag.rfind("(")
    name, series = tag[:cut].rstrip("_ "), tag[cut + 1 :].rstrip(")")
    return (name, series) if name and series else (tag,)


def _without_underscores(tag: str) -> str:
    return tag.replace("_", " ") if len(tag) > 3 else tag  # short ones are emoticons such as ^_^


def make_label(index: int, category: str, raw: str, naming: TagNaming) -> Label:
    """Expand (characters), remove underscores, then replace: the order sd-scripts documents."""
    units = expand_character_tag(raw) if naming.character_tag_expand and category == "character" else (raw,)
    if naming.remove_underscore:
        units = tuple(_without_underscores(u) for u in units)
    if naming.replacements:
        whole = naming.separator.join(units)
        for key in (whole, raw):  # the whole written tag (sd-scripts' rule), or the model's own name
            if key in naming.replacements:
                units = (naming.replacements[key],)
                break
        else:
            units = tuple(naming.replacements.get(u, u) for u in units)
    return Label(index, category, raw, units)


def read_selected_tags(path: Path, naming: TagNaming) -> list[Label]:
    """selected_tags.csv: one label per row, in output order."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise TaggerError(f"{path}: not a readable CSV ({err}); download it again with --force_download") from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise TaggerError(
            f"{path}: expected the columns tag_id,name,category,count; download it again with --force_download"
        )
    labels, unknown = [], set()
    for index, row in enumerate(rows):
        category = CSV_CATEGORIES.get((row["category"] or "").strip())
        if category is None:
            unknown.add(row["category"])
            category = "unknown"
        labels.append(make_label(index, category, row["name"], naming))
    if unknown:
        logger.warning("%s: tags of unknown categories %s are never written", path, sorted(unknown))
    return labels


def read_tag_mapping(path: Path, naming: TagNaming) -> list[Label]:
    """tag_mapping.json (`{"<index>": {"tag": ..., "category": ...}}`): one label per entry, in index order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        entries = sorted((int(key), value["tag"], str(value["category"]).lower()) for key, value in data.items())
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise TaggerError(
            f'{path}: not a tag mapping ({{"<index>": {{"tag": ..., "category": ...}}}}: {err}); download it again '
            "with --force_download"
        ) from None
    unknown = sorted({category for _, _, category in entries if category not in CATEGORIES})
    if unknown:
        raise TaggerError(f"{path}: unknown tag categories {unknown}; expected {', '.join(CATEGORIES)}")
    return [make_label(index, category, tag, naming) for index, tag, category in entries]


# ---------------------------------------------------------------- choosing the tags of one image


@dataclasses.dataclass(frozen=True)
class SelectOptions:
    thresholds: dict[str, float]  # per category (rating and quality excluded)
    undesired: frozenset[str] = frozenset()
    always_first: tuple[str, ...] = ()
    rating: str | None = None  # "first", "last" or None (no rating tag)
    quality: str | None = None
    character_first: bool = False
    by_confidence: bool = False  # the tag_mapping format; WD14 keeps the CSV order


@dataclasses.dataclass
class ImageTags:
    tags: list[str]  # what is written, in order (duplicates removed)
    by_category: dict[str, list[str]]  # for --debug


class TagSelector:
    """Turns one image's probabilities into its ordered tag list; per-label work is done once here."""

    def __init__(self, labels: Sequence[Label], options: SelectOptions, separator: str):
        self.options, self.separator = options, separator
        undesired = options.undesired
        self.labels: dict[int, Label] = {}
        for label in labels:
            if label.raw in undesired or label.text(separator) in undesired:
                continue
            units = tuple(u for u in label.units if u not in undesired)
            if units:
                self.labels[label.index] = dataclasses.replace(label, units=units)
        size = max((label.index for label in labels), default=-1) + 1
        self.thresholds = np.full(size, np.inf, dtype=np.float64)
        for index, label in self.labels.items():
            if label.category in options.thresholds:
                self.thresholds[index] = options.thresholds[label.category]
        # rating/quality: the argmax over ALL labels of the category (undesired ones included, then dropped)
        self.one_of = {
            category: np.array([label.index for label in labels if label.category == category], dtype=np.int64)
            for category in ONE_OF
        }

    def __call__(self, probs: np.ndarray) -> ImageTags:
        probs = np.asarray(probs, dtype=np.float64)
        hits = np.nonzero(probs[: len(self.thresholds)] >= self.thresholds)[0]
        if self.options.by_confidence:
            hits = hits[np.argsort(-probs[hits], kind="stable")]
        chosen = [self.labels[int(i)] for i in hits]
        if self.options.character_first:  # stable: characters keep their order, so do the others
            chosen = sorted(chosen, key=lambda label: label.category != "character")
        by_category = collections.defaultdict(list)
        for label in chosen:
            by_category[label.category].append(label.text(self.separator))
        units = [u for label in chosen for u in label.units]
        # quality then rating, each at the front or the end: "rating, quality, ..." / "..., quality, rating"
        for category, place in (("quality", self.options.quality), ("rating", self.options.rating)):
            indices = self.one_of[category]
            if place is None or len(indices) == 0:
                continue
            best = self.labels.get(int(indices[np.argmax(probs[indices])]))
            if best is None:
                continue  # the winner is undesired
            by_category[category].append(best.text(self.separator))
            units = [*best.units, *units] if place == "first" else [*units, *best.units]
        first = [t for t in self.options.always_first if t in units]
        units = first + [u for u in units if u not in first]
        return ImageTags(list(dict.fromkeys(units)), dict(by_category))


def split_list_option(text: str | None, separator: str) -> list[str]:
    """--undesired_tags / --always_first_tags: split on the separator without its spaces (',' by default)."""
    if not text:
        return []
    sep = separator.strip() or separator
    return [t.strip() for t in text.split(sep) if t.strip()]


def split_caption(text: str, separator: str) -> list[str]:
    """The tags of an existing caption file (any line), stripped, empty ones dropped."""
    sep = separator.strip() or separator
    return [t.strip() for line in text.splitlines() for t in line.split(sep) if t.strip()]


def merge_with_existing(existing: list[str], new: list[str], separator: str) -> list[str]:
    """--append_tags: the existing tags, then the new ones not already there (compared piece by piece)."""
    have = set(existing)
    return existing + [t for t in new if not set(split_caption(t, separator)) <= have]


# ---------------------------------------------------------------- images in, model input out


def square_bgr(rgb: np.ndarray) -> np.ndarray:
    """RGB -> BGR, padded with white to a centred square (the WD14 training layout)."""
    bgr = rgb[:, :, ::-1]
    height, width = bgr.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return cv2.copyMakeBorder(
        np.ascontiguousarray(bgr), top, side - height - top, left, side - width - left,
        cv2.BORDER_CONSTANT, value=(WHITE, WHITE, WHITE),
    )  # fmt: skip


def prepare_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 RGB uint8 (transparency already on white) -> (height, width, 3) float32 BGR 0..255."""
    square = square_bgr(rgb)
    width, height = size
    if square.shape[:2] != (height, width):
        flag = interpolation_flag("auto", (square.shape[1], square.shape[0]), size)  # area down, lanczos up
        square = cv2.resize(square, (width, height), interpolation=flag)
    return square.astype(np.float32)


@dataclasses.dataclass
class LoadedImage:
    path: Path
    pixels: np.ndarray  # prepare_image's output
    size: tuple[int, int]  # (width, height) as displayed, for --output_path


def load_for_tagging(path: Path, size: tuple[int, int]) -> LoadedImage:
    """Decode (EXIF-upright, transparency on white) and prepare one image; ImageReadError names a bad file."""
    pixels = load_image(path)
    return LoadedImage(path, prepare_image(pixels, size), read_image_size(path))


def load_in_order(
    paths: Sequence[Path], load: Callable[[Path], LoadedImage], workers: int | None
) -> Iterator[LoadedImage | ImageReadError]:
    """load(path) for each path, in order; an unreadable file yields its ImageReadError instead.

    With `workers`, that many threads read ahead (decoding releases the GIL), a bounded window so a huge
    folder is never held in memory at once.
    """

    def attempt(path: Path) -> LoadedImage | ImageReadError:
        try:
            return load(path)
        except ImageReadError as err:
            return err

    if not workers:
        yield from (attempt(p) for p in paths)
        return
    pending = iter(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window = collections.deque(pool.submit(attempt, p) for p in islice(pending, workers * 4))
        while window:
            result = window.popleft().result()
            following = next(pending, None)
            if following is not None:
                window.append(pool.submit(attempt, following))
            yield result


# ---------------------------------------------------------------- the ONNX model


def onnx_providers(available: Iterable[str]) -> list[str]:
    """A GPU provider first when onnxruntime has one (onnxruntime-gpu), then the CPU."""
    available = list(available)
    for gpu in ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider"):
        if gpu in available:
            return [gpu, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class TaggerModel:
    """An onnxruntime session plus what it needs: layout, input size, fixed batch, labels."""

    def __init__(self, files: ModelFiles, naming: TagNaming):
        import onnxruntime as ort

        self.path = files.model_path
        self.default_format = files.default_format
        self.session = self._open_session(ort)
        self.providers = self.session.get_providers()
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_dtype = _INPUT_TYPES.get(model_input.type, np.float32)
        shape = list(model_input.shape)
        if len(shape) != 4:
            raise TaggerError(f"{self.path}: input shape {shape} is not an image batch; is this a WD14 tagger model?")
        channels, (height, width) = (shape[3], shape[1:3]) if self.default_format else (shape[1], shape[2:4])
        if isinstance(channels, int) and channels != 3:
            if self.default_format:
                layout, form = "NHWC (batch, height, width, 3)", "the WD14 format (namespace/name)"
            else:
                layout, form = "NCHW (batch, 3, height, width)", "the tag_mapping format (namespace/name/subdir)"
            raise TaggerError(f"{self.path}: input shape {shape} is not {layout}; this --repo_id form expects {form}")
        self.image_size = (_fixed(width) or DEFAULT_IMAGE_SIZE, _fixed(height) or DEFAULT_IMAGE_SIZE)  # (w, h)
        self.fixed_batch = _fixed(shape[0])
        self.outputs = _fixed(self.session.get_outputs()[0].shape[-1])
        reader = read_selected_tags if self.default_format else read_tag_mapping
        self.labels = reader(files.tags_path, naming)
        self.needed_outputs = max((label.index for label in self.labels), default=-1) + 1
        self._check_labels(files)

    def _open_session(self, ort):
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: a GPU provider falling back prints enough on its own
        providers = onnx_providers(ort.get_available_providers())
        path = str(self.path)
        try:
            return ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            if len(providers) > 1:
                logger.warning("%s failed (%s); running on the CPU", providers[0], str(err).splitlines()[0])
                try:
                    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
                except Exception as cpu_err:  # noqa: BLE001
                    err = cpu_err
            raise TaggerError(
                f"{self.path}: onnxruntime cannot load it ({str(err).splitlines()[0][:200]}); the file may be "
                "incomplete: download it again with --force_download"
            ) from None

    def _check_labels(self, files: ModelFiles) -> None:
        if self.outputs is None:
            return
        if self.default_format and len(self.labels) != self.outputs:
            raise TaggerError(
                f"{files.folder}: {self.path.name} gives {self.outputs} scores but {files.tags_file} lists "
                f"{len(self.labels)} tags; the two files are from different models: download both with --force_download"
            )
        if not self.default_format and self.labels and self.labels[-1].index >= self.outputs:
            raise TaggerError(
                f"{files.folder}: {files.tags_file} has tag index {self.labels[-1].index} but {self.path.name} gives "
                f"{self.outputs} scores; the two files are from different models: download both with --force_download"
            )

    def batch_size(self, requested: int) -> int:
        if self.fixed_batch and self.fixed_batch != requested:
            logger.warning(
                "--batch_size %d: the model only takes batches of %d, so %d is used", requested, self.fixed_batch,
                self.fixed_batch,
            )  # fmt: skip
            return self.fixed_batch
        return requested

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (n_images, n_outputs) for prepare_image outputs."""
        batch = np.stack(images)
        count = len(batch)
        if self.fixed_batch and count < self.fixed_batch:  # pad a short last batch; the extra rows are dropped
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.fixed_batch - count, axis=0)])
        if not self.default_format:
            batch = batch.transpose(0, 3, 1, 2) / 127.5 - 1.0  # NCHW in [-1, 1]
        try:
            scores = self.session.run(None, {self.input_name: batch.astype(self.input_dtype)})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime's own exception types
            raise TaggerError(f"{self.path}: the model rejected its input ({str(err).splitlines()[0][:200]})") from None
        scores = np.asarray(scores, dtype=np.float64).reshape(len(batch), -1)[:count]
        if scores.shape[1] < self.needed_outputs:
            raise TaggerError(
                f"{self.path}: the model gives {scores.shape[1]} scores per image but its tag list needs "
                f"{self.needed_outputs}; the two files are from different models: download both with --force_download"
            )
        if not self.default_format:
            scores = np.exp(-np.logaddexp(0.0, -scores))  # sigmoid of the logits, without overflow warnings
        return scores


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


# ---------------------------------------------------------------- the whole run


def thresholds_from_args(args) -> dict[str, float]:
    """--<category>_threshold, each falling back to --thresh."""
    names = ("general", "character", "copyright", "artist", "meta", "model")
    return {name: v if (v := getattr(args, f"{name}_threshold", None)) is not None else args.thresh for name in names}


def _placement(args, first: str, last: str) -> str | None:
    if getattr(args, first) and getattr(args, last):
        raise TaggerError(f"--{first} and --{last} contradict each other (first or last): give one of them")
    return "first" if getattr(args, first) else "last" if getattr(args, last) else None


def _extension(value: str) -> str:
    return value if value.startswith(".") else f".{value}"


def caption_path(image: Path, extension: str) -> Path:
    return image.parent / (image.stem + extension)


class TagWriter:
    """Where each image's tags go: its caption file (written atomically), or one entry of --output_path."""

    def __init__(self, extension: str, separator: str, append: bool, output_path: Path | None):
        self.extension, self.separator, self.append, self.output_path = extension, separator, append, output_path
        self.entries: dict[str, dict] = {}  # --output_path: absolute image path -> {"tags", "image_size"}
        self.written = self.replaced = 0
        self.left_alone: list[Path] = []  # --append_tags files that are not UTF-8 text

    def add(self, image: LoadedImage, tags: list[str]) -> None:
        target = caption_path(image.path, self.extension)
        if self.append and target.is_file():  # sd-scripts merges with this file in both output modes
            try:
                existing = target.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                logger.warning("%s: not UTF-8 text, so --append_tags cannot add to it; left as it is", target)
                self.left_alone.append(target)
                return
            tags = merge_with_existing(split_caption(existing, self.separator), tags, self.separator)
        text = self.separator.join(tags)
        if self.output_path is not None:
            self.entries[str(image.path.resolve())] = {"tags": text, "image_size": list(image.size)}
            return
        self.replaced += target.exists()
        with atomic_path(target) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        self.written += 1

    def close(self, tagged: int) -> str:
        """Write --output_path (if any); returns the summary line."""
        if self.output_path is not None:
            write_output_file(self.output_path, self.entries)
            return f"tagged {tagged} image(s); wrote {self.output_path}"
        replaced = f" ({self.replaced} existing one(s) replaced)" if self.replaced and not self.append else ""
        left = f"; {len(self.left_alone)} non-UTF-8 file(s) left as they were" if self.left_alone else ""
        return f"tagged {tagged} image(s); wrote {self.written} {self.extension} file(s){replaced}{left}"


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise TaggerError(f"--batch_size {args.batch_size}: give 1 or more")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise TaggerError(f"--max_data_loader_n_workers {args.max_data_loader_n_workers}: give 0 or more")
    if not args.caption_separator:
        raise TaggerError("--caption_separator is empty; give the text between tags, e.g. ', '")
    if args.output_path and Path(args.output_path).is_dir():
        raise TaggerError(f"--output_path {args.output_path}: that is a folder; give a .json or .jsonl file name")


def tag_images(args) -> int:
    """The body of finetune/tag_images_by_wd14_tagger.py: every option is checked before the model loads."""
    from tqdm import tqdm

    _check_args(args)
    separator = args.caption_separator
    options = SelectOptions(
        thresholds=thresholds_from_args(args),
        undesired=frozenset(split_list_option(args.undesired_tags, separator)),
        always_first=tuple(split_list_option(args.always_first_tags, separator)),
        rating=_placement(args, "use_rating_tags", "use_rating_tags_as_last_tag"),
        quality=_placement(args, "use_quality_tags", "use_quality_tags_as_last_tag"),
        character_first=args.character_tags_first,
    )
    replacements = parse_tag_replacement(args.tag_replacement)
    naming = TagNaming(separator, args.character_tag_expand, args.remove_underscore, replacements)
    output_path = Path(args.output_path) if args.output_path else None
    writer = TagWriter(_extension(args.caption_extension), separator, args.append_tags, output_path)

    images = find_images(args.train_data_dir, args.recursive)
    if not images:
        hint = "" if args.recursive else " (add --recursive for sub-folders)"
        raise TaggerError(f"{args.train_data_dir}: no images found{hint}")
    logger.info("found %d image(s) in %s", len(images), args.train_data_dir)
    if output_path is None:
        _warn_shared_caption_files(images, writer.extension)

    files = ensure_model_files(resolve_model_files(args.repo_id, args.model_dir), args.force_download)
    model = TaggerModel(files, naming)
    if not files.default_format:
        options = dataclasses.replace(options, by_confidence=True)
    elif options.quality:
        logger.warning("--use_quality_tags*: WD14 models have no quality tags; ignored")
    logger.info("tagger %s on %s, input %dx%d", model.path, ", ".join(model.providers), *model.image_size)
    batch_size = model.batch_size(args.batch_size)
    select = TagSelector(model.labels, options, separator)
    frequency: collections.Counter = collections.Counter()
    skipped: list[ImageReadError] = []

    def run_batch(batch: list[LoadedImage]) -> None:
        for image, probs in zip(batch, model.predict([b.pixels for b in batch])):
            chosen = select(probs)
            frequency.update(chosen.tags)
            writer.add(image, chosen.tags)
            if args.debug:
                bar.write(_debug_lines(image.path, chosen, separator))
        bar.update(len(batch))

    batch: list[LoadedImage] = []
    workers = args.max_data_loader_n_workers
    loaded_images = load_in_order(images, lambda path: load_for_tagging(path, model.image_size), workers)
    with tqdm(total=len(images), unit="image", smoothing=0.0) as bar:
        for loaded in loaded_images:
            if isinstance(loaded, ImageReadError):  # named now and in the summary, never a stop
                skipped.append(loaded)
                bar.write(f"skipped: {loaded}", file=sys.stderr)
                bar.update(1)
                continue
            batch.append(loaded)
            if len(batch) == batch_size:
                run_batch(batch)
                batch = []
        if batch:
            run_batch(batch)

    if skipped:
        names = ", ".join(str(err.path) for err in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        logger.warning("%d unreadable image(s) skipped: %s", len(skipped), names)
    tagged = len(images) - len(skipped)
    if tagged == 0:
        raise TaggerError(f"none of the {len(images)} image(s) could be read; nothing was written")
    print(writer.close(tagged))
    if args.frequency_tags:
        print("Tag frequencies:")
        for name, count in sorted(frequency.items(), key=lambda item: (-item[1], item[0])):
            print(f"{name}: {count}")
    return 0


def _warn_shared_caption_files(images: Sequence[Path], extension: str) -> None:
    by_target = collections.defaultdict(list)
    for image in images:
        by_target[caption_path(image, extension)].append(image.name)
    for target, names in by_target.items():
        if len(names) > 1:
            logger.warning("%s share the caption file %s; the last one (%s) wins", ", ".join(names), target, names[-1])


def _debug_lines(path: Path, chosen: ImageTags, separator: str) -> str:
    lines = [f"{path}:"]
    for category in CATEGORIES:
        if chosen.by_category.get(category):
            lines.append(f"  {category} tags: {separator.join(chosen.by_category[category])}")
    return "\n".join(lines)


def write_output_file(path: Path, results: dict[str, dict]) -> None:
    """--output_path: `.jsonl` = one {"image_path", "caption", "image_size"} per line (sd-scripts' keys),
    anything else = one JSON object {image path: {"tags", "image_size"}}; both read by fine_tune.py."""
    if path.suffix.lower() == ".jsonl":
        lines = (
            {"image_path": key, "caption": entry["tags"], "image_size": entry["image_size"]}
            for key, entry in results.items()
        )
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    else:
        text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
