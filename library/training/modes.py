"""Train/eval modes switched for a while and put back exactly as they were."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch


@contextmanager
def eval_mode(modules: Iterable[torch.nn.Module | None]):
    """Every submodule in eval mode inside the block; each one's own mode restored on exit (mixed states too)."""
    seen, modes = set(), []
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                modes.append((sub, sub.training))
    try:
        for sub, _ in modes:
            sub.training = False
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode
