"""Prompt files for sample images during training (`--sample_prompts`): `.txt`, `.toml` or `.json`.

The forms are sd-scripts' (reference/sampling.md §2-3):

* `.txt`: one prompt per line; blank lines and lines whose first character is `#` are skipped.
  A line is split on " --": the first piece is the prompt, every other piece is `<name> <value>`
  with the name case-insensitive: `n` negative prompt, `w`/`h` size, `d` seed, `l` CFG scale,
  `s` steps, `ss` sampler (+ `g`, `cn`, `ctr`, `rcfg`, `fs`, `i`, `am`, which other architectures use
  and SD1/2 ignores). A literal " --" in the prompt text therefore starts an option.
* `.toml`: `[prompt]` holds defaults, each `[[prompt.subset]]` one prompt; a subset's keys override
  the defaults (upstream refuses a key given in both places; we let the subset win).
* `.json`: a list whose items are dicts with the keys above or strings in the `.txt` line form.

Unlike upstream, a value that does not parse is an error with its file and line (or entry),
reported before training starts, and so is an unknown sampler name. Unknown `.txt` options and
unknown keys are warnings (upstream ignores them silently).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_SCALE = 7.5
DEFAULT_STEPS = 30
MIN_SIZE = 64
SIZE_MULTIPLE = 8
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1

# `.txt` option -> dict key
TXT_OPTIONS = {
    "n": "negative_prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "l": "scale",
    "s": "sample_steps",
    "ss": "sample_sampler",
    "g": "guidance_scale",
    "cn": "controlnet_image",
    "ctr": "cfg_trunc_ratio",
    "rcfg": "renorm_cfg",
    "fs": "flow_shift",
    "i": "image",
    "am": "additional_network_multiplier",
}
USED_KEYS = ("prompt", "negative_prompt", "width", "height", "seed", "scale", "sample_steps", "sample_sampler")
# Keys upstream reads for other architectures or trainers: accepted and ignored for SD1/2.
IGNORED_KEYS = (
    "guidance_scale", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift", "image",
    "additional_network_multiplier", "enum", "subset",
)


class SamplePromptError(UserError, ValueError):
    """A prompt file that cannot be used; `problems` lists every problem found, with locations."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SamplePrompt:
    """One image to generate at each sampling trigger. `index` is its 0-based position in the file;
    `sample_sampler` None means `--sample_sampler`; `seed` None means one derived from the run seed."""

    index: int
    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    seed: int | None = None
    scale: float = DEFAULT_SCALE
    sample_steps: int = DEFAULT_STEPS
    sample_sampler: str | None = None
    location: str = ""  # "file:line" or "file: entry N", for messages
    ignored: dict = field(default_factory=dict)  # options of other architectures, kept for reference

    @property
    def image_width(self) -> int:
        return image_size(self.width)

    @property
    def image_height(self) -> int:
        return image_size(self.height)


def image_size(value: int) -> int:
    """Floor to a multiple of 8, at least 64 (sd-scripts' rule for SD1/2 samples)."""
    return max(MIN_SIZE, int(value) - int(value) % SIZE_MULTIPLE)


# --------------------------------------------------------------------------- values


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise ValueError("not an integer")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    number = float(value.strip() if isinstance(value, str) else value)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _convert(key: str, value: Any, known_samplers) -> Any:
    """Check and convert one value; raises ValueError with a short reason."""
    if key in ("prompt", "negative_prompt"):
        if not isinstance(value, str):
            raise ValueError("must be text")
        return value
    if key in ("width", "height"):
        number = _as_int(value)
        if number < 1:
            raise ValueError("must be a positive integer")
        return number
    if key == "seed":
        number = _as_int(value)
        if not 0 <= number <= MAX_SEED:
            raise ValueError("must be a non-negative integer below 2**64")
        return number
    if key == "sample_steps":
        return max(1, min(MAX_STEPS, _as_int(value)))  # clamped as upstream does
    if key == "scale":
        return _as_float(value)
    if key == "sample_sampler":
        if not isinstance(value, str):
            raise ValueError("must be a sampler name")
        name = value.strip().lower()
        if known_samplers is not None and name not in known_samplers:
            raise ValueError(f"unknown sampler {value!r} (choose from {', '.join(sorted(known_samplers))})")
        return name
    return value  # ignored keys are kept as given


def _describe(key: str, value: Any, reason: str) -> str:
    return f"{key} = {value!r}: {reason}"


# --------------------------------------------------------------------------- .txt lines


def parse_prompt_line(line: str, known_samplers=None) -> tuple[dict, list[str], list[str]]:
    """One `.txt` line -> (values by dict key, problems, warnings). The line is not a comment."""
    text = line.strip()
    if text.startswith("--"):
        text = " " + text  # a line of options only: the prompt is empty
    pieces = text.split(" --")
    values: dict = {"prompt": pieces[0].strip()}
    problems: list[str] = []
    warnings: list[str] = []
    for piece in pieces[1:]:
        name, _, raw = piece.partition(" ")
        key = TXT_OPTIONS.get(name.lower())
        if key is None:
            warnings.append(f"unknown option '--{piece.strip()}' ignored (options: --n --w --h --d --l --s --ss)")
            continue
        raw = raw.strip()
        if raw == "" and key != "negative_prompt":
            problems.append(f"--{name} needs a value")
            continue
        try:
            values[key] = _convert(key, raw, known_samplers)
        except ValueError as err:
            problems.append(f"--{name} {raw}: {err}")
    return values, problems, warnings


