"""DreamerV2 (Hafner et al., "Mastering Atari with Discrete World Models", ICLR 2021) as an SB3 off-policy algorithm.

The algorithm orchestrates; the policy owns the networks and optimizers. Per environment step, collection filters the
observation through the RSSM (per-env state (h, z, previous action), reset at episode starts) and samples from the
actor. Per gradient step (:meth:`DreamerV2.train`): sample B sequences of T steps, update the world model, imagine H
steps from all B·T posterior states, update the actor and the critic, and hard-copy the critic into the slow critic
every ``target_update_interval`` gradient steps.

SB3 knobs in Dreamer's terms: ``learning_starts`` = prefill steps with uniform random actions, ``train_freq`` = train
every that many ``env.step`` calls, ``gradient_steps`` = updates per train call, ``batch_size`` = sequences per batch.
The replay ratio (replayed sequence steps per env step) is
``batch_size * sequence_length * gradient_steps / (train_freq * n_envs)``.
"""

import dataclasses
import io
import pathlib
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar, Union

import numpy as np
import torch as th
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, RolloutReturn, Schedule, TrainFreq
from stable_baselines3.common.utils import FloatSchedule, LinearSchedule, update_learning_rate
from stable_baselines3.common.vec_env import VecEnv
from torch.nn.utils import clip_grad_norm_

from sb3_dreamer.common import checkpointing
from sb3_dreamer.common.actor_critic import BehaviourLosses
from sb3_dreamer.common.allocator import reuse_freed_memory
from sb3_dreamer.common.buffers import SequenceReplayBuffer
from sb3_dreamer.common.cuda_graphs import GraphedPass, clone_tensors, copy_into, side_stream
from sb3_dreamer.common.rssm import flatten_states
from sb3_dreamer.common.type_aliases import RSSMState, SequenceSamples
from sb3_dreamer.common.world_model import REWARD_TRANSFORMS
from sb3_dreamer.dreamerv2.policies import CnnPolicy, DreamerV2Policy, MlpPolicy, MultiInputPolicy

