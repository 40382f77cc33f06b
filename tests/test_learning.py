"""Long learning checks (``pytest -m slow``): DreamerV2 must actually solve problems, not only run."""

import gymnasium as gym
import pytest
import torch as th
import yaml
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_dreamer import DreamerV2
from sb3_dreamer.zoo import HYPERPARAMS_DIR

#: Env steps allowed to reach the CartPole threshold: the issue's bar is "fewer env steps than the zoo's tuned DQN",
#: which gets there at about 50k. Not yet seen to pass: the committed runs (benchmarks/results/REPORT.md) plateau at
#: 200-300 within 15-25k steps (the actor's entropy collapses early); see the notes on issue 2.
CARTPOLE_BUDGET = 50_000


@pytest.mark.slow
def test_cartpole_reaches_475_within_budget(tmp_path):
    """CartPole-v1 with the zoo's hyperparameters: mean deterministic return >= 475 over 10 episodes."""
    th.set_num_threads(2)
    config = yaml.safe_load((HYPERPARAMS_DIR / "dreamerv2.yml").read_text())["CartPole-v1"]
    kwargs = {k: v for k, v in config.items() if k not in ("n_timesteps", "policy", "policy_kwargs")}
    model = DreamerV2(config["policy"], make_vec_env("CartPole-v1", seed=0), seed=0, device="cpu",
                      policy_kwargs=eval(config["policy_kwargs"]), **kwargs)  # the zoo evals this string too
    stop = StopTrainingOnRewardThreshold(reward_threshold=475, verbose=1)
    evaluation = EvalCallback(make_vec_env("CartPole-v1", seed=100), eval_freq=2500, n_eval_episodes=10,
                              callback_on_new_best=stop, best_model_save_path=str(tmp_path))
    model.learn(CARTPOLE_BUDGET, callback=evaluation)
    best = DreamerV2.load(tmp_path / "best_model.zip", device="cpu")
    mean, _ = evaluate_policy(best, gym.make("CartPole-v1"), n_eval_episodes=10, deterministic=True)
    assert mean >= 475, f"mean return {mean} after {model.num_timesteps} steps"
