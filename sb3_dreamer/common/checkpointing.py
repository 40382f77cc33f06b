"""Checkpointing for DreamerV2: atomic file writes, RNG states, and the resume state of a running collection.

What a DreamerV2 checkpoint holds (see ``docs/resume.md``):

* the model zip written by :meth:`DreamerV2.save` (networks, slow critic, the three optimizers, counters,
  ``_last_obs``/``_last_episode_starts``, schedules' progress) plus a ``_resume_state`` entry built by
  :func:`capture_resume_state`: the RNG states (python, numpy, torch, the action space's sampler), the RSSM collection
  state ``_last_state`` as numpy arrays, and the *pending step*: ``CheckpointCallback`` (like every callback) runs in
  the middle of an environment step, after ``env.step`` but before the transition is stored, so the checkpoint keeps
  that transition and the resumed run completes the step exactly where the interrupted one would have;
* the replay buffer pickle written by :meth:`DreamerV2.save_replay_buffer` (its sampler's numpy Generator included).

Both files are written atomically (:func:`atomic_write`): to a temporary file in the destination folder, fsynced,
then ``os.replace``-d over the destination, so an interrupted save leaves the previous file intact.
"""

import copy
import dataclasses
import glob
import io
import json
import os
import pathlib
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.save_util import load_from_pkl
from stable_baselines3.common.type_aliases import TrainFreq
from stable_baselines3.common.utils import should_collect_more_steps

from sb3_dreamer.common.type_aliases import RSSMState

if TYPE_CHECKING:
    from sb3_dreamer.dreamerv2.dreamerv2 import DreamerV2

PathLike = str | pathlib.Path | io.BufferedIOBase
RESUME_STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------- atomic writes
def resolve_save_path(path: str | pathlib.Path, suffix: str) -> pathlib.Path:
    """The file SB3's ``open_path(path, "w", suffix=suffix)`` would write: ``.suffix`` appended when there is none."""
    path = pathlib.Path(path)
    if path.suffix == "" and suffix:
        path = pathlib.Path(f"{path}.{suffix}")
    if path.is_dir():  # SB3 writes to ``<path>_2`` when the path is a folder
        path = pathlib.Path(f"{path}_2")
    return path


