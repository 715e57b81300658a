"""Search checkpoints that hold only data: JSON, tensors and plain arrays.

A run directory is something users copy, share and download. If resuming from it unpickled
anything (SB3's ``save`` cloudpickles parts of the agent, its replay buffer is a pickle), a crafted
checkpoint would run code on ``resume``. So a checkpoint here is

* ``state.json``: configuration, counters, the search history and RNG states (JSON);
* ``sac.pt``: the agent's network and optimiser state dicts, read with ``weights_only=True``;
* ``replay.npz``: the replay buffer's arrays, read with ``allow_pickle=False``.

The agent itself is rebuilt from the run's configuration and these states are copied into it, so
nothing in a checkpoint names code. ``latest.json`` names the newest checkpoint directory; it may
only name a plain sub-directory of the checkpoint root, so a pointer cannot lead elsewhere.

Every failure to read a checkpoint is a :class:`~autodfp.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autodfp._io import atomic_path, atomic_write_text
from autodfp._jsonio import read_json
from autodfp.errors import AutoDFPError, CheckpointError

#: /2 holds only data; /1 pickled the agent (``sac.zip``, ``replay.pkl``) and is refused for SAC.
CHECKPOINT_FORMAT = "autodfp.search-checkpoint/2"
LEGACY_FORMAT = "autodfp.search-checkpoint/1"
POINTER = "latest.json"
STATE = "state.json"
AGENT = "sac.pt"
REPLAY = "replay.npz"
_DIR_NAME = re.compile(r"ep-\d{6,}")
#: what a checkpoint directory may hold: its files, the /1 format's, and temporaries of interrupted atomic writes
_CKPT_FILE = re.compile(
    r"(state\.json|sac\.pt|replay\.npz|sac\.zip|replay\.pkl)|\.(state\.json|sac\.pt|replay\.npz)\.\w{8}\.tmp"
)
_ROOT_FILE = re.compile(r"latest\.json|\.latest\.json\.\w{8}\.tmp")

_BUFFER_ARRAYS = (
    "observations",
    "next_observations",
    "actions",
    "rewards",
    "dones",
    "timeouts",
    "episode_of",
    "is_final",
)
_PENDING = ("obs", "next_obs", "action")


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if not text:
        return exc.__class__.__name__
    return text.splitlines()[0].split(". ")[0][:200].rstrip(" .:")


def _refused(file: Path, exc: BaseException) -> CheckpointError:
    if isinstance(exc, pickle.UnpicklingError) or "pickle" in str(exc).lower():
        return CheckpointError(f"checkpoint file {file} holds pickled objects, not only data; refused")
    return CheckpointError(f"checkpoint file {file} is damaged ({_first_line(exc)})")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn any failure while restoring state from ``path`` into a one-line CheckpointError.

    Restoring walks nested JSON and state dicts; a damaged file can fail anywhere in that walk with
    a KeyError or a shape error, and the user needs the file's name, not the failing line.
    """
    try:
        yield
    except CheckpointError:
        raise
    except (
        AutoDFPError,
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        RuntimeError,
        AttributeError,
        OverflowError,
    ) as exc:
        detail = f"missing entry {exc}" if isinstance(exc, KeyError) else _first_line(exc)
        raise CheckpointError(f"checkpoint file {path} is damaged ({detail})") from None


