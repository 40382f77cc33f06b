"""Experience for the analysis tools: episodes collected from an env, fixed-length sequences, and posterior states.

Episodes follow the replay buffer's step convention: row t holds x_t, the buffer action a_{t-1} that led to it (zeros
at t = 0) and the reward r_t received on arriving at x_t (zero at t = 0). The posterior states s_t = (h_t, z_t) are
recomputed by filtering each episode through the RSSM, with the posterior's mode (``sample=False``) by default so that
the analyses are deterministic given the data.
"""

from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.vec_env import VecEnv

from sb3_dreamer.common.type_aliases import ObsTensor, RSSMState, SequenceSamples
from sb3_dreamer.common.world_model import WorldModel


class Episode(NamedTuple):
    observations: dict[str, np.ndarray]  # raw observations per key: [T, *space]
    actions: np.ndarray  # [T, action_dim] buffer actions, row t led to x_t (zeros at t = 0)
    rewards: np.ndarray  # [T], r_t received on arriving at x_t (0 at t = 0)
    terminal: bool  # ended by termination (not by truncation or the step cap)


def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    """``gymnasium.make`` that registers the MinAtar ids first when needed."""
    if env_id.startswith("MinAtar/"):
        import minatar.gym

        if env_id not in gym.registry:
            minatar.gym.register_envs()
    return gym.make(env_id, **kwargs)


def as_vec_env(model: Any, env: gym.Env | VecEnv | str) -> VecEnv:
    """The env wrapped the way the model sees observations (VecEnv, images transposed as during training)."""
    if isinstance(env, str):
        env = make_env(env)
    return env if isinstance(env, VecEnv) else model._wrap_env(env, verbose=0, monitor_wrapper=False)


def _row(obs: Any, i: int) -> dict[str, np.ndarray]:
    return {k: np.array(v[i]) for k, v in (obs.items() if isinstance(obs, dict) else [("obs", obs)])}


def collect_episodes(
    model: Any,
    env: gym.Env | VecEnv | str,
    n_episodes: int,
    max_steps: int = 1000,
    policy: str = "model",
    deterministic: bool = False,
    seed: int | None = None,
) -> list[Episode]:
    """Run the model's policy (or uniform random actions) until ``n_episodes`` episodes are complete.

    :param model: a trained :class:`~sb3_dreamer.DreamerV2`
    :param env: a gymnasium env, a VecEnv or an env id
    :param n_episodes: episodes to return
    :param max_steps: steps after which an episode is cut (it then counts as truncated)
    :param policy: ``"model"`` (the actor, filtering observations through the RSSM) or ``"random"``
    :param deterministic: take the actor's mode
    :param seed: seed of the env (and of the random actions)
    """
    if policy not in ("model", "random"):
        raise ValueError(f"policy must be 'model' or 'random', got {policy!r}")
    venv = as_vec_env(model, env)
    if seed is not None:
        venv.seed(seed)
        venv.action_space.seed(seed)
    codec = model.policy.action_codec
    obs = venv.reset()
    n_envs = venv.num_envs
    action_dim = codec.env_to_buffer(np.array([venv.action_space.sample()])).shape[-1]
    builders = [([_row(obs, i)], [np.zeros(action_dim, np.float32)], [0.0]) for i in range(n_envs)]
    starts, state = np.ones(n_envs, dtype=bool), None
    episodes: list[Episode] = []
    while len(episodes) < n_episodes:
        if policy == "model":
            _, state = model.policy.predict(obs, state, starts, deterministic)
            buffer_actions = codec.model_to_buffer(th.as_tensor(state[2]))
            env_actions = codec.buffer_to_env(buffer_actions)
        else:
            env_actions = np.array([venv.action_space.sample() for _ in range(n_envs)])
            buffer_actions = codec.env_to_buffer(env_actions)
        obs, rewards, dones, infos = venv.step(env_actions)
        starts = np.array(dones, dtype=bool)
        for i, (observations, actions, rews) in enumerate(builders):
            if dones[i]:  # the returned observation already starts the next episode
                last = infos[i]["terminal_observation"]
                observations.append({k: np.array(v) for k, v in last.items()} if isinstance(last, dict) else {"obs": last})
            else:
                observations.append(_row(obs, i))
            actions.append(np.asarray(buffer_actions[i], dtype=np.float32))
            rews.append(float(rewards[i]))
            if dones[i] or len(rews) >= max_steps:
                terminal = bool(dones[i]) and not infos[i].get("TimeLimit.truncated", False)
                episodes.append(Episode({k: np.stack([o[k] for o in observations]) for k in observations[0]},
                                        np.stack(actions), np.array(rews, dtype=np.float32), terminal))
                builders[i] = ([_row(obs, i)], [np.zeros(action_dim, np.float32)], [0.0])
                starts[i] = True
    return episodes[:n_episodes]


