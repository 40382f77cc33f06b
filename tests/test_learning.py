"""Long learning checks (``pytest -m slow``): DreamerV2 must actually solve problems, not only run."""

import pytest
import torch as th
import yaml
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

from sb3_dreamer import DreamerV2
from sb3_dreamer.zoo import HYPERPARAMS_DIR

#: Env steps allowed to reach the CartPole threshold: the issue's bar is "fewer env steps than the zoo's tuned DQN",
#: which needs 24.2k +- 17.7k steps (3 seeds, benchmarks/results/REPORT.md; about 50k in the zoo's own benchmark).
CARTPOLE_BUDGET = 20_000


@pytest.mark.slow
def test_cartpole_reaches_475_within_budget():
    """CartPole-v1 with the zoo's hyperparameters: mean deterministic return >= 475 over 10 episodes."""
    th.set_num_threads(2)
    config = yaml.safe_load((HYPERPARAMS_DIR / "dreamerv2.yml").read_text())["CartPole-v1"]
    kwargs = {k: v for k, v in config.items() if k not in ("n_timesteps", "policy", "policy_kwargs", "normalize")}
    normalize = eval(config["normalize"])  # the zoo evals these strings too
    env = VecNormalize(make_vec_env("CartPole-v1", seed=0), **normalize)
    eval_env = VecNormalize(make_vec_env("CartPole-v1", seed=100), training=False, **normalize)
    model = DreamerV2(config["policy"], env, seed=0, device="cpu", policy_kwargs=eval(config["policy_kwargs"]), **kwargs)
    # EvalCallback copies the training env's normalization statistics into eval_env before every evaluation and stops
    # training at the first evaluation >= 475, so the final model and eval_env's statistics are those of that evaluation.
    stop = StopTrainingOnRewardThreshold(reward_threshold=475, verbose=1)
    evaluation = EvalCallback(eval_env, eval_freq=2500, n_eval_episodes=10, callback_on_new_best=stop)
    model.learn(CARTPOLE_BUDGET, callback=evaluation)
    # The bar: an evaluation (10 deterministic episodes) with mean return >= 475 within the budget.
    assert evaluation.best_mean_reward >= 475, f"best evaluation {evaluation.best_mean_reward} in {CARTPOLE_BUDGET} steps"
    # Not a lucky draw: 10 fresh episodes with the same model stay close (measured: 472.1 after 5k steps; an agent that
    # has not learned CartPole scores 150-300 here).
    mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    assert mean >= 425, f"mean return {mean} on fresh episodes after {model.num_timesteps} steps"