def is_checkpoint_root(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint root as :class:`Checkpointer` makes it: a real directory
    holding only the pointer, ``ep-NNNNNN`` directories of checkpoint files, and temporaries of
    interrupted writes (an empty one too: a run killed before its first checkpoint).

    The output directory counts such a ``search/`` as autodfp's own; a folder of the user's that
    happens to be called ``search`` is not, and is never written into.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        for entry in os.scandir(path):
            if _ROOT_FILE.fullmatch(entry.name):
                if not entry.is_file(follow_symlinks=False):
                    return False
            elif not (_DIR_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                return False
            elif not all(
                f.is_file(follow_symlinks=False) and _CKPT_FILE.fullmatch(f.name) for f in os.scandir(entry.path)
            ):
                return False
    except OSError:
        return False
    return True


class Checkpointer:
    """A directory of checkpoints under ``root``, published by atomically rewriting ``latest.json``.

    Its directories are created as real directories and a link at their names is refused
    (:func:`autodfp.eval.outdir.ensure_dir`): the root is usually ``OUT/search``, and a planted link
    must not send the writes, or the removal of old checkpoints, outside OUT.
    """

    def __init__(self, root: str | Path | None, config: dict[str, Any]) -> None:
        self.root = Path(root) if root is not None else None
        self.config = config

    def latest(self) -> Path | None:
        if self.root is None:
            return None
        if self.root.is_symlink():
            raise CheckpointError(f"checkpoint directory {self.root} is a symbolic link; refused")
        if not (self.root / POINTER).is_file():
            return None
        pointer = self.root / POINTER
        doc = read_json(pointer, f"checkpoint pointer {pointer}", error=CheckpointError, max_bytes=1 << 16)
        if not isinstance(doc, dict) or "dir" not in doc:
            raise CheckpointError(f"checkpoint pointer {pointer} is damaged")
        name = doc["dir"]
        # Only a plain child of the root: no absolute path, no '..', no separator, no symlink out.
        if not isinstance(name, str) or not _DIR_NAME.fullmatch(name):
            raise CheckpointError(
                f"checkpoint pointer {pointer} names {name!r}, not a checkpoint directory inside {self.root}"
            )
        path = self.root / name
        if path.is_symlink() or path.resolve().parent != self.root.resolve():
            raise CheckpointError(f"checkpoint pointer {pointer} leads outside {self.root}")
        if not (path / STATE).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no {STATE})")
        return path

    def read_state(self, path: Path) -> dict[str, Any]:
        """``state.json`` as a dict, without checking that it belongs to this search."""
        file = path / STATE
        state = read_json(file, f"checkpoint file {file}", error=CheckpointError)
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise CheckpointError(f"checkpoint file {file} is damaged (not an autodfp search checkpoint)")
        return state

    def load_state(self, path: Path) -> dict[str, Any]:
        file = path / STATE
        state = self.read_state(path)
        fmt = state.get("format")
        if fmt == LEGACY_FORMAT and state["config"].get("method") == "sac":
            raise CheckpointError(
                f"{path} was written by an older autodfp that pickled the agent; it "
                "cannot be resumed safely: delete it or start without resuming"
            )
        if fmt not in (CHECKPOINT_FORMAT, LEGACY_FORMAT):
            raise CheckpointError(f"{file} is not an autodfp search checkpoint")
        saved = state["config"]
        diff = [k for k in self.config if saved.get(k) != self.config[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(
                f"cannot resume from {path}: it was made with {k}={saved.get(k)!r}, "
                f"this search has {k}={self.config[k]!r}"
            )
        with reading(file):
            done = state["episodes_done"]
            if not isinstance(done, int) or isinstance(done, bool) or done < 0:
                raise ValueError(f"episodes_done is {done!r}")
            for key in ("tracker", "rng"):
                if not isinstance(state[key], dict):
                    raise ValueError(f"'{key}' is not an object")
        return state

    def save(self, episodes: int, state: dict[str, Any], writers: dict[str, Callable[[Path], None]]) -> None:
        if self.root is None:
            return
        from autodfp.eval.outdir import ensure_dir

        name = f"ep-{episodes:06d}"
        path = self.root / name
        ensure_dir(self.root, what="checkpoint directory", error=CheckpointError)
        ensure_dir(path, what="checkpoint directory", error=CheckpointError)
        for fname, write in writers.items():
            with atomic_path(path / fname) as tmp:
                write(tmp)
        atomic_write_text(
            path / STATE,
            json.dumps({"format": CHECKPOINT_FORMAT, "config": self.config, "episodes_done": episodes, **state}) + "\n",
        )
        atomic_write_text(self.root / POINTER, json.dumps({"dir": name, "episodes": episodes}) + "\n")
        for old in self.root.glob("ep-*"):
            if _DIR_NAME.fullmatch(old.name) and old.is_dir() and not old.is_symlink() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The SAC agent: state dicts only
# ---------------------------------------------------------------------------------------------
def save_agent(model: Any, path: Path) -> None:
    blob: dict[str, Any] = {
        "policy": model.policy.state_dict(),
        "actor_optimizer": model.actor.optimizer.state_dict(),
        "critic_optimizer": model.critic.optimizer.state_dict(),
    }
    if model.ent_coef_optimizer is not None:
        blob["ent_coef_optimizer"] = model.ent_coef_optimizer.state_dict()
        blob["log_ent_coef"] = model.log_ent_coef.detach().clone()
    torch.save(blob, path)


def agent_counters(model: Any) -> dict[str, int]:
    return {
        "num_timesteps": int(model.num_timesteps),
        "n_updates": int(model._n_updates),
        "episode_num": int(model._episode_num),
    }


def load_agent(model: Any, path: Path, counters: dict[str, Any]) -> None:
    """Copy saved states into ``model``, an agent freshly built from the same configuration."""
    file = path / AGENT
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {AGENT})")
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses code; anything else is a damaged file
        raise _refused(file, exc) from None
    with reading(file):
        if not isinstance(blob, dict):
            raise ValueError(f"a {type(blob).__name__}, not a dict")
        model.policy.load_state_dict(blob["policy"])
        model.actor.optimizer.load_state_dict(blob["actor_optimizer"])
        model.critic.optimizer.load_state_dict(blob["critic_optimizer"])
        if model.ent_coef_optimizer is not None:
            value = blob["log_ent_coef"]
            if not isinstance(value, torch.Tensor) or value.shape != model.log_ent_coef.shape:
                raise ValueError("log_ent_coef has the wrong shape")
            with torch.no_grad():  # in place: the optimiser holds this very tensor
                model.log_ent_coef.copy_(value)
            model.ent_coef_optimizer.load_state_dict(blob["ent_coef_optimizer"])
    with reading(path / STATE):
        model.num_timesteps = _count(counters["num_timesteps"])
        model._n_updates = _count(counters["n_updates"])
        model._episode_num = _count(counters["episode_num"])


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"counter is {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# The replay buffer: arrays plus JSON metadata
# ---------------------------------------------------------------------------------------------
def replay_meta(buffer: Any) -> dict[str, Any]:
    """What state.json records about the buffer beside its arrays."""
    return {
        "pos": int(buffer.pos),
        "full": bool(buffer.full),
        "size": int(buffer.buffer_size if buffer.full else buffer.pos),
    }


def save_replay(buffer: Any, path: Path) -> None:
    """Write the filled part of ``buffer`` to ``path`` as npz."""
    n = buffer.buffer_size if buffer.full else buffer.pos
    arrays = {name: getattr(buffer, name)[:n] for name in _BUFFER_ARRAYS if getattr(buffer, name, None) is not None}
    arrays["episode_rewards"] = np.asarray(buffer.episode_rewards, dtype=np.float64)
    for i, name in enumerate(_PENDING):
        if buffer.pending:
            arrays[f"pending_{name}"] = np.stack([p[i] for p in buffer.pending])
    arrays["pending_reward"] = np.asarray([p[3] for p in buffer.pending], dtype=np.float64)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_replay(buffer: Any, path: Path, meta: dict[str, Any]) -> None:
    """Fill ``buffer`` (fresh, empty, same configuration) from ``path``; no pickles are read."""
    file = path / REPLAY
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {REPLAY})")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # pickled content is refused by allow_pickle=False; the rest is damage
        raise _refused(file, exc) from None
    with reading(path / STATE):
        pos, full, n = meta["pos"], meta["full"], meta["size"]
        if (
            not isinstance(full, bool)
            or not 0 <= _count(pos) < buffer.buffer_size
            or _count(n) != (buffer.buffer_size if full else pos)
        ):
            raise ValueError(f"replay metadata {meta!r} does not fit a buffer of {buffer.buffer_size}")
    with reading(file):
        for name in _BUFFER_ARRAYS:
            target = getattr(buffer, name, None)
            if target is None:
                continue
            src = arrays[name]
            if src.dtype != target.dtype or src.shape != (n, *target.shape[1:]):
                raise ValueError(
                    f"'{name}' is {src.dtype} {src.shape}, expected {target.dtype} {(n, *target.shape[1:])}"
                )
            target[:n] = src
        rewards = arrays["episode_rewards"]
        if rewards.dtype != np.float64 or rewards.ndim != 1:
            raise ValueError("'episode_rewards' is not a float64 vector")
        pending_r = arrays["pending_reward"]
        if pending_r.dtype != np.float64 or pending_r.ndim != 1:
            raise ValueError("'pending_reward' is not a float64 vector")
        pending = [arrays[f"pending_{name}"] if len(pending_r) else [] for name in _PENDING]
        if any(len(p) != len(pending_r) for p in pending):
            raise ValueError("pending transitions have unequal lengths")
    buffer.pos, buffer.full = pos, full
    buffer.episode_rewards = rewards.tolist()
    buffer.pending = [(pending[0][i], pending[1][i], pending[2][i], float(pending_r[i])) for i in range(len(pending_r))]


__all__ = [
    "AGENT",
    "CHECKPOINT_FORMAT",
    "Checkpointer",
    "LEGACY_FORMAT",
    "POINTER",
    "REPLAY",
    "STATE",
    "agent_counters",
    "is_checkpoint_root",
    "load_agent",
    "load_replay",
    "reading",
    "replay_meta",
    "save_agent",
    "save_replay",
]