def _obs_tensor(observations: dict[str, np.ndarray], device: th.device) -> ObsTensor:
    tensors = {k: th.as_tensor(v, device=device) for k, v in observations.items()}
    return tensors["obs"] if list(tensors) == ["obs"] else tensors


def episodes_to_sequences(episodes: list[Episode], length: int, device: th.device | str = "cpu") -> SequenceSamples:
    """The first ``length`` steps of each episode as a batch ``[B, T, ...]``.

    Episodes shorter than ``length`` are padded by repeating their last observation; padded rows are flagged
    ``is_first`` (see :func:`valid_mask`).
    """
    obs: dict[str, list[np.ndarray]] = {k: [] for k in episodes[0].observations}
    actions, rewards, firsts, terminals = [], [], [], []
    for episode in episodes:
        n = min(len(episode.rewards), length)
        pad = length - n
        for key, values in episode.observations.items():
            obs[key].append(np.concatenate([values[:n], np.repeat(values[n - 1 : n], pad, axis=0)]))
        actions.append(np.concatenate([episode.actions[:n], np.zeros((pad, episode.actions.shape[1]), np.float32)]))
        rewards.append(np.concatenate([episode.rewards[:n], np.zeros(pad, np.float32)]))
        firsts.append((np.arange(length) == 0) | (np.arange(length) >= n))
        terminal = np.zeros(length, dtype=bool)
        terminal[n - 1] = episode.terminal and n == len(episode.rewards)
        terminals.append(terminal)
    is_first = np.stack(firsts)
    is_first[:, 0] = True
    device = th.device(device)
    return SequenceSamples(
        observations=_obs_tensor({k: np.stack(v) for k, v in obs.items()}, device),
        actions=th.as_tensor(np.stack(actions), device=device),
        rewards=th.as_tensor(np.stack(rewards), device=device),
        is_first=th.as_tensor(is_first, device=device),
        is_terminal=th.as_tensor(np.stack(terminals), device=device),
        is_last=th.as_tensor(np.stack(terminals), device=device),
    )


def collect_sequences(
    model: Any,
    env: gym.Env | VecEnv | str,
    n_sequences: int,
    length: int,
    policy: str = "model",
    deterministic: bool = False,
    seed: int | None = None,
    max_episodes: int | None = None,
) -> SequenceSamples:
    """``n_sequences`` windows of ``length`` steps from the start of episodes, preferring episodes that last that long.

    Up to ``max_episodes`` (default ``10 * n_sequences``) episodes are run; the longest ones are kept, so short games
    (a random agent loses MinAtar Breakout within a few steps) give partly padded sequences (see :func:`valid_mask`).
    """
    max_episodes = max_episodes or 10 * n_sequences
    found: list[Episode] = []
    for i in range(max_episodes):
        episode_seed = None if seed is None else seed + i
        found += collect_episodes(model, env, 1, length, policy, deterministic, episode_seed)
        if sum(len(e.rewards) >= length for e in found) >= n_sequences:
            break
    found.sort(key=lambda e: -len(e.rewards))  # stable: equally long episodes keep their order
    return episodes_to_sequences(found[:n_sequences], length, model.device)