def _prompt_from_values(index: int, values: dict, location: str) -> SamplePrompt:
    used = {k: v for k, v in values.items() if k in USED_KEYS}
    ignored = {k: v for k, v in values.items() if k not in USED_KEYS}
    used.setdefault("prompt", "")
    return SamplePrompt(index=index, location=location, ignored=ignored, **used)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SamplePromptError([f"{path}: not UTF-8 text ({err})"]) from err


def _parse_txt(path: Path, known_samplers) -> tuple[list[SamplePrompt], list[str], list[str]]:
    prompts, problems, warnings = [], [], []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        location = f"{path}:{number}"
        values, line_problems, line_warnings = parse_prompt_line(line, known_samplers)
        problems += [f"{location}: {p}" for p in line_problems]
        warnings += [f"{location}: {w}" for w in line_warnings]
        prompts.append(_prompt_from_values(len(prompts), values, location))
    return prompts, problems, warnings


# --------------------------------------------------------------------------- dict forms


def _check_dict(entry: dict, location: str, known_samplers) -> tuple[dict, list[str], list[str]]:
    values, problems, warnings = {}, [], []
    for key, value in entry.items():
        if key not in USED_KEYS and key not in IGNORED_KEYS:
            warnings.append(f"{location}: unknown key {key!r} ignored (keys: {', '.join(USED_KEYS)})")
            continue
        if key == "subset":
            continue
        try:
            values[key] = _convert(key, value, known_samplers)
        except (ValueError, TypeError) as err:
            problems.append(f"{location}: {_describe(key, value, str(err))}")
    return values, problems, warnings


def _parse_toml(path: Path, known_samplers) -> tuple[list[SamplePrompt], list[str], list[str]]:
    import toml

    try:
        data = toml.loads(_read_text(path))
    except toml.TomlDecodeError as err:
        raise SamplePromptError([f"{path}:{err.lineno}: not valid TOML ({err.msg})"]) from err
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise SamplePromptError([f"{path}: needs a [prompt] table with [[prompt.subset]] entries (reference: docs/sampling.md)"])
    defaults = {k: v for k, v in table.items() if k != "subset"}
    subsets = table.get("subset")
    if subsets is None:
        if "prompt" not in defaults:
            raise SamplePromptError([f"{path}: [prompt] has no [[prompt.subset]] entries and no prompt key"])
        subsets = [{}]
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise SamplePromptError([f"{path}: prompt.subset must be a list of tables ([[prompt.subset]])"])
    default_values, problems, warnings = _check_dict(defaults, f"{path}: [prompt]", known_samplers)
    prompts = []
    for number, subset in enumerate(subsets, start=1):
        location = f"{path}: [[prompt.subset]] #{number}"
        values, subset_problems, subset_warnings = _check_dict(subset, location, known_samplers)
        problems += subset_problems
        warnings += subset_warnings
        prompts.append(_prompt_from_values(len(prompts), {**default_values, **values}, location))
    return prompts, problems, warnings


def _parse_json(path: Path, known_samplers) -> tuple[list[SamplePrompt], list[str], list[str]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise SamplePromptError([f"{path}:{err.lineno}: not valid JSON ({err.msg})"]) from err
    if not isinstance(data, list):
        raise SamplePromptError([f"{path}: must hold a JSON list of prompts (strings or objects)"])
    prompts, problems, warnings = [], [], []
    for number, entry in enumerate(data, start=1):
        location = f"{path}: entry {number}"
        if isinstance(entry, str):
            values, entry_problems, entry_warnings = parse_prompt_line(entry, known_samplers)
            entry_problems = [f"{location}: {p}" for p in entry_problems]
            entry_warnings = [f"{location}: {w}" for w in entry_warnings]
        elif isinstance(entry, dict):
            values, entry_problems, entry_warnings = _check_dict(entry, location, known_samplers)
        else:
            problems.append(f"{location}: must be a string or an object, not {type(entry).__name__}")
            continue
        problems += entry_problems
        warnings += entry_warnings
        prompts.append(_prompt_from_values(len(prompts), values, location))
    return prompts, problems, warnings


# --------------------------------------------------------------------------- files

PARSERS = {".txt": _parse_txt, ".toml": _parse_toml, ".json": _parse_json}


def read_sample_prompts(path: str | Path, known_samplers=None) -> tuple[list[SamplePrompt], list[str]]:
    """Parse a prompt file -> (prompts in file order, warnings). Raises SamplePromptError listing
    every problem (missing file, unknown extension, bad values with their line or entry).
    `known_samplers`: names accepted for `sample_sampler` (None: any)."""
    path = Path(path)
    parser = PARSERS.get(path.suffix.lower())
    if parser is None:
        raise SamplePromptError([f"{path}: prompt files must end in .txt, .toml or .json"])
    if not path.is_file():
        raise SamplePromptError([f"{path}: file not found"])
    prompts, problems, warnings = parser(path, known_samplers)
    if problems:
        raise SamplePromptError(problems)
    return prompts, warnings


def load_sample_prompts(path: str | Path, known_samplers=None) -> list[SamplePrompt]:
    """`read_sample_prompts` without the warnings."""
    return read_sample_prompts(path, known_samplers)[0]
