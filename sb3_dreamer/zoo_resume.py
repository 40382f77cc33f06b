"""Resumable zoo training runs: rolling checkpoints with the replay buffer, and ``--resume`` to continue the same run.

rl-zoo3's ``-i model.zip`` starts a *new* run from a trained agent: a new ``<env>_<k+1>`` folder, counters from zero,
a fresh evaluation history. A long benchmark run that is stopped (a session ends, a device call times out, the machine
is lost) needs the opposite: carry on the *same* run, as if it had not stopped. The launcher's options

* ``--checkpoint-freq N``: every ``N`` env steps, save the model, its replay buffer (off-policy algorithms) and the
  ``VecNormalize`` statistics (when used) to ``<run folder>/checkpoints/``, each file written atomically; once a
  checkpoint is complete, older ones are deleted (``--keep-checkpoints K`` keeps the newest ``K``);
* ``--resume``: continue the newest run folder ``<log-folder>/<algo>/<env>_<k>`` from its newest complete checkpoint
  (or start a new run when it has none): load the model and its replay buffer, keep ``num_timesteps`` and train
  ``learn(-n minus the steps done, reset_num_timesteps=False)``, so ``-n`` stays the run's total and schedules continue;
  keep the evaluations up to the checkpoint in ``evaluations.npz`` and evaluate and checkpoint on the same step grid
  as before; append to the training ``Monitor`` files instead of overwriting them.

are implemented by :func:`resumable_experiment_manager`, a subclass of rl-zoo3's ``ExperimentManager`` that
:mod:`sb3_dreamer.zoo` puts in place of the original for a ``train`` command that uses them.

A run can also be paused without losing the steps since its last checkpoint: ``SIGUSR1`` (``kill -USR1 <pid>``) asks
the checkpoint callback to write a checkpoint at the current step and stop training, after which the launcher saves
the model and exits as after a finished run; ``--resume`` then continues from exactly that step. The benchmark harness
pauses its jobs this way when their time is up (``benchmarks/learning.py --time-budget``/``--timeout``).

What a resumed run does not restore: the training env's state (its episode in progress is cut; DreamerV2 marks the
cut in its replay buffer, see docs/resume.md), the ``t`` (wall time) column of the appended Monitor rows (it restarts
at 0) and, for algorithms other than DreamerV2, the RNG states (the zoo's ``--seed`` applies again).
"""

import os
import pathlib
import signal
import threading
from typing import Any

import numpy as np
from rl_zoo3.exp_manager import ExperimentManager
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from sb3_dreamer.common.checkpointing import Checkpoint, atomic_write, checkpoint_files, list_checkpoints

CHECKPOINT_DIR = "checkpoints"
NAME_PREFIX = "rl_model"
PAUSE_SIGNAL = signal.SIGUSR1  # "checkpoint now and stop" (see the module docstring)


class RollingCheckpointCallback(CheckpointCallback):
    """SB3's ``CheckpointCallback`` that writes every file atomically and keeps only the newest ``keep`` checkpoints.

    Every ``save_freq`` calls (env steps per env), and at the end of training, it saves the VecNormalize statistics
    (if any), the replay buffer (if any) and then the model, with SB3's file names, each to a temporary file renamed
    into place; then it deletes the checkpoints older than the newest ``keep`` complete ones.

    While training runs in the main thread, ``PAUSE_SIGNAL`` (SIGUSR1) makes the next ``env.step`` call write a
    checkpoint of that step and stop training (the callback returns False): a pause that loses nothing.

    :param save_freq: save every ``save_freq`` calls of the callback (``env.step`` calls)
    :param save_path: the folder of the checkpoints
    :param keep: how many complete checkpoints to keep (>= 1)
    :param verbose: 1 prints a line per checkpoint
    """

    def __init__(self, save_freq: int, save_path: str, keep: int = 1, verbose: int = 0):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        super().__init__(save_freq, save_path, name_prefix=NAME_PREFIX, save_replay_buffer=True,
                         save_vecnormalize=True, verbose=verbose)  # fmt: skip
        self.keep = keep
        self.pause_requested = False
        self._handler_installed, self._previous_handler = False, None

    def _on_training_start(self) -> None:
        self.pause_requested = False
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous_handler = signal.signal(PAUSE_SIGNAL, self._request_pause)
            self._handler_installed = True

    def _request_pause(self, signum: int, frame: Any) -> None:
        self.pause_requested = True  # acted on at the next env step, between whole gradient steps

    def _on_step(self) -> bool:
        if self.pause_requested:
            checkpoint = self.save_checkpoint()
            print(f"Paused at {checkpoint.steps} steps on request (signal {PAUSE_SIGNAL.name}): checkpoint "
                  f"{checkpoint.model}")  # fmt: skip
            return False
        if self.n_calls % self.save_freq == 0:
            self.save_checkpoint()
        return True

    def _on_training_end(self) -> None:
        if self._handler_installed:
            previous = self._previous_handler
            signal.signal(PAUSE_SIGNAL, signal.SIG_DFL if previous is None else previous)
            self._handler_installed, self._previous_handler = False, None
        # The end of a finished run too, so that a later --resume with a larger -n extends it without repeating steps.
        # Not after an interruption: rl-zoo3 calls on_training_end after a KeyboardInterrupt, which can have stopped a
        # gradient step halfway (the newest checkpoint stays the resume point).
        if self.model.num_timesteps < self.model._total_timesteps:
            return
        saved = list_checkpoints(self.save_path, require_buffer=False, name_prefix=self.name_prefix)
        if not saved or saved[-1].steps != self.num_timesteps:
            self.save_checkpoint()

    def save_checkpoint(self) -> Checkpoint:
        """Write the checkpoint of the current step, then delete the old ones; return the new one."""
        folder = pathlib.Path(self.save_path)
        model_path, buffer_path, stats_path = checkpoint_files(folder, self.num_timesteps, self.name_prefix)
        vec_normalize = self.model.get_vec_normalize_env()
        if vec_normalize is not None:
            atomic_write(stats_path, vec_normalize.save, suffix="pkl")
        has_buffer = getattr(self.model, "replay_buffer", None) is not None
        if has_buffer:
            atomic_write(buffer_path, self.model.save_replay_buffer, suffix="pkl")  # type: ignore[attr-defined]
        atomic_write(model_path, self.model.save, suffix="zip")  # last: its presence marks the checkpoint complete
        if self.verbose >= 1:
            print(f"Saving checkpoint to {model_path}")
        for old in list_checkpoints(folder, require_buffer=has_buffer, name_prefix=self.name_prefix)[: -self.keep]:
            for path in old.files:
                path.unlink(missing_ok=True)
        return Checkpoint(self.num_timesteps, model_path, buffer_path if has_buffer else None,
                          stats_path if vec_normalize is not None else None)  # fmt: skip