def sequences_from_replay(model: Any, n_sequences: int) -> SequenceSamples:
    """``n_sequences`` windows from the model's replay buffer (its ``sequence_length`` steps each)."""
    return model.replay_buffer.sample(n_sequences)


def valid_mask(samples: SequenceSamples) -> np.ndarray:
    """``[B, T]`` True for the steps of the episode the window starts in (False after any later ``is_first``)."""
    later_first = samples.is_first.cpu().numpy().copy()
    later_first[:, 0] = False
    return np.cumsum(later_first, axis=1) == 0


def posterior_states(world_model: WorldModel, samples: SequenceSamples, sample: bool = False) -> RSSMState:
    """Filter the sequences through the RSSM: posterior states stacked ``[B, T, ...]`` (no gradient)."""
    with th.no_grad():
        _, embed = world_model.embed(samples.observations)  # [B, T, E]
        actions = world_model.action_codec.buffer_to_model(samples.actions)  # [B, T, A]
        state = world_model.rssm.initial(embed.shape[0], embed.device)
        states = []
        for t in range(embed.shape[1]):
            state, _ = world_model.rssm.obs_step(state, actions[:, t], embed[:, t], samples.is_first[:, t], sample)
            states.append(state)
    return RSSMState(*(th.stack(field, dim=1) for field in zip(*states)))


class LatentData(NamedTuple):
    """Posterior states of many episodes, concatenated over all steps (N = total steps)."""

    deter: np.ndarray  # h_t: [N, deter_size]
    stoch: np.ndarray  # z_t: [N, stoch_dim] (one-hot per variable for categorical latents)
    stats: np.ndarray  # [N, stoch_size, classes] logits, or [N, 2 * stoch_size] (mean, std)
    features: np.ndarray  # what the heads read: [N, feature_dim]
    observations: dict[str, np.ndarray]  # raw observations per key: [N, *space]
    rewards: np.ndarray  # [N]
    is_first: np.ndarray  # [N]
    episode: np.ndarray  # [N] episode index


def episode_latents(model: Any, episodes: list[Episode], sample: bool = False) -> LatentData:
    """Posterior states of every step of ``episodes`` (each filtered from its own start)."""
    world_model = model.policy.world_model
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("deter", "stoch", "stats", "features")}
    for episode in episodes:
        samples = episodes_to_sequences([episode], len(episode.rewards), model.device)
        post = posterior_states(world_model, samples, sample)  # [1, T, ...]
        with th.no_grad():
            features = world_model.features(post)
        for name, value in (("deter", post.deter), ("stoch", post.stoch), ("stats", post.stats), ("features", features)):
            parts[name].append(value[0].cpu().numpy())
    lengths = [len(e.rewards) for e in episodes]
    return LatentData(
        **{k: np.concatenate(v) for k, v in parts.items()},
        observations={k: np.concatenate([e.observations[k] for e in episodes]) for k in episodes[0].observations},
        rewards=np.concatenate([e.rewards for e in episodes]),
        is_first=np.concatenate([np.arange(n) == 0 for n in lengths]),
        episode=np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]),
    )


def collect_latents(
    model: Any,
    env: gym.Env | VecEnv | str,
    n_episodes: int = 20,
    max_steps: int = 1000,
    policy: str = "model",
    deterministic: bool = False,
    seed: int | None = None,
) -> LatentData:
    """Run ``n_episodes`` episodes and return the posterior state of every step."""
    return episode_latents(model, collect_episodes(model, env, n_episodes, max_steps, policy, deterministic, seed))


def observations_of(data: LatentData, index: np.ndarray | slice, device: th.device | str = "cpu") -> ObsTensor:
    """Raw observations of the steps ``index`` of ``data`` as encoder input (a tensor for single-key spaces)."""
    return _obs_tensor({k: v[index] for k, v in data.observations.items()}, th.device(device))