SelfDreamerV2 = TypeVar("SelfDreamerV2", bound="DreamerV2")
TORCH_OPTIMIZERS = ("model_optimizer", "actor_optimizer", "critic_optimizer")  # policy attributes saved as state dicts
ScheduleLike = Union[float, str, Schedule]
PRECISIONS = {"fp32": None, "bf16": th.bfloat16}  # precision -> autocast dtype of the training forward passes
EAGER_STEPS_BEFORE_CAPTURE = 3  # cuda_graph: gradient steps run eagerly first (library handles, optimizer state)


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX); True when PyTorch cannot tell.

    Elsewhere bf16 products are emulated with fp32 arithmetic plus conversions: no faster than fp32, often slower.
    """
    checks = [getattr(th.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    known = [check for check in checks if callable(check)]
    return not known or any(check() for check in known)


@dataclasses.dataclass
class UpdateGraphs:
    """The captured passes of a gradient step (``cuda_graph=True``) and the static inputs they read."""

    world_model: GraphedPass  # batch -> (model loss, posterior [B, T, ...], metrics); fills the world model's .grad
    behaviour: GraphedPass  # posterior, η, ρ -> BehaviourLosses; fills the actor's and the critic's .grad
    batch: SequenceSamples  # refilled from the replay sample before each step
    entropy_coef: th.Tensor  # η, 0-dim
    reinforce_mix: th.Tensor  # ρ, 0-dim
    backprop: bool  # whether the behaviour pass imagines with gradients through the dynamics (ρ < 1)
    grads: list[tuple[th.Tensor, th.Tensor | None]]  # (parameter, the .grad the graphs write) after capture

    def fits(self, backprop: bool) -> bool:
        """Whether replaying still computes this step: same ρ regime, and every ``.grad`` is still the graphs' memory
        (a ``zero_grad(set_to_none=True)`` or new parameters since the capture would leave the optimizers stale)."""
        return backprop == self.backprop and all(param.grad is grad for param, grad in self.grads)


def as_schedule(value: ScheduleLike) -> Schedule:
    """A float, a callable of progress_remaining, or ``"linear(start, end[, fraction])"``.

    The linear schedule goes from ``start`` to ``end`` over the first ``fraction`` of training (default 1: all of it),
    then stays at ``end``, like DQN's ``exploration_fraction``.
    """
    if isinstance(value, str):
        text = value.replace(" ", "")
        parts = text[len("linear(") : -1].split(",")
        if not (text.startswith("linear(") and text.endswith(")")) or len(parts) not in (2, 3):
            raise ValueError(f"Unknown schedule {value!r}: use a number or 'linear(start, end[, fraction])'.")
        start, end, fraction = (float(x) for x in [*parts, "1.0"][:3])
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"The fraction of schedule {value!r} must lie in (0, 1].")
        return LinearSchedule(start, end, end_fraction=fraction)
    return FloatSchedule(value)


class DreamerV2(OffPolicyAlgorithm):
    """DreamerV2: a world model with discrete latents and an actor-critic trained in its imagination.

    :param policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or a :class:`DreamerV2Policy` subclass
    :param env: the environment (a gymnasium env, a VecEnv, or a registered id)
    :param learning_rate: world-model learning rate (float or schedule of progress_remaining)
    :param actor_lr: actor learning rate (float, schedule or ``"linear(a, b)"``)
    :param critic_lr: critic learning rate
    :param buffer_size: replay capacity in steps (shared between env columns)
    :param learning_starts: prefill steps with uniform random actions before training
    :param batch_size: sequences per batch (B)
    :param sequence_length: steps per sequence (T)
    :param train_freq: train every that many ``env.step`` calls
    :param gradient_steps: gradient steps per train call
    :param gamma: discount γ
    :param return_lambda: λ of the λ-returns
    :param imagination_horizon: H, imagined steps per start state
    :param kl_scale: β, scale of the KL term
    :param kl_balance: α, share of the KL gradient that trains the prior (0.5 disables balancing)
    :param free_nats: KL terms below this (batch mean) carry no gradient
    :param reconstruction_scale: scale of the observation reconstruction loss
    :param reward_scale: scale of the reward loss
    :param discount_scale: scale of the discount loss
    :param reward_transform: transform of the reward-head target: ``"identity"``, ``"tanh"`` (Atari) or ``"sign"``
    :param predict_discount: learn a discount head (False: constant γ in imagination)
    :param actor_grad: ``"auto"`` (Reinforce for discrete, dynamics for continuous), ``"reinforce"``, ``"dynamics"``,
        ``"both"``
    :param actor_grad_mix: with ``"both"``, the weight of the dynamics gradient (1 - ρ); float or schedule
    :param actor_entropy_coef: η, the entropy regularizer (float, schedule or ``"linear(a, b)"``)
    :param exploration_noise: the official ``expl_noise`` during collection (not in ``predict``): with discrete actions
        the probability of replacing the actor's action by a uniformly random one (ε-greedy on top of the sampled
        policy), with continuous actions the std of Gaussian noise added before clipping to the bounds. Float,
        schedule or ``"linear(start, end, fraction)"``, e.g. ``"linear(0.4, 0.05, 0.1)"`` as in DQN. Default 0: the
        paper explores through the entropy regularizer alone
    :param return_normalization: divide the actor's advantages by the spread of the imagined returns,
        max(1, P95 - P5) as a moving average (DreamerV3; not in DreamerV2). Helps with dense rewards (e.g. CartPole),
        where returns of order 1 / (1 - γ) otherwise drown the entropy regularizer
    :param target_update_interval: gradient steps between hard copies of the critic into the slow critic
    :param max_grad_norm: gradient clipping (global norm per optimizer)
    :param weight_decay: decoupled weight decay per gradient step (parameters scaled by 1 - weight_decay)
    :param precision: ``"fp32"`` (default) or ``"bf16"``: the forward passes of the world-model and behaviour updates
        under ``torch.autocast`` with bfloat16 (dense layers and convolutions in bf16; distributions, losses, GRU gates,
        optimizer state and acting stay fp32). An opt-in for GPUs with bf16 tensor cores and for CPUs with AVX512-BF16
        or AMX (the Atari preset's gradient step on this project's 2-core AMD EPYC with AVX512-BF16: 5.7 s -> 3.8 s; a
        small CNN on 64x64 images gained nothing). It runs on any device, with a warning on a CPU that emulates bf16
    :param cuda_graph: capture the forward and backward passes of the world-model and behaviour updates as two CUDA
        graphs (after a few eager gradient steps) and replay them: one launch instead of thousands of small kernels per
        pass (an Atari-preset gradient step on an H100: 0.145 s -> 0.047 s). The optimizer steps, the divergence check
        and the schedules run as before; the computation is the same. ``True``: on CUDA devices (a warning on others);
        ``"auto"``: on CUDA devices, silently off elsewhere; ``False`` (default, until a GPU learning run confirms the
        graphed path, see docs/performance.md): never. A pass that cannot be captured (a custom module that
        synchronizes with the host) raises a ``RuntimeError`` that says to pass ``False``
    :param stop_image_grad: reconstruction gradients do not reach the representation (ablation)
    :param stop_reward_grad: reward gradients do not reach the representation (ablation)
    :param replay_buffer_class: replay buffer class (default :class:`SequenceReplayBuffer`)
    :param replay_buffer_kwargs: its keyword arguments
    :param policy_kwargs: policy arguments, e.g. ``dict(preset="atari")``, see :class:`DreamerV2Policy`
    :param stats_window_size: episodes averaged for the rollout logs
    :param tensorboard_log: TensorBoard log folder
    :param verbose: 0 quiet, 1 info, 2 debug
    :param seed: random seed
    :param device: ``"cpu"``, ``"cuda"`` or ``"auto"``
    :param _init_setup_model: build the networks at construction
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: DreamerV2Policy
    replay_buffer: SequenceReplayBuffer

    def __init__(
        self,
        policy: Union[str, type[DreamerV2Policy]],
        env: Union[GymEnv, str, None],
        learning_rate: Union[float, Schedule] = 3e-4,
        actor_lr: ScheduleLike = 1e-4,
        critic_lr: ScheduleLike = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 1000,
        batch_size: int = 16,
        sequence_length: int = 50,
        train_freq: Union[int, tuple[int, str]] = 5,
        gradient_steps: int = 1,
        gamma: float = 0.99,
        return_lambda: float = 0.95,
        imagination_horizon: int = 15,
        kl_scale: float = 1.0,
        kl_balance: float = 0.8,
        free_nats: float = 0.0,
        reconstruction_scale: float = 1.0,
        reward_scale: float = 1.0,
        discount_scale: float = 1.0,
        reward_transform: str = "identity",
        predict_discount: bool = True,
        actor_grad: str = "auto",
        actor_grad_mix: ScheduleLike = 0.1,
        actor_entropy_coef: ScheduleLike = 1e-3,
        exploration_noise: ScheduleLike = 0.0,
        return_normalization: bool = False,
        target_update_interval: int = 100,
        max_grad_norm: float = 100.0,
        weight_decay: float = 1e-6,
        precision: str = "fp32",
        cuda_graph: Union[bool, str] = False,
        stop_image_grad: bool = False,
        stop_reward_grad: bool = False,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: Union[th.device, str] = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        try:
            super().__init__(
                policy,
                env,
                learning_rate,
                buffer_size=buffer_size,
                learning_starts=learning_starts,
                batch_size=batch_size,
                gamma=gamma,
                train_freq=train_freq,
                gradient_steps=gradient_steps,
                replay_buffer_class=replay_buffer_class,
                replay_buffer_kwargs=replay_buffer_kwargs,
                policy_kwargs=policy_kwargs,
                stats_window_size=stats_window_size,
                tensorboard_log=tensorboard_log,
                verbose=verbose,
                device=device,
                seed=seed,
                sde_support=False,
                support_multi_env=True,
                supported_action_spaces=None,  # checked with a ValueError by the policy's ActionCodec
            )
        except NotImplementedError as error:  # SB3 rejects some spaces (e.g. nested Dict observations) this way
            raise ValueError(f"DreamerV2 does not support these spaces: {error}") from error
        self.actor_lr, self.critic_lr = actor_lr, critic_lr
        self.sequence_length, self.return_lambda = sequence_length, return_lambda
        self.imagination_horizon = imagination_horizon
        self.kl_scale, self.kl_balance, self.free_nats = kl_scale, kl_balance, free_nats
        self.reconstruction_scale, self.reward_scale, self.discount_scale = reconstruction_scale, reward_scale, discount_scale
        self.reward_transform, self.predict_discount = reward_transform, predict_discount
        self.actor_grad, self.actor_grad_mix, self.actor_entropy_coef = actor_grad, actor_grad_mix, actor_entropy_coef
        self.exploration_noise, self.return_normalization = exploration_noise, return_normalization
        self.target_update_interval = target_update_interval
        self.max_grad_norm, self.weight_decay, self.precision = max_grad_norm, weight_decay, precision
        self.cuda_graph = cuda_graph
        self.stop_image_grad, self.stop_reward_grad = stop_image_grad, stop_reward_grad
        self._last_state: tuple[RSSMState, th.Tensor] | None = None
        # Checkpoint/resume bookkeeping (see sb3_dreamer.common.checkpointing and docs/resume.md):
        self._resume_state: dict[str, Any] | None = None  # saved in the zip; loaded, it is consumed by the next learn()
        self._step_pending = False  # env.step done, transition not stored yet (callbacks run in that window)
        self._rollout_callback: BaseCallback | None = None  # during collect_rollouts: its locals hold the pending step
        self._stopped_step: dict[str, Any] | None = None  # the pending step of a learn() stopped by a callback
        self._first_chunk: TrainFreq | None = None  # rest of a train_freq chunk interrupted by a checkpoint
        self._chunk_offset = (0, 0)  # (steps, episodes) of the current chunk collected before the interruption
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self._check_options()
        if self.replay_buffer_class is None:
            self.replay_buffer_class = SequenceReplayBuffer
        self.replay_buffer_kwargs = {**(self.replay_buffer_kwargs or {}), "sequence_length": self.sequence_length}
        if self.seed is not None:
            self.replay_buffer_kwargs.setdefault("seed", self.seed)
        super()._setup_model()
        self._actor_lr_schedule = as_schedule(self.actor_lr)
        self._critic_lr_schedule = as_schedule(self.critic_lr)
        self._entropy_schedule = as_schedule(self.actor_entropy_coef)
        self._mix_schedule = as_schedule(self.actor_grad_mix)
        self._exploration_schedule = as_schedule(self.exploration_noise)
        self._last_state = None
        self._graphs: UpdateGraphs | None = None
        self._eager_steps_left = EAGER_STEPS_BEFORE_CAPTURE
        if self.cuda_graph is True and self.device.type != "cuda":
            warnings.warn(f"cuda_graph=True needs a CUDA device; on {self.device} the gradient steps run eagerly.",
                          stacklevel=2)
        if self.precision == "bf16" and self.device.type == "cpu" and not native_cpu_bf16():
            warnings.warn("precision='bf16' on a CPU without AVX512-BF16 or AMX: its bf16 products are emulated, no "
                          "faster than precision='fp32' and often slower.", stacklevel=2)

    def _check_options(self) -> None:
        if self.reward_transform not in REWARD_TRANSFORMS:
            raise ValueError(f"reward_transform must be one of {sorted(REWARD_TRANSFORMS)}, got {self.reward_transform!r}")
        if self.actor_grad not in ("auto", "reinforce", "dynamics", "both"):
            raise ValueError(f"actor_grad must be 'auto', 'reinforce', 'dynamics' or 'both', got {self.actor_grad!r}")
        if self.cuda_graph not in (True, False, "auto"):
            raise ValueError(f"cuda_graph must be True, False or 'auto', got {self.cuda_graph!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.kl_balance <= 1.0:
            raise ValueError(f"kl_balance must lie in [0, 1], got {self.kl_balance}")
        if self.sequence_length < 2 or self.imagination_horizon < 2:
            raise ValueError("sequence_length and imagination_horizon must be at least 2.")
        if self.optimize_memory_usage:
            raise ValueError("optimize_memory_usage is not needed: the sequence buffer stores each observation once.")

    def reinforce_mix(self) -> float:
        """ρ, the weight of the Reinforce gradient in the actor loss (at the current progress)."""
        grad = self.actor_grad
        if grad == "auto":
            grad = "reinforce" if self.policy.action_codec.discrete else "dynamics"
        if grad == "both":
            return 1.0 - self._mix_schedule(self._current_progress_remaining)
        return 1.0 if grad == "reinforce" else 0.0

    def exploration_rate(self) -> float:
        """The collection noise ``exploration_noise`` at the current progress (ε for discrete actions)."""
        return float(self._exploration_schedule(self._current_progress_remaining))

    def _on_step(self) -> None:
        super()._on_step()
        self.logger.record("rollout/exploration_rate", self.exploration_rate())

    def _sample_action(
        self, learning_starts: int, action_noise: Any = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Uniform random actions while prefilling; afterwards filter each env's observation and sample the actor."""
        codec = self.policy.action_codec
        self._step_pending = True  # until _store_transition: a save in between keeps the step (checkpointing)
        if self.num_timesteps < learning_starts:
            self._last_state = None
            env_actions = np.array([self.action_space.sample() for _ in range(n_envs)])
            return env_actions, codec.env_to_buffer(env_actions)
        obs, _ = self.policy.obs_to_tensor(self._last_obs)  # type: ignore[arg-type]
        if self._last_state is None:  # first policy step: every env starts from the zero state
            state, prev_action = self.policy.initial_state(n_envs)
            starts = th.ones(n_envs, dtype=th.bool, device=self.device)
        else:
            state, prev_action = self._last_state
            starts = th.as_tensor(self._last_episode_starts, device=self.device).bool()
        with th.no_grad():  # eval mode: collect_rollouts sets it once per rollout
            action, post = self.policy.step(obs, state, prev_action, starts, deterministic=False)
            action = codec.add_noise(action, self.exploration_rate())  # unchanged at 0
        self._last_state = (post, action)  # the action taken, noise included, is what the RSSM sees next
        buffer_actions = codec.model_to_buffer(action)
        return codec.buffer_to_env(buffer_actions), buffer_actions

    def _store_transition(self, replay_buffer: ReplayBuffer, buffer_action: np.ndarray, new_obs: Any, reward: np.ndarray,
                          dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)
        self._last_episode_starts = dones  # the next observation starts a new episode where done
        self._step_pending = False

    def train(self, gradient_steps: int, batch_size: int) -> None:
        if not self.replay_buffer.can_sample():
            return
        self.policy.set_training_mode(True)
        progress = self._current_progress_remaining
        learning_rates = {
            "learning_rate": (self.policy.model_optimizer, self.lr_schedule(progress)),
            "actor_lr": (self.policy.actor_optimizer, self._actor_lr_schedule(progress)),
            "critic_lr": (self.policy.critic_optimizer, self._critic_lr_schedule(progress)),
        }
        for name, (optimizer, lr) in learning_rates.items():
            update_learning_rate(optimizer, lr)
            self.logger.record(f"train/{name}", lr)
        entropy_coef, reinforce_mix = self._entropy_schedule(progress), self.reinforce_mix()
        self.logger.record("train/actor_entropy_coef", entropy_coef)
        self.logger.record("train/reinforce_mix", reinforce_mix)

        metrics: dict[str, list[th.Tensor]] = defaultdict(list)
        for _ in range(gradient_steps):
            for key, value in self._gradient_step(batch_size, entropy_coef, reinforce_mix).items():
                metrics[key].append(value)
        for key, values in metrics.items():
            self.logger.record(f"train/{key}", th.stack(values).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _gradient_step(self, batch_size: int, entropy_coef: float, reinforce_mix: float) -> dict[str, th.Tensor]:
        """One world-model update followed by one actor and one critic update in imagination."""
        with reuse_freed_memory(enabled=self.device.type == "cpu"):  # the same blocks every step: keep them
            if self._n_updates % self.target_update_interval == 0:
                self.policy.actor_critic.update_slow_critic()
            batch = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # [B, T, ...]
            if not self._graphs_enabled():
                metrics = self._update(batch, entropy_coef, reinforce_mix)
            elif self._eager_steps_left > 0:  # before the first capture: on a side stream, as capture requires
                self._eager_steps_left -= 1
                with side_stream():
                    metrics = self._update(batch, entropy_coef, reinforce_mix)
            else:
                metrics = self._graphed_update(batch, entropy_coef, reinforce_mix)
            self._n_updates += 1
            return metrics

    def _graphs_enabled(self) -> bool:
        """Whether gradient steps replay CUDA graphs (``cuda_graph`` on, on a CUDA device)."""
        return self.cuda_graph is not False and self.device.type == "cuda"

    def _world_model_pass(self, batch: SequenceSamples) -> tuple[th.Tensor, RSSMState, dict[str, th.Tensor]]:
        """World-model loss, posterior states ``[B, T, ...]`` and metrics (forward only)."""
        with self._autocast():
            return self.policy.world_model.loss(
                batch, self.gamma, self.kl_scale, self.kl_balance, self.free_nats, self.reward_scale, self.discount_scale,
                self.reconstruction_scale, self.reward_transform, self.predict_discount, self.stop_image_grad,
                self.stop_reward_grad,
            )

    def _behaviour_pass(self, post: RSSMState, is_terminal: th.Tensor, entropy_coef: float | th.Tensor,
                        reinforce_mix: float | th.Tensor, backprop: bool) -> BehaviourLosses:
        """Actor and critic losses in imagination from all posterior states (forward only; the world model frozen)."""
        policy = self.policy
        start = flatten_states(RSSMState(*(x.detach() for x in post)))  # [B * T, ...]
        policy.world_model.requires_grad_(False)  # frozen while the actor backpropagates through the dynamics
        try:
            with self._autocast():
                return policy.actor_critic.loss(
                    policy.world_model, start, is_terminal.reshape(-1), self.imagination_horizon, self.gamma,
                    self.return_lambda, reinforce_mix, entropy_coef, self.predict_discount, self.return_normalization,
                    backprop=backprop,
                )
        finally:
            policy.world_model.requires_grad_(True)

    def _update(self, batch: SequenceSamples, entropy_coef: float, reinforce_mix: float) -> dict[str, th.Tensor]:
        """The updates of a gradient step, run eagerly."""
        policy = self.policy
        model_loss, post, metrics = self._world_model_pass(batch)
        self._backward(model_loss, policy.model_optimizer)
        metrics["model_grad_norm"] = self._step("model", model_loss, policy.model_optimizer)
        behaviour = self._behaviour_pass(post, batch.is_terminal, entropy_coef, reinforce_mix, reinforce_mix < 1)
        metrics.update(behaviour.metrics)
        self._backward(behaviour.actor_loss, policy.actor_optimizer)
        metrics["actor_grad_norm"] = self._step("actor", behaviour.actor_loss, policy.actor_optimizer)
        self._backward(behaviour.critic_loss, policy.critic_optimizer)
        metrics["critic_grad_norm"] = self._step("critic", behaviour.critic_loss, policy.critic_optimizer)
        return metrics

    def _graphed_update(self, batch: SequenceSamples, entropy_coef: float, reinforce_mix: float) -> dict[str, th.Tensor]:
        """The updates of a gradient step with the passes replayed from CUDA graphs (captured on first use).

        The same computation as :meth:`_update`: the actor's and the critic's gradients come from one backward pass
        (their losses share no parameters: the critic reads detached features, the actor's baseline and returns come
        from the slow critic), and each optimizer steps as soon as its gradients are ready.
        """
        policy = self.policy
        graphs = self._graphs
        if graphs is None or not graphs.fits(reinforce_mix < 1):
            self._graphs = None  # the old graphs' memory first
            try:
                graphs = self._graphs = self._capture(batch, reinforce_mix < 1)
            except RuntimeError as error:  # a failed capture can leave the CUDA RNG unusable: no eager fallback
                raise RuntimeError(
                    f"DreamerV2 could not capture its training passes as CUDA graphs: {error}. A module that "
                    "synchronizes with the host inside the loss (.item(), a Python `if` on a tensor, boolean-mask "
                    "indexing) cannot be captured; train with cuda_graph=False."
                ) from error
        copy_into(graphs.batch, batch)
        graphs.entropy_coef.fill_(entropy_coef)
        graphs.reinforce_mix.fill_(reinforce_mix)
        model_loss, _, metrics = graphs.world_model.replay()
        metrics = dict(metrics)
        metrics["model_grad_norm"] = self._step("model", model_loss, policy.model_optimizer)
        behaviour = graphs.behaviour.replay()
        metrics.update(behaviour.metrics)
        metrics["actor_grad_norm"] = self._step("actor", behaviour.actor_loss, policy.actor_optimizer)
        metrics["critic_grad_norm"] = self._step("critic", behaviour.critic_loss, policy.critic_optimizer)
        return {key: value.clone() for key, value in metrics.items()}  # the next replay overwrites the outputs

    def _capture(self, batch: SequenceSamples, backprop: bool) -> UpdateGraphs:
        """Record the world-model and behaviour passes as CUDA graphs reading static copies of the step's inputs."""
        optimizers = [getattr(self.policy, name) for name in TORCH_OPTIMIZERS]
        for optimizer in optimizers:  # the captured backward passes allocate the gradients from the graphs' pool
            optimizer.zero_grad(set_to_none=True)
        static = clone_tensors(batch)
        entropy_coef, reinforce_mix = th.zeros((), device=self.device), th.zeros((), device=self.device)

        def world_model() -> tuple[list[th.Tensor], tuple[th.Tensor, RSSMState, dict[str, th.Tensor]]]:
            outputs = self._world_model_pass(static)
            return [outputs[0]], outputs

        world_model_graph = GraphedPass(world_model)
        post = world_model_graph.outputs[1]

        def behaviour() -> tuple[list[th.Tensor], BehaviourLosses]:
            losses = self._behaviour_pass(post, static.is_terminal, entropy_coef, reinforce_mix, backprop)
            return [losses.actor_loss, losses.critic_loss], losses

        behaviour_graph = GraphedPass(behaviour, pool=world_model_graph.pool())
        grads = [(p, p.grad) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        return UpdateGraphs(world_model_graph, behaviour_graph, static, entropy_coef, reinforce_mix, backprop, grads)

    def _autocast(self) -> th.autocast:
        """The autocast context of the training forward passes (disabled for fp32); backward runs outside it."""
        dtype = PRECISIONS[self.precision]
        # no cast cache under CUDA graphs: the cached bf16 weights would go stale between replays
        return th.autocast(self.device.type, dtype=dtype or th.float32, enabled=dtype is not None,
                           cache_enabled=not self._graphs_enabled())

    @staticmethod
    def _backward(loss: th.Tensor, optimizer: th.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def _step(self, name: str, loss: th.Tensor, optimizer: th.optim.Optimizer) -> th.Tensor:
        """Clip, check for divergence (before any parameter changes), step, decoupled weight decay."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = clip_grad_norm_(params, self.max_grad_norm)
        if not th.isfinite(grad_norm):
            what = "loss" if not th.isfinite(loss) else "gradient norm"
            raise ValueError(
                f"DreamerV2 diverged: non-finite {name} {what} (loss={loss.item()}, grad_norm={grad_norm.item()}) at "
                f"update {self._n_updates}; no parameter was changed. Lower the learning rates or check the inputs."
            )
        optimizer.step()
        if self.weight_decay > 0:
            with th.no_grad():
                th._foreach_mul_(params, 1.0 - self.weight_decay)
        return grad_norm.detach()

    def learn(
        self: SelfDreamerV2,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "DreamerV2",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfDreamerV2:
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)

    def _setup_learn(self, total_timesteps: int, callback: MaybeCallback = None, reset_num_timesteps: bool = True,
                     tb_log_name: str = "run", progress_bar: bool = False) -> tuple[int, Any]:
        # A checkpoint's resume state is used once, by the first learn() after load(); a step left pending by a
        # stopped learn() (callback returned False, or the checkpoint was taken mid-step) is completed on resume.
        resume_state, self._resume_state = self._resume_state, None
        pending = resume_state["pending"] if resume_state is not None else checkpointing.capture_pending_step(self)
        self._step_pending, self._stopped_step, self._first_chunk, self._chunk_offset = False, None, None, (0, 0)
        env_reset = reset_num_timesteps or self._last_obs is None
        if env_reset:
            self._last_state = None  # the env is reset: collection starts from the zero state
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if reset_num_timesteps:
            checkpointing.mark_trajectories_cut(self.replay_buffer)  # stored trajectories end here (no-op if empty)
        else:  # RNG states, RSSM state and the pending step (see docs/resume.md)
            checkpointing.resume_collection(self, resume_state, pending, env_was_reset=env_reset)
        return result

    def collect_rollouts(self, env: VecEnv, callback: BaseCallback, train_freq: TrainFreq, replay_buffer: ReplayBuffer,
                         action_noise: ActionNoise | None = None, learning_starts: int = 0,
                         log_interval: int | None = None) -> RolloutReturn:
        self._rollout_callback = callback  # checkpointing reads the pending step from its locals
        if self._first_chunk is not None:  # finish the train_freq chunk a checkpoint interrupted
            train_freq, self._first_chunk = self._first_chunk, None
        else:
            self._chunk_offset = (0, 0)
        try:
            rollout = super().collect_rollouts(env, callback, train_freq, replay_buffer, action_noise, learning_starts,
                                               log_interval)
            if self._step_pending:  # a callback stopped training mid-step: keep the step for save() and learn()
                self._stopped_step = checkpointing.capture_pending_step(self)
            return rollout
        except BaseException as error:
            self._step_pending = False  # the step failed: there is nothing to complete on resume
            if isinstance(error, Exception) and hasattr(error, "add_note"):
                error.add_note(
                    f"DreamerV2: collection failed at num_timesteps={self.num_timesteps}; the model and the replay buffer "
                    f"({self.replay_buffer.size() if self.replay_buffer is not None else 0} steps) are intact: "
                    "model.save(...) and model.save_replay_buffer(...) still work, and the run resumes from them "
                    "(docs/resume.md)."
                )
            raise
        finally:
            self._rollout_callback = None  # (it holds the training globals, which would make the model uncopyable)

    def save(self, path: Union[str, pathlib.Path, io.BufferedIOBase], exclude: Iterable[str] | None = None,
             include: Iterable[str] | None = None) -> None:
        """Save the model atomically (temporary file + ``os.replace``), with the state needed to resume exactly.

        Beyond SB3's save data, the zip holds ``_resume_state``: RNG states, the RSSM collection state and the env
        step in progress (see :mod:`sb3_dreamer.common.checkpointing` and ``docs/resume.md``).
        """
        loaded = self._resume_state is not None  # loaded and not used yet: save it unchanged
        if not loaded:
            self._resume_state = checkpointing.capture_resume_state(self)
        parent_save = super().save
        try:
            checkpointing.atomic_write(path, lambda target: parent_save(target, exclude, include), suffix="zip")
        finally:
            if not loaded:
                self._resume_state = None

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfDreamerV2],
        path: Union[str, pathlib.Path, io.BufferedIOBase],
        env: GymEnv | None = None,
        device: Union[th.device, str] = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfDreamerV2:
        """SB3's ``load``, after checking that ``path`` is an intact DreamerV2 zip (clear ``ValueError`` otherwise)."""
        required = ["data", "policy.pth", *(f"policy.{name}.pth" for name in TORCH_OPTIMIZERS)]
        checkpointing.check_model_file(path, required)
        return super().load(path, env, device, custom_objects, print_system_info, force_reset, **kwargs)

    def save_replay_buffer(self, path: Union[str, pathlib.Path, io.BufferedIOBase]) -> None:
        """Pickle the replay buffer atomically (temporary file + ``os.replace``)."""
        parent_save = super().save_replay_buffer
        checkpointing.atomic_write(path, parent_save, suffix="pkl")

    def load_replay_buffer(self, path: Union[str, pathlib.Path, io.BufferedIOBase], truncate_last_traj: bool = True) -> None:
        """Load a buffer saved by :meth:`save_replay_buffer`; a file that is unreadable or does not fit this model raises
        ``ValueError`` and leaves the current buffer in place. ``truncate_last_traj`` is accepted for SB3/zoo
        compatibility: the trajectory cut is handled by ``learn`` (see ``docs/resume.md``)."""
        self.replay_buffer = checkpointing.load_sequence_buffer(path, self, self.replay_buffer_class or SequenceReplayBuffer)

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        super().set_env(env, force_reset)
        if force_reset:
            self._last_state = None

    def _excluded_save_params(self) -> list[str]:
        return [
            *super()._excluded_save_params(),
            "_last_state",
            "_step_pending",
            "_rollout_callback",
            "_stopped_step",
            "_first_chunk",
            "_chunk_offset",
            "_actor_lr_schedule",
            "_critic_lr_schedule",
            "_entropy_schedule",
            "_mix_schedule",
            "_exploration_schedule",
            "_graphs",
            "_eager_steps_left",
        ]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", *(f"policy.{name}" for name in TORCH_OPTIMIZERS)], []

