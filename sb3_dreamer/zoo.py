"""RL Zoo integration: ``register()`` and the launcher ``python -m sb3_dreamer.zoo {train,enjoy,record_video,...}``.

rl-zoo3 has no plugin mechanism, so :func:`register` mutates its shared dictionaries in place (idempotently):
``rl_zoo3.utils.ALGOS["dreamerv2"]``, ``rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER["dreamerv2"]`` and
``HYPERPARAMS_CONVERTER["dreamerv2"]``; it also registers the MinAtar ids. :func:`main` registers, adds the packaged
hyperparameter file (``sb3_dreamer/hyperparams/<algo>.yml``) when no ``-conf``/``--conf-file`` is given, and hands over
to rl-zoo3 with ``sys.argv`` set, so every zoo flag works unchanged. See docs/zoo.md.

Launcher-only options of ``train`` (removed before the zoo parses the command line), for long runs that may stop:
``--checkpoint-freq N`` saves a resumable checkpoint (model, replay buffer, VecNormalize statistics) every ``N`` env
steps, keeping the newest ``--keep-checkpoints K`` (1); ``--resume`` continues the newest run folder from its newest
checkpoint, with ``-n`` the run's total (see :mod:`sb3_dreamer.zoo_resume` and docs/resume.md).

Launcher-only options for tuning with an RDB storage:
``--heartbeat-interval S`` (with ``--grace-period S`` and ``--max-retry N``) makes a ``postgresql://``/``mysql://``/
``sqlite://`` ``--storage`` an Optuna ``RDBStorage`` with heartbeats, so the trial of a killed worker is marked FAIL and
re-queued once another worker starts a trial.

The Optuna search space (:func:`sample_dreamerv2_params`) covers the paper's ranges for ``kl_scale`` (β),
``actor_entropy_coef`` (η) and ``gamma`` (γ), log-uniform learning rates of the three optimizers, ``train_freq``,
``imagination_horizon`` (H) and the model preset. :func:`convert_dreamerv2_params` maps Optuna's raw ``trial.params`` to
constructor kwargs; the sampler uses it and ``--trial-id`` reuses it (``HYPERPARAMS_CONVERTER``).
"""

import argparse
import contextlib
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sb3_dreamer.envs import register_minatar

ALGO_NAME = "dreamerv2"
HYPERPARAMS_DIR = Path(__file__).resolve().parent / "hyperparams"
SCRIPTS = ("train", "enjoy", "record_video", "plot_train", "all_plots", "plot_from_file")

# Search space: the paper's grids (Hafner et al. 2021, appendix) plus ranges around its learning rates.
KL_SCALES = (0.1, 0.3, 1.0, 3.0)
ENTROPY_COEFS = (3e-5, 1e-4, 3e-4, 1e-3)
EXPLORATION_NOISES = (0.0, 0.05, 0.1, 0.2)  # ε of random actions in collection (the official expl_noise)
GAMMAS = (0.99, 0.999)
TRAIN_FREQS = (2, 5, 10, 16)
HORIZONS = (10, 15, 20)
PRESETS = ("small", "medium")
LR_RANGES = {"learning_rate": (3e-5, 1e-3), "actor_lr": (1e-5, 3e-4), "critic_lr": (3e-5, 1e-3)}


def register(name: str = ALGO_NAME) -> None:
    """Make DreamerV2 known to rl-zoo3 (``ALGOS``, sampler, converter) and register MinAtar; safe to call twice."""
    from rl_zoo3 import hyperparams_opt, utils

    from sb3_dreamer import DreamerV2

    utils.ALGOS[name] = DreamerV2
    hyperparams_opt.HYPERPARAMS_SAMPLER[name] = sample_dreamerv2_params
    hyperparams_opt.HYPERPARAMS_CONVERTER[name] = convert_dreamerv2_params
    register_minatar()


