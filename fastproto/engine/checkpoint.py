"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``, clear errors naming the file.

A training checkpoint is a dict::

    {"format": "fastproto.checkpoint", "version": 1, "model": state_dict, "optimizer": ..., "scheduler": ...,
     "scaler": ..., "step": int, "epoch": int, "rng_state": ..., "config": dict, "metrics": dict,
     "versions": {"torch": str, "fastproto": str}}

Everything in it is a tensor or a plain Python value (RNG states included, see :func:`get_rng_state`), so it
loads with ``weights_only=True``: loading a checkpoint never runs code from the file. Model weights sit under
``"model"``, which is what ``fastproto eval --checkpoint`` reads (:func:`load_weights` also accepts the bare
state dicts written by :func:`export_weights`).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np
import torch
from torch import nn

import fastproto
from fastproto.engine.distributed import unwrap_model

FORMAT = "fastproto.checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the objects it is loaded into."""


# ---------------------------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s directory, fsync it, then ``os.replace`` it onto
    ``path``: readers see the old file or the complete new one, never a partial one. On any failure
    (including KeyboardInterrupt) the temporary file is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX); not possible on every platform / filesystem
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the entry when ``value`` would not load with ``weights_only=True``."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored in a checkpoint")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: checkpoints hold tensors and plain Python values only "
                    "(so that they load with weights_only=True)")


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    step: int = 0, epoch: int = 0, rng_state=None, config: dict | None = None,
                    metrics: dict | None = None) -> None:
    """Write a training checkpoint atomically (see the module docstring for its layout).

    ``model`` may be wrapped (DDP, :class:`~fastproto.engine.distributed.LossForward`): the plain model's state
    dict is stored. ``config`` and ``metrics`` must be plain values (dicts, lists, numbers, strings, tensors)."""
    _check_plain(config, "config")
    _check_plain(metrics, "metrics")
    _check_plain(rng_state, "rng_state")
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "step": int(step),
        "epoch": int(epoch),
        "rng_state": rng_state,
        "config": config or {},
        "metrics": metrics or {},
        "versions": {"torch": str(torch.__version__), "fastproto": str(fastproto.__version__)},
    }
    atomic_write(path, lambda f: torch.save(ckpt, f))


def export_weights(path: str | os.PathLike, model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Write the plain model's state dict alone (for deployment), atomically; ``dtype`` casts floating tensors."""
    state = unwrap_model(model).state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_write(path, lambda f: torch.save(state, f))


# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path!r} holds objects that weights_only loading refuses (it was not "
                              f"written by fastproto, or holds a pickled model): {e}") from e
    except Exception as e:  # a damaged file can fail anywhere in the unpickler (EOFError, IndexError, ...)
        size = os.path.getsize(path)
        raise CheckpointError(f"checkpoint {path!r} ({size} bytes) cannot be read: truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
                     source: str = "state dict") -> None:
    """``model.load_state_dict(state)`` with an error listing the missing / unexpected / mis-shaped keys."""
    model = unwrap_model(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_head(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (file vs model) ({len(shapes)}): {_head(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)


def _head(items: list[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None, optimizer=None, scheduler=None,
                    scaler=None, map_location="cpu", strict: bool = True) -> dict:
    """Read a training checkpoint and load its states into the given objects; returns the checkpoint dict
    (``step``, ``epoch``, ``rng_state``, ``config``, ``metrics``, ...). RNG states are not applied here
    (see :func:`set_rng_state`)."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a fastproto training checkpoint (no {FORMAT!r} header); "
                              "use load_weights() for bare state dicts")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {ckpt['version']}, newer than this "
                              f"fastproto ({VERSION}): upgrade fastproto")
    if model is not None:
        load_model_state(model, ckpt["model"], strict=strict, source=f"checkpoint {path!r}")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if ckpt.get(name) is None:
            raise CheckpointError(f"checkpoint {path!r} has no {name} state")
        try:
            obj.load_state_dict(ckpt[name])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the {name} state in checkpoint {path!r} does not fit this {name} "
                                  f"({type(obj).__name__}): {e}") from e
    return ckpt


def load_weights(path: str | os.PathLike, model: nn.Module, *, strict: bool = True, map_location="cpu") -> nn.Module:
    """Load model weights from a training checkpoint (its ``"model"`` entry) or a bare state dict
    (:func:`export_weights`, or a DDP-saved one with ``module.`` prefixes); returns ``model``."""
    path = os.fspath(path)
    obj = read_checkpoint(path, map_location)
    state = obj["model"] if isinstance(obj, dict) and obj.get("format") == FORMAT else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} holds neither a fastproto checkpoint nor a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    load_model_state(model, state, strict=strict, source=f"weights file {path!r}")
    return model


# ---------------------------------------------------------------------------------------------- RNG


def get_rng_state() -> dict:
    """The states of torch (CPU and every CUDA device), numpy's global generator and ``random``, as tensors
    and plain values (so that they load with ``weights_only=True``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned. CUDA states are restored when the device count matches."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
