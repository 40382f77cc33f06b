"""Environments for the zoo: MinAtar registration and DreamerV2's Atari protocol.

Importing this module registers the MinAtar ids (``MinAtar/{Asterix,Breakout,Freeway,Seaquest,SpaceInvaders}-v0/v1``)
once, so plain rl-zoo3 can use them too: ``python -m rl_zoo3.train --algo dqn --env MinAtar/Breakout-v1
--gym-packages sb3_dreamer.envs``.

:class:`DreamerAtariWrapper` is the Atari protocol of the paper (Hafner et al. 2021, appendix; official ``atari`` config):
64x64 grayscale frames, action repeat 4 with a max over the last two frames, sticky actions with probability 0.25,
up to 30 no-ops at reset, no life-loss termination, no reward clipping in the env (the agent applies ``tanh`` to the
reward-head target), no frame stack (the RSSM is the memory). The episode limit is ALE's own
``max_num_frames_per_episode=108000`` frames, i.e. 27k agent steps. The wrapper switches off ALE's own frame skip and
sticky actions, so both ``*NoFrameskip-v4`` and ``ALE/*-v5`` ids skip exactly 4 frames and get sticky actions exactly
once (in the wrapper, per frame, like ALE does); ``env_kwargs: {frameskip: 1, repeat_action_probability: 0.0}`` in the
YAML says the same explicitly.
"""

import gymnasium as gym
from stable_baselines3.common.atari_wrappers import MaxAndSkipEnv, NoopResetEnv, StickyActionEnv, WarpFrame

MINATAR_GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")
MINATAR_IDS = tuple(f"MinAtar/{game}-v1" for game in MINATAR_GAMES)


def register_minatar() -> bool:
    """Register the MinAtar ids with gymnasium unless they already are; returns whether MinAtar is available."""
    if "MinAtar/Breakout-v1" in gym.registry:
        return True
    try:
        import minatar.gym
    except ImportError:
        return False
    minatar.gym.register_envs()
    return True


def _disable_ale_skip_and_sticky(env: gym.Env) -> None:
    """Make the ALE env step single frames without sticky actions, whatever its id's defaults (v5: skip 4, sticky 0.25).

    The zoo applies YAML ``env_kwargs`` to the training env only (not to the EvalCallback env, nor in ``enjoy``/
    ``record_video``), so the wrapper enforces this itself: it sets the frame skip to 1 and ALE's
    ``repeat_action_probability`` to 0, then reloads the ROM so that the setting takes effect.
    """
    ale_env = env.unwrapped
    if not hasattr(ale_env, "ale") or not hasattr(ale_env, "_frameskip"):
        raise ValueError(f"DreamerAtariWrapper needs an ALE env, got {type(ale_env).__name__}")
    ale_env._frameskip = 1
    if ale_env.ale.getFloat("repeat_action_probability") != 0.0:
        ale_env.ale.setFloat("repeat_action_probability", 0.0)
        ale_env.load_game()


class DreamerAtariWrapper(gym.Wrapper):
    """DreamerV2's Atari preprocessing (see the module docstring), built from SB3's Atari wrappers.

    Order, innermost first: sticky actions (per frame) → no-op reset → repeat ``frame_skip`` frames with a max over the
    last two → grayscale and resize to ``screen_size`` x ``screen_size`` (``uint8``, shape ``(H, W, 1)``).
    Unlike SB3's ``AtariWrapper`` it never presses FIRE at reset, never ends an episode on a life loss and never
    clips rewards.

    :param env: an ALE env (any id; its own frame skip and sticky actions are switched off)
    :param noop_max: maximum number of no-ops at reset
    :param frame_skip: action repeat (frames per agent step)
    :param screen_size: side of the square observation
    :param action_repeat_probability: sticky-action probability, applied per frame
    """

    def __init__(
        self,
        env: gym.Env,
        noop_max: int = 30,
        frame_skip: int = 4,
        screen_size: int = 64,
        action_repeat_probability: float = 0.25,
    ) -> None:
        _disable_ale_skip_and_sticky(env)
        if action_repeat_probability > 0.0:
            env = StickyActionEnv(env, action_repeat_probability)
        if noop_max > 0:
            env = NoopResetEnv(env, noop_max=noop_max)
        if frame_skip > 1:
            env = MaxAndSkipEnv(env, skip=frame_skip)
        env = WarpFrame(env, width=screen_size, height=screen_size)
        super().__init__(env)


register_minatar()