def find_resume_point(run_dir: str | pathlib.Path, require_buffer: bool) -> Checkpoint | None:
    """The newest complete checkpoint of the run folder ``run_dir``, or None."""
    checkpoints = list_checkpoints(pathlib.Path(run_dir) / CHECKPOINT_DIR, require_buffer=require_buffer)
    return checkpoints[-1] if checkpoints else None


def latest_run_dir(log_path: str | pathlib.Path, env_name: str) -> pathlib.Path | None:
    """The zoo's newest run folder ``<log_path>/<env_name>_<k>`` (largest ``k``), or None."""
    runs = []
    for path in pathlib.Path(log_path).glob(f"{env_name}_*"):
        suffix = path.name[len(env_name) + 1 :]
        if path.is_dir() and suffix.isdigit():
            runs.append((int(suffix), path))
    return max(runs)[1] if runs else None


def newest_resume_point(log_path: str | pathlib.Path, env_name: str,
                        algo_class: type[BaseAlgorithm]) -> tuple[pathlib.Path, Checkpoint] | None:
    """The zoo's newest run folder of ``env_name`` under ``log_path`` and the checkpoint ``--resume`` continues it from
    (for off-policy algorithms, one with its replay buffer), or None."""
    run_dir = latest_run_dir(log_path, env_name)
    point = None if run_dir is None else find_resume_point(run_dir, issubclass(algo_class, OffPolicyAlgorithm))
    return None if point is None else (run_dir, point)


def restore_evaluations(callback: EvalCallback, up_to_step: int) -> int:
    """Give ``callback`` the evaluation history of its ``log_path`` up to ``up_to_step``; rewrite the file to match.

    Evaluations after the checkpoint are dropped: the resumed run repeats those steps and evaluates them again.

    :return: the number of evaluations kept
    """
    if callback.log_path is None or not os.path.isfile(callback.log_path + ".npz"):
        return 0
    with np.load(callback.log_path + ".npz") as data:
        saved = {key: data[key] for key in data.files}
    keep = saved["timesteps"] <= up_to_step
    callback.evaluations_timesteps = [int(t) for t in saved["timesteps"][keep]]
    callback.evaluations_results = [list(r) for r in saved["results"][keep]]
    callback.evaluations_length = [list(n) for n in saved["ep_lengths"][keep]]
    if "successes" in saved:
        callback.evaluations_successes = [list(s) for s in saved["successes"][keep]]
    if callback.evaluations_results:
        means = [float(np.mean(results)) for results in callback.evaluations_results]
        callback.best_mean_reward = max(means)
        callback.last_mean_reward = means[-1]

    def write(path: str | pathlib.Path) -> None:
        with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to the temporary file's name
            np.savez(file, **{key: value[keep] for key, value in saved.items()})

    atomic_write(callback.log_path + ".npz", write, suffix="npz")
    return len(callback.evaluations_timesteps)


