"""Bad input, tried systematically: property-based tests over observation and action spaces.

For every drawn (observation space, action space, policy) DreamerV2 must either

* construct, ``predict`` valid actions (single and batched observations, with the recurrent state threaded) and run a
  couple of gradient steps, or
* fail **at construction** with a ``ValueError``/``AssertionError`` whose message says what is wrong,

never crash obscurely later. The number of distinct combinations tried is printed (``pytest -s``).
"""

from collections import Counter

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sb3_dreamer import DreamerV2

TINY_POLICY = dict(deter_size=16, hidden_size=16, stoch_size=2, classes=2, mlp_layers=1, mlp_units=16, cnn_depth=2)
TINY_ALGO = dict(learning_starts=8, batch_size=2, sequence_length=4, imagination_horizon=2, train_freq=4,
                 buffer_size=64, seed=0, device="cpu", policy_kwargs=TINY_POLICY)
MAX_EXAMPLES = 60

DTYPES = [np.uint8, np.float32, np.float64, np.bool_, np.int32, np.int64]
BOUNDS = [(-1.0, 1.0), (-10.0, 10.0), (0.0, 255.0), (0.0, 1.0), (-np.inf, np.inf), (-np.inf, 0.0)]


@st.composite
def box_observations(draw: st.DrawFn) -> spaces.Box:
    ndim = draw(st.integers(1, 4))
    if ndim == 3:  # images: channel-first or channel-last, sides from 1 to 20 px
        channels, height, width = draw(st.integers(1, 4)), draw(st.integers(1, 20)), draw(st.integers(1, 20))
        shape = (channels, height, width) if draw(st.booleans()) else (height, width, channels)
    else:
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    if dtype == np.bool_:
        return spaces.Box(0, 1, shape, np.bool_)
    if dtype == np.uint8:
        low, high = draw(st.sampled_from([(0, 255), (0, 1), (10, 20)]))
        return spaces.Box(low, high, shape, np.uint8)
    if np.issubdtype(dtype, np.integer):
        low, high = draw(st.sampled_from([(-5, 5), (0, 100)]))
        return spaces.Box(low, high, shape, dtype)
    low, high = draw(st.sampled_from(BOUNDS))
    return spaces.Box(low, high, shape, dtype)


def leaf_observations() -> st.SearchStrategy[spaces.Space]:
    return st.one_of(
        box_observations(),
        st.integers(1, 6).map(spaces.Discrete),
        st.builds(lambda n, start: spaces.Discrete(n, start=start), st.integers(1, 6), st.integers(-3, 3)),
        st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda nvec: spaces.MultiDiscrete(nvec)),
        st.builds(lambda nvec, start: spaces.MultiDiscrete(nvec, start=[start] * len(nvec)),
                  st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(-2, 2)),
        st.just(spaces.MultiDiscrete([[2, 3], [4, 2]])),
        st.one_of(st.integers(1, 6), st.tuples(st.integers(1, 3), st.integers(1, 3))).map(spaces.MultiBinary),
    )


@st.composite
def dict_observations(draw: st.DrawFn, depth: int = 0) -> spaces.Dict:
    keys = draw(st.lists(st.sampled_from(["image", "state", "mode", "z_last", "a_first"]), min_size=1, max_size=3,
                         unique=True))
    children = {}
    for key in keys:
        nested = depth == 0 and draw(st.integers(0, 9)) == 0  # occasionally a Dict inside the Dict
        children[key] = draw(dict_observations(depth + 1)) if nested else draw(leaf_observations())
    return spaces.Dict(children)


def observation_spaces() -> st.SearchStrategy[spaces.Space]:
    return st.one_of(leaf_observations(), dict_observations())


def action_spaces() -> st.SearchStrategy[spaces.Space]:
    return st.one_of(
        st.integers(1, 5).map(spaces.Discrete),
        st.builds(lambda n, start: spaces.Discrete(n, start=start), st.integers(2, 5), st.integers(-2, 2)),
        st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda nvec: spaces.MultiDiscrete(nvec)),
        st.builds(lambda nvec, start: spaces.MultiDiscrete(nvec, start=[start] * len(nvec)),
                  st.lists(st.integers(2, 4), min_size=1, max_size=3), st.integers(-2, 2)),
        st.integers(1, 4).map(spaces.MultiBinary),
        st.builds(lambda n, low, high, dtype: spaces.Box(low, high, (n,), dtype), st.integers(1, 3),
                  st.sampled_from([-1.0, -2.0, -np.inf, 0.5]), st.sampled_from([1.0, 3.0, np.inf, 0.5]),
                  st.sampled_from([np.float32, np.float64])),
        st.builds(lambda shape: spaces.Box(-1.0, 1.0, shape, np.float32), st.tuples(st.integers(1, 3), st.integers(1, 3))),
        st.builds(lambda n: spaces.Box(-3, 3, (n,), np.int64), st.integers(1, 3)),
    )


class SpaceEnv(gym.Env):
    """Samples observations of any space; rejects actions outside its action space (so invalid actions surface)."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(0 if seed is None else seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        if not self.action_space.contains(np.asarray(action, dtype=self.action_space.dtype).reshape(self.action_space.shape)):
            raise RuntimeError(f"the agent sent an invalid action {action!r} for {self.action_space}")
        self.t += 1
        return self.observation_space.sample(), 1.0, self.t >= 6, False, {}


def _batch(space: spaces.Space, samples: list):
    if isinstance(space, spaces.Dict):
        return {key: _batch(sub, [s[key] for s in samples]) for key, sub in space.spaces.items()}
    return np.stack([np.asarray(s) for s in samples])


def check_space(obs_space: spaces.Space, action_space: spaces.Space, policy: str) -> str:
    """:return: ``"ok"`` or ``"rejected"``; anything else is a test failure (an exception propagates)."""
    env = SpaceEnv(obs_space, action_space)
    try:
        model = DreamerV2(policy, env, **TINY_ALGO)
    except (ValueError, AssertionError) as error:
        message = str(error)
        assert len(message) > 15, f"unclear error for {obs_space} / {action_space}: {error!r}"
        return "rejected"
    obs_space.seed(1)
    single = obs_space.sample()
    action, state = model.predict(single, deterministic=True)
    assert action_space.contains(np.asarray(action, dtype=action_space.dtype).reshape(action_space.shape)), action
    batch = _batch(obs_space, [obs_space.sample() for _ in range(2)])
    actions, state = model.predict(batch, deterministic=False)
    actions, _ = model.predict(batch, state=state, episode_start=np.array([True, False]))
    assert len(actions) == 2 and all(action_space.contains(a) for a in np.asarray(actions, dtype=action_space.dtype))
    model.learn(16)  # prefill, then two gradient steps
    assert model._n_updates == 2
    return "ok"


def test_spaces_construct_and_predict_or_fail_clearly():
    outcomes: Counter = Counter()
    tried: set = set()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(obs_space=observation_spaces(), action_space=action_spaces(),
           policy=st.sampled_from(["MlpPolicy", "CnnPolicy", "MultiInputPolicy"]))
    def check(obs_space, action_space, policy):
        outcome = check_space(obs_space, action_space, policy)
        outcomes[outcome] += 1
        tried.add((repr(obs_space), repr(action_space), policy))

    check()
    print(f"\nspace combinations tried: {len(tried)} distinct ({dict(outcomes)})")
    assert outcomes["ok"] > 0 and outcomes["rejected"] > 0