def _zoo_policy_kwargs() -> Any:
    """The ``policy_kwargs`` of the zoo experiment that is sampling or loading a trial, if any.

    rl-zoo3 merges the sampled kwargs over the YAML/-params ones key by key, so a sampled ``policy_kwargs`` would
    replace the configured one (``image_dist``, explicit sizes) wholesale. The sampler and the converter therefore
    look up the caller's configured value: a dict in ``ExperimentManager.objective`` (``self._hyperparams``), the
    unprocessed YAML value (usually a string) in ``read_hyperparameters`` (``--trial-id``).
    """
    frame = sys._getframe(1)
    while frame is not None:
        code_name, local_vars = frame.f_code.co_name, frame.f_locals
        if type(local_vars.get("self")).__name__ == "ExperimentManager":
            if code_name == "objective":
                return local_vars["self"]._hyperparams.get("policy_kwargs")
            if code_name == "read_hyperparameters" and isinstance(local_vars.get("hyperparams"), dict):
                return local_vars["hyperparams"].get("policy_kwargs")
        frame = frame.f_back
    return None


def _with_preset(base: Any, preset: str) -> Any:
    """``base`` policy_kwargs (None, dict, or the zoo's string to be eval'd) with ``preset`` set; other keys kept."""
    if base is None:
        return dict(preset=preset)
    if isinstance(base, str):  # the zoo evals it later: dict(dict(...), preset=...) overrides one key
        return f"dict({base}, preset={preset!r})"
    return {**base, "preset": preset}


def convert_dreamerv2_params(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's ``trial.params`` → DreamerV2 constructor kwargs (used by the sampler and by ``--trial-id``)."""
    kwargs = {key: value for key, value in params.items() if key != "preset"}
    for key in ("train_freq", "imagination_horizon"):
        if key in kwargs:
            kwargs[key] = int(kwargs[key])
    if "preset" in params:
        kwargs["policy_kwargs"] = _with_preset(_zoo_policy_kwargs(), params["preset"])
    return kwargs


def sample_dreamerv2_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict[str, Any]) -> dict[str, Any]:
    """Sample DreamerV2 hyperparameters (rl-zoo3 sampler signature; ``n_actions``/``n_envs`` are unused)."""
    params: dict[str, Any] = {
        "kl_scale": trial.suggest_categorical("kl_scale", KL_SCALES),
        "actor_entropy_coef": trial.suggest_categorical("actor_entropy_coef", ENTROPY_COEFS),
        "exploration_noise": trial.suggest_categorical("exploration_noise", EXPLORATION_NOISES),
        "gamma": trial.suggest_categorical("gamma", GAMMAS),
    }
    for key, (low, high) in LR_RANGES.items():
        params[key] = trial.suggest_float(key, low, high, log=True)
    params["train_freq"] = trial.suggest_categorical("train_freq", TRAIN_FREQS)
    params["imagination_horizon"] = trial.suggest_categorical("imagination_horizon", HORIZONS)
    params["preset"] = trial.suggest_categorical("preset", PRESETS)
    return convert_dreamerv2_params(params)


# --------------------------------------------------------------------------------------------------------------------
# Launcher


def _option_value(args: list[str], *names: str) -> str | None:
    """The value of the last ``--name value`` / ``--name=value`` among ``args`` (exact names, no abbreviations)."""
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def _default_conf_file(args: list[str]) -> str | None:
    """The packaged hyperparameter file to add to a ``train`` command, or None.

    ``dreamerv2`` always uses the packaged file. Other algorithms (``dqn``) use it only for envs that the zoo's own
    file lacks but ours has (the MinAtar games), so CartPole/Atari DQN keep the zoo's tuned values.
    """
    if _option_value(args, "-conf", "--conf-file") is not None:
        return None
    algo = _option_value(args, "--algo") or "ppo"
    ours = HYPERPARAMS_DIR / f"{algo}.yml"
    if not ours.is_file():
        return None
    if algo == ALGO_NAME:
        return str(ours)
    env_id = _option_value(args, "--env") or "CartPole-v1"
    import rl_zoo3

    zoo_file = Path(rl_zoo3.__file__).resolve().parent / "hyperparams" / f"{algo}.yml"
    zoo_keys = set(yaml.safe_load(zoo_file.read_text())) if zoo_file.is_file() else set()
    our_keys = set(yaml.safe_load(ours.read_text()))
    return str(ours) if env_id in our_keys and env_id not in zoo_keys else None