def _fsync_dir(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (True where that cannot be told, e.g. on Windows)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # alive but not ours, or no way to tell (then keep the file)
        return True
    return True


def remove_stale_temp_files(final: pathlib.Path) -> list[pathlib.Path]:
    """Delete temporary files left next to ``final`` by writers that were killed (their process no longer exists).

    :return: the files removed
    """
    removed = []
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid_text = tmp.name[len(final.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(path: PathLike, write: Callable[[PathLike], None], suffix: str) -> None:
    """Run ``write(target)`` so that ``path`` is replaced all at once or not at all.

    For a path, ``write`` gets a temporary path in the same folder; the temporary file is
    fsynced, renamed over the destination with ``os.replace`` (atomic on POSIX and Windows) and the folder is fsynced.
    If ``write`` raises, the temporary file is removed and the destination is untouched. A process killed mid-write can
    leave a ``.<name>.<pid>.<random>.tmp`` file behind, never a half-written destination; the next save to the same
    destination deletes such files of dead processes. File objects are written directly.

    :param path: destination (str, Path or an open binary file)
    :param write: writes the whole file to the target it is given
    :param suffix: extension SB3 appends when ``path`` has none (``"zip"`` or ``"pkl"``)
    """
    if not isinstance(path, (str, pathlib.Path)):
        write(path)
        return
    final = resolve_save_path(path, suffix)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(final)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the result the permissions open() would
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


# ---------------------------------------------------------------------------------------------------- RNG states
def get_rng_states(action_space: spaces.Space | None = None) -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU and CUDA) and of ``action_space``'s sampler (picklable, torch-free)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": th.get_rng_state().numpy().copy(),
        "cuda": [s.numpy().copy() for s in th.cuda.get_rng_state_all()] if th.cuda.is_available() else None,
        "action_space": None,
    }
    generator = getattr(action_space, "_np_random", None)
    if generator is not None:
        states["action_space"] = copy.deepcopy(generator)
    return states


def set_rng_states(states: dict[str, Any], action_space: spaces.Space | None = None) -> None:
    """Restore what :func:`get_rng_states` captured."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    th.set_rng_state(th.as_tensor(states["torch"], dtype=th.uint8))
    if states.get("cuda") is not None and th.cuda.is_available() and len(states["cuda"]) == th.cuda.device_count():
        th.cuda.set_rng_state_all([th.as_tensor(s, dtype=th.uint8) for s in states["cuda"]])
    if action_space is not None and states.get("action_space") is not None:
        action_space._np_random = copy.deepcopy(states["action_space"])  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------- resume state
def _state_to_numpy(state: tuple[RSSMState, th.Tensor] | None) -> tuple[np.ndarray, ...] | None:
    if state is None:
        return None
    post, action = state
    return tuple(x.detach().cpu().numpy().copy() for x in (*post, action))


def _state_from_numpy(arrays: Sequence[np.ndarray] | None, device: th.device) -> tuple[RSSMState, th.Tensor] | None:
    if arrays is None:
        return None
    deter, stoch, stats, action = (th.as_tensor(x, device=device) for x in arrays)
    return RSSMState(deter, stoch, stats), action


_INFO_KEYS = ("episode", "is_success", "terminal_observation", "TimeLimit.truncated")  # what storing a step reads


def capture_pending_step(model: "DreamerV2") -> dict[str, Any] | None:
    """The environment step in progress (``env.step`` done, transition not stored yet), or None.

    Callbacks run between ``env.step`` and storing the transition (see ``OffPolicyAlgorithm.collect_rollouts``); their
    ``locals`` hold the step's results. ``num_collected_*`` count this chunk of ``train_freq`` steps. After a ``learn``
    stopped by a callback, the step kept by ``DreamerV2.collect_rollouts`` is returned.
    """
    if not model._step_pending:
        return None
    callback = model._rollout_callback
    if callback is None:  # learn() has returned: the step was kept when a callback stopped it
        return copy.deepcopy(model._stopped_step)
    if "new_obs" not in callback.locals:
        return None
    loc = callback.locals
    steps, episodes = model._chunk_offset
    return copy.deepcopy(
        {
            "last_obs": model._last_obs,  # the observation the step started from
            "last_original_obs": model._last_original_obs,
            "new_obs": loc["new_obs"],
            "rewards": loc["rewards"],
            "dones": loc["dones"],
            "infos": [{k: v for k, v in info.items() if k in _INFO_KEYS} for info in loc["infos"]],
            "buffer_actions": loc["buffer_actions"],
            "num_collected_steps": steps + loc["num_collected_steps"],
            "num_collected_episodes": episodes + loc["num_collected_episodes"],
        }
    )


def capture_resume_state(model: "DreamerV2") -> dict[str, Any]:
    """Everything a checkpoint needs beyond SB3's own save data to resume exactly (see module docstring)."""
    return {
        "version": RESUME_STATE_VERSION,
        "num_timesteps": model.num_timesteps,
        "rng": get_rng_states(model.action_space),
        "last_state": _state_to_numpy(model._last_state),
        "pending": capture_pending_step(model),
    }


def mark_trajectories_cut(buffer: Any) -> None:
    """The collection restarts from an env reset: end every env column's stored trajectory (``is_last``), and make the
    next ``add`` of each env start a new episode (``is_first``), whatever the reset observation looks like."""
    if getattr(buffer, "actions", None) is None or not hasattr(buffer, "env_pos"):
        return
    stored = np.where(buffer.env_full, buffer.rows, buffer.env_pos)
    envs = np.flatnonzero(stored > 0)
    buffer.is_last[(buffer.env_pos[envs] - 1) % buffer.rows, envs] = True
    buffer.needs_first[:] = True


def complete_pending_step(model: "DreamerV2", pending: dict[str, Any]) -> None:
    """Finish an interrupted environment step the way ``collect_rollouts`` would have, and run the training that was
    due at its end; if the ``train_freq`` chunk is not complete, the next ``collect_rollouts`` collects only its rest."""
    dones = pending["dones"]
    model._update_info_buffer(pending["infos"], dones)
    model._store_transition(model.replay_buffer, pending["buffer_actions"], pending["new_obs"], pending["rewards"], dones,
                            pending["infos"])
    model._update_current_progress_remaining(model.num_timesteps, model._total_timesteps)
    model._on_step()
    n_done = int(np.sum(dones))
    model._episode_num += n_done
    steps, episodes = pending["num_collected_steps"], pending["num_collected_episodes"] + n_done
    train_freq = model.train_freq
    assert isinstance(train_freq, TrainFreq)
    if should_collect_more_steps(train_freq, steps, episodes):
        done_so_far = steps if train_freq.unit.value == "step" else episodes
        model._first_chunk = TrainFreq(train_freq.frequency - done_so_far, train_freq.unit)
        model._chunk_offset = (steps, episodes)
    elif model.num_timesteps > 0 and model.num_timesteps > model.learning_starts:
        gradient_steps = model.gradient_steps if model.gradient_steps >= 0 else steps * model.n_envs
        if gradient_steps > 0:
            model.train(batch_size=model.batch_size, gradient_steps=gradient_steps)


def resume_collection(model: "DreamerV2", resume_state: dict[str, Any] | None, pending: dict[str, Any] | None,
                      env_was_reset: bool) -> None:
    """Called by ``DreamerV2._setup_learn`` when a run continues (``reset_num_timesteps=False``).

    :param resume_state: the state loaded from a checkpoint (None when continuing in-process)
    :param pending: the environment step in progress when the run stopped (None if none)
    :param env_was_reset: whether ``_setup_learn`` just reset the env (``load(..., force_reset=True)``, the default)
    """
    if resume_state is not None:
        set_rng_states(resume_state["rng"], model.action_space)
    if not env_was_reset:
        if resume_state is not None:
            model._last_state = _state_from_numpy(resume_state["last_state"], model.device)
        if pending is not None:
            complete_pending_step(model, pending)
        return
    # Clean restart: the env was reset, so the RSSM state is zeroed. The pending transition is still real experience:
    # store it (and train if that was due), then cut the stored trajectories; collection goes on from the reset.
    model._last_state = None
    if pending is not None and pending.get("last_obs") is not None:
        reset_obs = model._last_obs, model._last_original_obs, model._last_episode_starts
        model._last_obs, model._last_original_obs = pending["last_obs"], pending["last_original_obs"]
        complete_pending_step(model, pending)
        model._last_obs, model._last_original_obs, model._last_episode_starts = reset_obs
    mark_trajectories_cut(model.replay_buffer)


# ---------------------------------------------------------------------------------------------------- load checks
def check_model_file(path: PathLike, required: Sequence[str]) -> None:
    """Fail early with a clear ``ValueError`` if ``path`` is not an intact DreamerV2 model zip.

    :param path: what ``DreamerV2.load`` was given
    :param required: archive members a DreamerV2 zip always has (``data`` and one ``.pth`` per torch object)
    """
    if isinstance(path, (str, pathlib.Path)):
        file_path = pathlib.Path(path)
        if not file_path.exists() and pathlib.Path(f"{file_path}.zip").exists():
            file_path = pathlib.Path(f"{file_path}.zip")
        if not file_path.is_file():
            return  # let SB3 raise its FileNotFoundError
        _check_archive(file_path, str(path), required)
    elif hasattr(path, "seek") and hasattr(path, "tell") and path.seekable():
        start = path.tell()
        try:
            _check_archive(path, repr(path), required)  # type: ignore[arg-type]
        finally:
            path.seek(start)


def _check_archive(file: Any, name: str, required: Sequence[str]) -> None:
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"{name} is corrupted: archive member {bad!r} fails its CRC check.")
            names = archive.namelist()
            missing = [m for m in required if m not in names]
            if "data" not in names or "policy.pth" not in names:
                raise ValueError(f"{name} is not a readable model zip (truncated, corrupted or another file type): it "
                                 f"lacks SB3's 'data' and 'policy.pth' entries (found {sorted(names)[:8]}).")
            if missing:
                raise ValueError(
                    f"{name} is not a DreamerV2 model: it lacks {missing} (it holds {sorted(names)}). "
                    "Was it saved by another algorithm? Load it with that algorithm's class."
                )
            try:
                json.loads(archive.read("data").decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{name} is corrupted: its 'data' entry is not valid JSON ({e}).") from e
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{name} is not a readable model zip (truncated, corrupted or another file type): {e}") from e


def load_sequence_buffer(path: PathLike, model: "DreamerV2", buffer_class: type) -> Any:
    """Unpickle a replay buffer saved by ``save_replay_buffer`` and check that it fits ``model``.

    :return: the buffer, on ``model.device``
    :raises ValueError: for unreadable files and for buffers of another class or other spaces
    """
    try:
        buffer = load_from_pkl(path, model.verbose)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"Cannot read a replay buffer from {path}: the file is truncated, corrupted or not a pickled "
                         f"replay buffer ({type(e).__name__}: {e}).") from e
    if not isinstance(buffer, buffer_class):
        raise ValueError(f"{path} holds a {type(buffer).__name__}, but this DreamerV2 model needs a {buffer_class.__name__}.")
    for what in ("observation_space", "action_space"):
        if getattr(buffer, what) != getattr(model, what):
            raise ValueError(f"The replay buffer in {path} was collected with {what} {getattr(buffer, what)}, "
                             f"the model has {getattr(model, what)}.")
    if buffer.n_envs != model.n_envs:
        raise ValueError(f"The replay buffer in {path} has {buffer.n_envs} env columns, the model runs {model.n_envs} envs.")
    buffer.device = model.device
    return buffer


