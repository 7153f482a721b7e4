"""Checkpoints: plain data only, atomic writes, readable errors, and the RNG states an exact
resume needs.

A checkpoint is input from strangers: it is read with torch.load(weights_only=True), which
unpickles tensors, numbers, strings, lists, tuples and dicts and refuses anything that could
run code. Everything q8 saves is such plain data.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from .errors import CheckpointError
from .quantize import rounding_state, set_rounding_state
from .runfolder import TEMP_SUFFIX, temp_beside

FORMAT = 2  # 2: plain data (weights_only); 1 pickled Python objects and is refused
REQUIRED = ("format", "model", "optimizer", "epoch", "step", "config")


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames themselves survive a crash
    finally:
        os.close(dir_fd)


def save(state: dict, path: str | Path, also: Iterable[str | Path] = ()) -> None:
    """Write `state` to `path` (and to each path in `also`) atomically.

    The data is written once; the other names are hard links to it, renamed into place before
    `path` itself. A kill at any moment leaves every name holding either its old content or
    the new one, never a partial file, and the temporary names are cleaned by clean_temporaries.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    links: list[str] = []
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save({"format": FORMAT, **state}, f)
            except RuntimeError as err:  # the zip writer hides a full disk behind its own error
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise
            f.flush()
            os.fsync(f.fileno())
        for other in map(Path, also):
            link = tempfile.mktemp(dir=other.parent, prefix=f".{other.name}.", suffix=TEMP_SUFFIX)
            os.link(tmp, link)
            links.append(link)
            os.replace(link, other)
            links.remove(link)
        os.replace(tmp, path)
    except BaseException:
        for name in [tmp, *links]:
            if os.path.exists(name):
                os.unlink(name)
        raise
    _fsync_dir(path.parent)


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files a killed save left behind in `folder` (call it holding the
    run folder's lock, so no live save is touched); returns them."""
    stale = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load(path: str | Path) -> dict:
    """Read a q8 checkpoint onto the CPU; CheckpointError names the file and the cause.

    Only plain data is accepted (weights_only=True): a file that needs anything else to load,
    a crafted pickle among them, is refused without running it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a zip, a pickle that needs code to load...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            first = "it holds Python objects beyond plain data (tensors, numbers, strings, dicts), refused unread"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{path} is not a q8 checkpoint of format {FORMAT} (found format {found})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    return state


def first_non_finite(tensors: dict, prefix: str = "") -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or Inf in a nested state, or None."""
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name
        elif isinstance(value, dict):
            found = first_non_finite(value, name + ".")
            if found:
                return found
        elif isinstance(value, (list, tuple)):
            found = first_non_finite(dict(enumerate(value)), name + ".")
            if found:
                return found
    return None


def rng_state() -> dict:
    """Every random stream a run draws from, as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "rounding": rounding_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "rounding" in state:
        set_rounding_state(state["rounding"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