def _pop_resume_options(args: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    parser = argparse.ArgumentParser(prog="sb3_dreamer.zoo train", add_help=False, allow_abbrev=False)
    parser.add_argument("--checkpoint-freq", type=int, default=0)
    parser.add_argument("--keep-checkpoints", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    known, rest = parser.parse_known_args(args)
    if known.checkpoint_freq == 0 and not known.resume:
        return rest, None
    if {"-optimize", "--optimize-hyperparameters"} & set(rest):
        parser.error("--checkpoint-freq and --resume apply to training runs, not to -optimize")
    return rest, dict(checkpoint_freq=known.checkpoint_freq, keep_checkpoints=known.keep_checkpoints, resume=known.resume)


@contextlib.contextmanager
def _resumable_training(options: dict[str, Any] | None) -> Iterator[None]:
    """While active, rl-zoo3's ``train()`` builds a :func:`~sb3_dreamer.zoo_resume.resumable_experiment_manager`."""
    if options is None:
        yield
        return
    from rl_zoo3 import train

    from sb3_dreamer.zoo_resume import resumable_experiment_manager

    try:
        manager = resumable_experiment_manager(**options)
    except ValueError as error:
        sys.exit(f"sb3_dreamer.zoo train: {error}")
    original = train.ExperimentManager
    train.ExperimentManager = manager
    try:
        yield
    finally:
        train.ExperimentManager = original


def _pop_heartbeat_options(args: list[str]) -> tuple[list[str], dict[str, int] | None]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--heartbeat-interval", type=int, default=None)
    parser.add_argument("--grace-period", type=int, default=None)
    parser.add_argument("--max-retry", type=int, default=1)
    known, rest = parser.parse_known_args(args)
    if known.heartbeat_interval is None:
        return rest, None
    return rest, dict(heartbeat_interval=known.heartbeat_interval, grace_period=known.grace_period, max_retry=known.max_retry)


@contextlib.contextmanager
def _heartbeat_storage(options: dict[str, int] | None) -> Iterator[None]:
    """While active, Optuna turns RDB URL strings into ``RDBStorage`` with heartbeats and retry of stale trials.

    rl-zoo3 hands ``--storage`` to Optuna as a string, and Optuna builds ``RDBStorage(url)`` without a heartbeat in
    ``optuna.storages.get_storage``; this swaps that function for the launcher's process only.
    """
    if options is None:
        yield
        return
    import optuna

    original = optuna.storages.get_storage

    def get_storage(storage: Any) -> Any:
        if isinstance(storage, str) and "://" in storage:
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=options["max_retry"])
            storage = optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=options["heartbeat_interval"],
                grace_period=options["grace_period"],
                heartbeat_stale_trial_callback=retry,
            )
        return original(storage)

    optuna.storages.get_storage = get_storage
    try:
        yield
    finally:
        optuna.storages.get_storage = original


def _run(script: str) -> None:
    if script == "train":
        from rl_zoo3.train import train

        train()
    elif script == "enjoy":
        from rl_zoo3.enjoy import enjoy  # imported lazily: it needs `requests`

        enjoy()
    elif script == "record_video":
        runpy.run_module("rl_zoo3.record_video", run_name="__main__")
    else:
        from rl_zoo3 import plots

        getattr(plots, script)()


def main(argv: list[str] | None = None) -> None:
    """``sb3-dreamer-zoo SCRIPT [zoo arguments]``, SCRIPT one of train, enjoy, record_video, plot_train, all_plots,
    plot_from_file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SCRIPTS:
        usage = f"usage: python -m sb3_dreamer.zoo {{{','.join(SCRIPTS)}}} [rl-zoo3 arguments]  (see docs/zoo.md)"
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return
        sys.exit(usage)
    script, args = argv[0], argv[1:]
    register()
    args, heartbeat = _pop_heartbeat_options(args)
    resume = None
    if script == "train":
        args, resume = _pop_resume_options(args)
        conf_file = _default_conf_file(args)
        if conf_file is not None:
            args += ["--conf-file", conf_file]
    old_argv = sys.argv
    sys.argv = [f"sb3_dreamer.zoo {script}", *args]
    try:
        with _heartbeat_storage(heartbeat), _resumable_training(resume):
            _run(script)
    finally:
        sys.argv = old_argv


if __name__ == "__main__":
    main()