# ---------------------------------------------------------------------------------------------------- finding checkpoints
@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The files of one checkpoint written by SB3's ``CheckpointCallback`` (or the zoo launcher's rolling one)."""

    steps: int
    model: pathlib.Path
    replay_buffer: pathlib.Path | None
    vecnormalize: pathlib.Path | None

    @property
    def files(self) -> list[pathlib.Path]:
        return [path for path in (self.model, self.replay_buffer, self.vecnormalize) if path is not None]


def checkpoint_files(folder: pathlib.Path, steps: int,
                     name_prefix: str = "rl_model") -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(model zip, replay buffer pkl, VecNormalize pkl) of the checkpoint at ``steps`` (SB3's CheckpointCallback names)."""
    return (
        folder / f"{name_prefix}_{steps}_steps.zip",
        folder / f"{name_prefix}_replay_buffer_{steps}_steps.pkl",
        folder / f"{name_prefix}_vecnormalize_{steps}_steps.pkl",
    )


def list_checkpoints(save_path: str | pathlib.Path, require_buffer: bool = True,
                     name_prefix: str = "rl_model") -> list[Checkpoint]:
    """The complete checkpoints written by ``CheckpointCallback(save_path, name_prefix=...)``, oldest first.

    ``CheckpointCallback`` writes ``<prefix>_<steps>_steps.zip`` and then ``<prefix>_replay_buffer_<steps>_steps.pkl``;
    a run killed between the two leaves a model without its buffer, so by default only steps with both files count.

    :param save_path: the callback's folder
    :param require_buffer: skip checkpoints whose replay buffer file is missing
    :param name_prefix: the callback's ``name_prefix``
    """
    folder = pathlib.Path(save_path)
    pattern = re.compile(rf"^{re.escape(name_prefix)}_(\d+)_steps\.zip$")
    found = []
    for path in folder.glob(f"{glob.escape(name_prefix)}_*_steps.zip"):
        match = pattern.match(path.name)
        if match is None:
            continue
        steps = int(match.group(1))
        model, buffer, stats = checkpoint_files(folder, steps, name_prefix)
        if require_buffer and not buffer.is_file():
            continue
        found.append(Checkpoint(steps, model, buffer if buffer.is_file() else None, stats if stats.is_file() else None))
    return sorted(found, key=lambda checkpoint: checkpoint.steps)


def latest_checkpoint(save_path: str | pathlib.Path, name_prefix: str = "rl_model",
                      require_buffer: bool = True) -> tuple[pathlib.Path, pathlib.Path | None] | None:
    """The newest complete checkpoint of :func:`list_checkpoints`.

    :return: ``(model zip, replay buffer pkl or None)``, or None if there is no checkpoint
    """
    found = list_checkpoints(save_path, require_buffer, name_prefix)
    return (found[-1].model, found[-1].replay_buffer) if found else None