class _ContinuingModel:
    """Stands in for a model in rl-zoo3's ``ExperimentManager.learn``: ``learn`` continues the counters
    (``reset_num_timesteps=False``); every other attribute is the model's. (An instance attribute ``model.learn`` would
    not do: ``model.save`` would try to pickle it.)"""

    def __init__(self, model: BaseAlgorithm) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def learn(self, total_timesteps: int, **kwargs: Any) -> BaseAlgorithm:
        return self._model.learn(total_timesteps, reset_num_timesteps=False, **kwargs)


def resumable_experiment_manager(checkpoint_freq: int = 0, keep_checkpoints: int = 1,
                                 resume: bool = False) -> type[ExperimentManager]:
    """An ``ExperimentManager`` subclass with the launcher's ``--checkpoint-freq``/``--keep-checkpoints``/``--resume``.

    rl-zoo3's ``train()`` builds its manager with a fixed signature, so the returned subclass reads the options from
    this function's arguments.
    """
    if checkpoint_freq < 0:
        raise ValueError(f"--checkpoint-freq must be >= 0, got {checkpoint_freq}")
    if keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints must be >= 1, got {keep_checkpoints}")

    class ResumableExperimentManager(ExperimentManager):
        """rl-zoo3's ExperimentManager with rolling checkpoints and ``--resume`` (see :mod:`sb3_dreamer.zoo_resume`)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.resume_point: Checkpoint | None = None
            if not resume:
                return
            from rl_zoo3.utils import ALGOS

            found = newest_resume_point(self.log_path, f"{self.env_name}", ALGOS[self.algo])
            if found is None:
                print(f"--resume: no checkpoint under {self.log_path}{self.env_name}_<k>/{CHECKPOINT_DIR}, "
                      f"starting a new run in {self.save_path}")  # fmt: skip
                return
            run_dir, point = found
            self.resume_point = point
            self.save_path = str(run_dir)
            self.params_path = f"{self.save_path}/{self.env_name}"
            self.trained_agent = str(point.model)
            self.continue_training = True
            print(f"Resuming {self.save_path} from its checkpoint at {point.steps} steps ({point.model.name})")

        def create_callbacks(self) -> None:
            super().create_callbacks()
            if checkpoint_freq > 0:
                folder = os.path.join(self.save_path, CHECKPOINT_DIR)
                self.callbacks.append(  # last: an evaluation due at the same step is in the checkpoint's history
                    RollingCheckpointCallback(max(checkpoint_freq // self.n_envs, 1), folder, keep=keep_checkpoints,
                                              verbose=self.verbose)  # fmt: skip
                )
            if self.resume_point is None:
                return
            calls = self.resume_point.steps // self.n_envs  # env.step calls before the checkpoint
            for callback in self.callbacks:
                if isinstance(callback, (EvalCallback, CheckpointCallback)):
                    callback.n_calls = calls  # same step grid as the uninterrupted run
                if isinstance(callback, EvalCallback):
                    kept = restore_evaluations(callback, self.resume_point.steps)
                    print(f"Kept {kept} evaluations up to step {self.resume_point.steps}")

        def create_envs(self, n_envs: int, eval_env: bool = False, no_log: bool = False) -> VecEnv:
            if self.resume_point is None or eval_env or no_log:
                return super().create_envs(n_envs, eval_env=eval_env, no_log=no_log)
            monitor_kwargs = self.monitor_kwargs
            self.monitor_kwargs = {**monitor_kwargs, "override_existing": False}  # append to the run's Monitor files
            try:
                return super().create_envs(n_envs, eval_env=eval_env, no_log=no_log)
            finally:
                self.monitor_kwargs = monitor_kwargs

        def _maybe_normalize(self, env: VecEnv, eval_env: bool) -> VecEnv:
            if self.resume_point is None or self.resume_point.vecnormalize is None:
                return super()._maybe_normalize(env, eval_env)
            env = VecNormalize.load(str(self.resume_point.vecnormalize), env)
            if eval_env:
                env.training = False
                env.norm_reward = False
            return env

        def _load_pretrained_agent(self, hyperparams: dict[str, Any], env: VecEnv) -> BaseAlgorithm:
            model = super()._load_pretrained_agent(hyperparams, env)
            if self.resume_point is not None and self.resume_point.replay_buffer is not None:
                print(f"Loading replay buffer {self.resume_point.replay_buffer.name}")
                model.load_replay_buffer(self.resume_point.replay_buffer)  # type: ignore[attr-defined]
            return model

        def learn(self, model: BaseAlgorithm) -> None:
            if self.resume_point is None:
                super().learn(model)
                return
            self.n_timesteps = max(self.n_timesteps - model.num_timesteps, 0)  # -n is the run's total
            super().learn(_ContinuingModel(model))  # type: ignore[arg-type]

    return ResumableExperimentManager
