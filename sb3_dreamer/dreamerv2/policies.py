"""DreamerV2 policies: the world model, the actor-critic and their three optimizers, plus stateful prediction.

The recurrent state carried between calls of :meth:`DreamerV2Policy.predict` is the numpy tuple
``(h_t, z_t, a_t)``: deterministic state ``[n_envs, deter_size]``, stochastic state ``[n_envs, stoch_dim]`` and the
last action in model encoding ``[n_envs, action_input_dim]``. ``state=None`` starts from zeros, and rows flagged in
``episode_start`` are reset.
"""

from typing import Any, Union

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule

from sb3_dreamer.common.actor_critic import ActorCritic
from sb3_dreamer.common.distributions import ActionCodec
from sb3_dreamer.common.networks import MultiEncoder
from sb3_dreamer.common.rssm import RSSM
from sb3_dreamer.common.type_aliases import RSSMState
from sb3_dreamer.common.world_model import WorldModel
from sb3_dreamer.dreamerv2.presets import resolve_preset

RecurrentState = tuple[np.ndarray, np.ndarray, np.ndarray]


class DreamerV2Policy(BasePolicy):
    """World model + actor + critic for DreamerV2.

    :param observation_space: observation space
    :param action_space: action space (``Discrete``, ``MultiDiscrete`` or bounded ``Box``)
    :param lr_schedule: learning-rate schedule (initial lrs of the three optimizers; the algorithm sets each one's own)
    :param preset: named model size (``"small"``, ``"medium"``, ``"atari"``), see :mod:`sb3_dreamer.dreamerv2.presets`
    :param deter_size: size of h_t (overrides the preset)
    :param hidden_size: dense units around the GRU
    :param stoch_size: number of latent variables in z_t
    :param classes: classes per categorical latent variable
    :param mlp_layers: hidden layers of the MLP heads, actor, critic and vector encoder/decoder
    :param mlp_units: units per MLP layer
    :param cnn_depth: first-layer channels of the CNN encoder/decoder
    :param latent_type: ``"categorical"`` (the paper) or ``"gaussian"`` (ablation)
    :param latent_features: ``"full"`` ([z_t, h_t] to the heads) or ``"stoch"`` (z_t only: the fully discrete model)
    :param layer_norm: layer norm in the GRU (False: the "no layer norm" ablation)
    :param image_dist: image likelihood, ``"mse"`` or ``"binary"``
    :param min_std: minimum std of Gaussian latents and of the continuous actor
    :param use_cnn: encode images with a CNN (``CnnPolicy``/``MultiInputPolicy``) or flatten them (``MlpPolicy``)
    :param optimizer_class: optimizer of all three parts
    :param optimizer_kwargs: its keyword arguments (default: ``eps=1e-5`` as in the paper)
    :param normalize_images: unused (images are always scaled to [-0.5, 0.5]); kept for SB3 compatibility
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        preset: str = "small",
        deter_size: int | None = None,
        hidden_size: int | None = None,
        stoch_size: int | None = None,
        classes: int | None = None,
        mlp_layers: int | None = None,
        mlp_units: int | None = None,
        cnn_depth: int | None = None,
        latent_type: str = "categorical",
        latent_features: str = "full",
        layer_norm: bool = True,
        image_dist: str = "mse",
        min_std: float = 0.1,
        use_cnn: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
    ) -> None:
        optimizer_kwargs = {"eps": 1e-5} if optimizer_kwargs is None else optimizer_kwargs
        super().__init__(
            observation_space, action_space, optimizer_class=optimizer_class, optimizer_kwargs=optimizer_kwargs,
            normalize_images=normalize_images,
        )
        if latent_type not in ("categorical", "gaussian"):
            raise ValueError(f"latent_type must be 'categorical' or 'gaussian', got {latent_type!r}")
        self.preset, self.latent_type, self.latent_features = preset, latent_type, latent_features
        self.layer_norm, self.image_dist, self.min_std, self.use_cnn = layer_norm, image_dist, min_std, use_cnn
        overrides = dict(deter_size=deter_size, hidden_size=hidden_size, stoch_size=stoch_size, classes=classes,
                         mlp_layers=mlp_layers, mlp_units=mlp_units, cnn_depth=cnn_depth)
        self.sizes = resolve_preset(preset, overrides)
        self._build(lr_schedule)

    def _build(self, lr_schedule: Schedule) -> None:
        s = self.sizes
        self.action_codec = ActionCodec(self.action_space, self.min_std)
        encoder = MultiEncoder(self.observation_space, s["cnn_depth"], s["mlp_layers"], s["mlp_units"], self.use_cnn)
        rssm = RSSM(
            self.action_codec.input_dim, encoder.output_dim, s["deter_size"], s["hidden_size"], s["stoch_size"],
            s["classes"] if self.latent_type == "categorical" else 0, self.layer_norm, self.min_std,
        )
        self.world_model = WorldModel(
            encoder, rssm, self.action_codec, s["mlp_layers"], s["mlp_units"], self.latent_features, self.image_dist
        )
        self.actor_critic = ActorCritic(self.world_model.feature_dim, self.action_codec, s["mlp_layers"], s["mlp_units"])
        lr = lr_schedule(1)
        self.model_optimizer = self.optimizer_class(self.world_model.parameters(), lr=lr, **self.optimizer_kwargs)
        self.actor_optimizer = self.optimizer_class(self.actor_critic.actor.parameters(), lr=lr, **self.optimizer_kwargs)
        self.critic_optimizer = self.optimizer_class(self.actor_critic.critic.parameters(), lr=lr, **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            preset=self.preset, latent_type=self.latent_type, latent_features=self.latent_features,
            layer_norm=self.layer_norm, image_dist=self.image_dist, min_std=self.min_std, use_cnn=self.use_cnn,
            lr_schedule=self._dummy_schedule, **self.sizes,
        )
        return data

    @staticmethod
    def _dummy_schedule(_: float) -> float:
        return 0.0

    def initial_state(self, n_envs: int) -> tuple[RSSMState, th.Tensor]:
        """Zero model state and zero previous action for ``n_envs`` environments."""
        state = self.world_model.rssm.initial(n_envs, self.device)
        return state, th.zeros(n_envs, self.action_codec.input_dim, device=self.device)

    def step(
        self, obs: PyTorchObs, state: RSSMState, prev_action: th.Tensor, episode_start: th.Tensor, deterministic: bool
    ) -> tuple[th.Tensor, RSSMState]:
        """One filtering step: posterior from (s_{t-1}, a_{t-1}, x_t), then an action from π.

        :return: (model action ``[N, A]``, posterior state)
        """
        _, embed = self.world_model.embed(obs)
        post = self.world_model.rssm.filter_step(state, prev_action, embed, episode_start, sample=not deterministic)
        dist = self.actor_critic.policy(self.world_model.features(post))
        action = dist.mode() if deterministic else dist.rsample()
        return action, post

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        """Stateless prediction (each observation treated as an episode start)."""
        n_envs = next(iter(observation.values())).shape[0] if isinstance(observation, dict) else observation.shape[0]
        state, prev_action = self.initial_state(n_envs)
        action, _ = self.step(observation, state, prev_action, th.ones(n_envs, dtype=th.bool, device=self.device),
                              deterministic)
        return th.as_tensor(self.action_codec.model_to_buffer(action))

    def predict(  # type: ignore[override]
        self,
        observation: Union[np.ndarray, dict[str, np.ndarray]],
        state: RecurrentState | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, RecurrentState]:
        """Actions and the next recurrent state, for any batch of observations.

        :param observation: observations (a single one or a batch, as SB3 accepts)
        :param state: ``(h, z, previous action)`` from the previous call, or None to start from zeros
        :param episode_start: per-env flags; flagged rows start a new episode (their state is reset)
        :param deterministic: take the actor's mode and the posterior's mode (else sample both)
        :return: (env actions, next state)
        """
        if self.training:  # walking the ~70 modules to set a flag that is already off cost a quarter of a call
            self.set_training_mode(False)
        if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
            raise ValueError("You have passed a tuple to the predict() function instead of a Numpy array or a Dict. "
                             "You are probably mixing Gym API with SB3 VecEnv API: `obs, info = env.reset()` (Gym) "
                             "vs `obs = vec_env.reset()` (SB3 VecEnv).")
        if isinstance(self.observation_space, spaces.Dict) and not (
            isinstance(observation, dict) and set(observation) == set(self.observation_space.spaces)
        ):  # SB3 would fail with a KeyError or an IndexError
            given = sorted(observation) if isinstance(observation, dict) else type(observation).__name__
            raise ValueError(f"Dict observations need exactly the keys {sorted(self.observation_space.spaces)}, got {given}.")
        obs_tensor, vectorized = self.obs_to_tensor(observation)
        first = next(iter(obs_tensor.values())) if isinstance(obs_tensor, dict) else obs_tensor
        n_envs = first.shape[0]
        with th.no_grad():
            if state is None:
                model_state, prev_action = self.initial_state(n_envs)
            else:
                model_state, prev_action = self._state_from_numpy(state, n_envs)
            if episode_start is None:
                starts = th.zeros(n_envs, dtype=th.bool, device=self.device)
            else:
                starts = th.as_tensor(np.asarray(episode_start), device=self.device).reshape(-1).bool()
                if starts.shape[0] != n_envs:
                    raise ValueError(f"episode_start has {starts.shape[0]} entries for {n_envs} observations.")
            action, post = self.step(obs_tensor, model_state, prev_action, starts, deterministic)
        env_actions = self.action_codec.buffer_to_env(self.action_codec.model_to_buffer(action))
        if not vectorized:
            env_actions = env_actions[0]
        next_state = (post.deter.cpu().numpy(), post.stoch.cpu().numpy(), action.cpu().numpy())
        return env_actions, next_state

    def _state_from_numpy(self, state: RecurrentState, n_envs: int) -> tuple[RSSMState, th.Tensor]:
        if not isinstance(state, tuple) or len(state) != 3:
            raise ValueError("state must be the (h, z, previous action) tuple returned by the previous predict() call.")
        zero_state, zero_action = self.initial_state(n_envs)
        deter, stoch, action = (th.as_tensor(np.asarray(x), dtype=th.float32, device=self.device) for x in state)
        for name, given, expected in (("h", deter, zero_state.deter), ("z", stoch, zero_state.stoch),
                                      ("action", action, zero_action)):
            if given.shape != expected.shape:
                raise ValueError(f"state {name} has shape {tuple(given.shape)}, expected {tuple(expected.shape)} "
                                 f"for {n_envs} observations.")
        return RSSMState(deter, stoch, zero_state.stats), action


class MlpDreamerV2Policy(DreamerV2Policy):
    """DreamerV2 policy for vector observations (images, if any, are flattened)."""

    def __init__(self, *args: Any, use_cnn: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, use_cnn=use_cnn, **kwargs)


class CnnDreamerV2Policy(DreamerV2Policy):
    """DreamerV2 policy for image observations (CNN encoder and decoder)."""


class MultiInputDreamerV2Policy(DreamerV2Policy):
    """DreamerV2 policy for Dict observations mixing images (CNN) and vectors (MLP)."""


MlpPolicy = MlpDreamerV2Policy
CnnPolicy = CnnDreamerV2Policy
MultiInputPolicy = MultiInputDreamerV2Policy
