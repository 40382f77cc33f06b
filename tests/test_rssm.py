"""RSSM, networks and action distributions: shapes, resets, and exact behaviour."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from sb3_dreamer.common import networks
from sb3_dreamer.common import rssm as rssm_module
from sb3_dreamer.common.distributions import ActionCodec, TruncatedNormalActions, argmax_onehot, straight_through_onehot
from sb3_dreamer.common.networks import ConvEncoder, MultiDecoder, MultiEncoder
from sb3_dreamer.common.rssm import RSSM, LayerNormGRUCell


def make_rssm(classes: int = 4) -> RSSM:
    th.manual_seed(0)
    return RSSM(action_dim=3, embed_dim=5, deter_size=8, hidden_size=8, stoch_size=2, classes=classes)


def assert_same_layer(reference: th.nn.Module, layer: th.nn.Module, x: th.Tensor) -> th.Tensor:
    """``layer`` computes ``reference``: same output, same gradients for the input, the weight and the bias."""
    x_ref, x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = reference(x_ref), layer(x)
    th.testing.assert_close(got, expected)
    (expected * th.arange(expected.numel()).view_as(expected)).sum().backward()
    (got * th.arange(got.numel()).view_as(got)).sum().backward()
    th.testing.assert_close(x.grad, x_ref.grad)
    th.testing.assert_close(layer.weight.grad, reference.weight.grad)
    th.testing.assert_close(layer.bias.grad, reference.bias.grad)
    return got


class TestRSSM:
    def test_is_first_resets_previous_state_and_action(self):
        rssm = make_rssm()
        embed = th.randn(2, 5)
        zero_state = rssm.initial(2, th.device("cpu"))
        busy_state = zero_state._replace(deter=th.randn(2, 8), stoch=th.rand(2, 8))
        action = th.randn(2, 3)
        first = th.ones(2, dtype=th.bool)

        th.manual_seed(1)
        reset, _ = rssm.obs_step(busy_state, action, embed, first)
        th.manual_seed(1)
        fresh, _ = rssm.obs_step(zero_state, th.zeros(2, 3), embed, first)
        th.testing.assert_close(reset.deter, fresh.deter)
        th.testing.assert_close(reset.stats, fresh.stats)
        th.testing.assert_close(reset.stoch, fresh.stoch)

        th.manual_seed(1)
        continued, _ = rssm.obs_step(busy_state, action, embed, ~first)
        assert not th.allclose(continued.deter, fresh.deter)

    def test_reset_applies_per_row(self):
        rssm = make_rssm()
        state = rssm.initial(2, th.device("cpu"))._replace(deter=th.randn(2, 8), stoch=th.rand(2, 8))
        embed, action = th.randn(2, 5), th.randn(2, 3)
        post, _ = rssm.obs_step(state, action, embed, th.tensor([True, False]), sample=False)
        row0, _ = rssm.obs_step(rssm.initial(1, th.device("cpu")), th.zeros(1, 3), embed[:1], th.tensor([True]), False)
        row1, _ = rssm.obs_step(state._replace(deter=state.deter[1:], stoch=state.stoch[1:]), action[1:], embed[1:],
                                th.tensor([False]), False)
        th.testing.assert_close(post.deter, th.cat([row0.deter, row1.deter]))

    @pytest.mark.parametrize("classes", [4, 0])
    def test_filter_step_is_the_posterior_of_obs_step(self, classes):
        rssm = make_rssm(classes)
        state = rssm.initial(3, th.device("cpu"))._replace(deter=th.randn(3, 8), stoch=th.rand(3, rssm.stoch_dim))
        embed, action, first = th.randn(3, 5), th.randn(3, 3), th.tensor([True, False, False])
        post, prior = rssm.obs_step(state, action, embed, first, sample=False)
        filtered = rssm.filter_step(state, action, embed, first, sample=False)
        for got, expected in zip(filtered, post):
            th.testing.assert_close(got, expected, rtol=0, atol=0)
        assert not th.equal(prior.stats, post.stats)  # the prior is a different distribution, skipped by filter_step
        th.manual_seed(3)
        sampled = rssm.filter_step(state, action, embed, first)
        th.testing.assert_close(sampled.deter, post.deter, rtol=0, atol=0)  # h_t is deterministic

    def test_observe_matches_stepping_and_resets_inside_the_sequence(self):
        rssm = make_rssm()
        embed, actions = th.randn(3, 6, 5), th.randn(3, 6, 3)
        is_first = th.zeros(3, 6, dtype=th.bool)
        is_first[:, 0] = True
        is_first[1, 3] = True
        post, prior = rssm.observe(embed, actions, is_first)
        assert post.deter.shape == (3, 6, 8) and post.stoch.shape == (3, 6, 8) and post.stats.shape == (3, 6, 2, 4)
        assert prior.stats.shape == (3, 6, 2, 4)
        # the posterior and prior share h_t
        th.testing.assert_close(post.deter, prior.deter)
        # a reset at t=3 makes h_3 independent of what came before it
        other = embed.clone()
        other[1, :3] = th.randn(3, 5)
        post_other, _ = rssm.observe(other, actions, is_first)
        assert not th.allclose(post_other.deter[1, 2], post.deter[1, 2])
        th.testing.assert_close(post_other.deter[1, 3], post.deter[1, 3])

    @pytest.mark.parametrize("classes", [4, 0])
    def test_observe_batches_the_prior_and_embedding_products_with_the_values_of_obs_step(self, classes, monkeypatch):
        """observe() computes the reset masks, the a_{t-1} half of the recurrent input, the e_t half of the posterior's
        input and the prior's head outside the loop: the states, statistics and every parameter gradient equal stepping
        obs_step (differentiable deterministic z_t, so both paths see the same latents)."""
        rssm = make_rssm(classes)

        def soft_sample(stats: th.Tensor, sample: bool) -> th.Tensor:  # a smooth stand-in for z_t ~ q, no noise
            return stats.softmax(-1).flatten(-2) if classes else stats.chunk(2, dim=-1)[0].tanh()

        monkeypatch.setattr(rssm, "_sample", soft_sample)
        th.manual_seed(1)
        embed, actions = th.randn(3, 6, 5, requires_grad=True), th.randn(3, 6, 3)
        is_first = th.zeros(3, 6, dtype=th.bool)
        is_first[:, 0] = is_first[2, 4] = True
        stats_shape = rssm.initial(1, th.device("cpu")).stats.shape[1:]
        weights = [th.randn(3, 6, *shape) for shape in ((8,), (rssm.stoch_dim,), stats_shape)]

        def loss_and_grads(post, prior):
            loss = sum((w * x).sum() for w, x in zip(weights, (post.deter, post.stoch, post.stats)))
            loss = loss + (weights[2] * prior.stats).sum() ** 2
            grads = th.autograd.grad(loss, [embed, *rssm.parameters()], allow_unused=True)
            return [th.zeros(()) if g is None else g for g in grads]

        post, prior = rssm.observe(embed, actions, is_first)
        got = loss_and_grads(post, prior)
        state, posts, priors = rssm.initial(3, th.device("cpu")), [], []
        for t in range(6):
            state, step_prior = rssm.obs_step(state, actions[:, t], embed[:, t], is_first[:, t])
            posts.append(state)
            priors.append(step_prior)
        stepped_post, stepped_prior = rssm_module.stack_states(posts, 1), rssm_module.stack_states(priors, 1)
        for field in ("deter", "stoch", "stats"):
            th.testing.assert_close(getattr(post, field), getattr(stepped_post, field))
        th.testing.assert_close(prior.stats, stepped_prior.stats)
        for g, expected in zip(got, loss_and_grads(stepped_post, stepped_prior)):
            th.testing.assert_close(g, expected)
        assert got[0].abs().sum() > 0 and all(g.abs().sum() > 0 for g in got[1:])  # every parameter is reached

    def test_categorical_samples_are_one_hot_per_variable(self):
        rssm = make_rssm()
        state, _ = rssm.obs_step(rssm.initial(4, th.device("cpu")), th.zeros(4, 3), th.randn(4, 5),
                                 th.ones(4, dtype=th.bool))
        per_variable = state.stoch.reshape(4, 2, 4)
        assert th.all(per_variable.sum(-1) == 1.0)

    def test_gaussian_latents(self):
        rssm = make_rssm(classes=0)
        post, prior = rssm.observe(th.randn(2, 4, 5), th.randn(2, 4, 3), th.ones(2, 4, dtype=th.bool))
        assert post.stoch.shape == (2, 4, 2) and post.stats.shape == (2, 4, 4)
        std = post.stats[..., 2:]
        assert th.all(std >= 0.1)
        kl = rssm.kl(post.stats, prior.stats)
        assert kl.shape == (2, 4) and th.all(kl >= 0)

    def test_kl_of_identical_distributions_is_zero(self):
        rssm = make_rssm()
        stats = th.randn(7, 2, 4)
        assert th.allclose(rssm.kl(stats, stats), th.zeros(7), atol=1e-6)
        assert rssm.entropy(th.zeros(1, 2, 4)).item() == pytest.approx(2 * np.log(4))


class TestOneHotPrefix:
    """Heads and the recurrent input layer gather the weight columns of one-hot latents instead of a dense product."""

    @pytest.mark.parametrize("dense_dim", [5, 0])  # features [z, h], and z alone (latent_features="stoch")
    def test_onehot_linear_is_the_dense_layer_with_the_same_weight_gradients(self, dense_dim):
        th.manual_seed(0)
        layer = th.nn.Linear(3 * 4 + dense_dim, 6)
        index = th.randint(0, 4, (2, 7, 3)) + th.arange(0, 12, 4)  # [2, 7, K=3] flat positions
        z = th.zeros(2, 7, 12).scatter_(-1, index, 1.0)
        dense = th.randn(2, 7, dense_dim, requires_grad=True)
        x = th.cat([z, dense], dim=-1)
        expected = layer(x)
        grads_expected = th.autograd.grad(expected.square().sum(), [layer.weight, layer.bias, dense])
        out = networks.onehot_linear(layer, x, networks.OneHotPrefix(index, 12))
        grads = th.autograd.grad(out.square().sum(), [layer.weight, layer.bias, dense], allow_unused=dense_dim == 0)
        th.testing.assert_close(out, expected)
        for grad, grad_expected in zip(grads, grads_expected):
            th.testing.assert_close(grad if grad is not None else th.zeros_like(grad_expected), grad_expected)

    def test_gather_table_is_not_cached_while_a_cuda_graph_is_captured(self, monkeypatch):
        # a graph must record the table's copy: a cached table would be the capture-time weights in every replay
        weight = th.randn(5, 12)
        monkeypatch.setattr(networks, "_capturing", lambda w: True)
        tables = [networks._gather_table(weight, 8) for _ in range(2)]
        assert tables[0] is not tables[1] and id(weight) not in networks._GATHER_TABLES
        th.testing.assert_close(tables[0], weight[:, :8].t())
        monkeypatch.setattr(networks, "_capturing", lambda w: False)
        assert networks._gather_table(weight, 8) is networks._gather_table(weight, 8)  # cached otherwise

    def test_onehot_linear_follows_weight_updates(self):
        """The gather table is cached per weight version: an optimizer step, a state-dict load and an in-place write are
        all seen."""
        th.manual_seed(0)
        layer = th.nn.Linear(8 + 2, 3)
        index = th.tensor([[1, 6], [3, 4], [0, 7]])
        x = th.cat([th.zeros(3, 8).scatter_(-1, index, 1.0), th.randn(3, 2)], dim=-1)
        prefix = networks.OneHotPrefix(index, 8)
        th.testing.assert_close(networks.onehot_linear(layer, x, prefix), layer(x))
        optimizer = th.optim.SGD(layer.parameters(), lr=0.5)
        networks.onehot_linear(layer, x, prefix).square().sum().backward()
        optimizer.step()
        th.testing.assert_close(networks.onehot_linear(layer, x, prefix), layer(x))
        other = th.nn.Linear(8 + 2, 3)
        layer.load_state_dict(other.state_dict())
        th.testing.assert_close(networks.onehot_linear(layer, x, prefix), other(x))
        with th.no_grad():
            layer.weight[:, :8] = 0.0
        th.testing.assert_close(networks.onehot_linear(layer, x, prefix), layer(x))

    def test_mlp_uses_the_prefix_only_where_no_gradient_must_reach_the_input(self, monkeypatch):
        th.manual_seed(0)
        net = networks.mlp(8 + 3, 2, layers=2, units=5)
        assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]  # as before
        index = th.tensor([[1, 6], [3, 4]])
        x = th.cat([th.zeros(2, 8).scatter_(-1, index, 1.0), th.randn(2, 3)], dim=-1)
        calls = []
        real = networks.onehot_linear
        monkeypatch.setattr(networks, "onehot_linear", lambda *args: calls.append(1) or real(*args))
        th.testing.assert_close(net(x, networks.OneHotPrefix(index, 8)), net(x))
        assert len(calls) == 1
        x.requires_grad_(True)  # straight-through latents: the gradient must reach z, so the dense product is used
        net(x, networks.OneHotPrefix(index, 8)).sum().backward()
        assert len(calls) == 1 and x.grad is not None and x.grad[:, :8].abs().sum() > 0

    def test_rssm_onehot_finds_the_samples_and_the_prior_step_agrees(self):
        rssm = make_rssm(classes=4)
        state = rssm.initial(3, th.device("cpu"))
        state = rssm.img_step(state._replace(stoch=rssm.img_step(state, th.zeros(3, 3)).stoch), th.zeros(3, 3))
        prefix = rssm.onehot(state.stoch)
        assert prefix.width == 8 and prefix.index.shape == (3, 2)
        th.testing.assert_close(th.zeros(3, 8).scatter_(-1, prefix.index, 1.0), state.stoch)
        action = th.randn(3, 3)
        th.manual_seed(5)
        sparse = rssm.img_step(state, action, prev_onehot=prefix)
        th.manual_seed(5)
        dense = rssm.img_step(state, action)
        th.testing.assert_close(sparse.deter, dense.deter)
        th.testing.assert_close(sparse.stoch, dense.stoch)
        assert make_rssm(classes=0).onehot(th.randn(3, 2)) is None  # Gaussian latents have no one-hot prefix


class TestLayerNormGRU:
    def test_update_gate_bias_and_layer_norm(self):
        cell = LayerNormGRUCell(3, 4)
        assert isinstance(cell.norm, th.nn.LayerNorm) and cell.linear.bias is None
        with th.no_grad():
            cell.linear.weight.zero_()
        h = th.randn(2, 4)
        # all pre-activations zero: reset = 0.5, candidate = tanh(0) = 0, update = sigmoid(-1)
        out = cell(th.randn(2, 3), h)
        th.testing.assert_close(out, (1 - th.sigmoid(th.tensor(-1.0))) * h)
        assert isinstance(LayerNormGRUCell(3, 4, layer_norm=False).norm, th.nn.Identity)

    def test_gru_step_is_the_official_formula(self):
        th.manual_seed(0)
        cell = LayerNormGRUCell(3, 4)
        x, h = th.randn(5, 3), th.randn(5, 4)
        parts = th.nn.functional.layer_norm(th.cat([x, h], -1) @ cell.linear.weight.t(), (12,))  # norm: unit affine
        reset, candidate, update = th.sigmoid(parts[:, :4]), parts[:, 4:8], th.sigmoid(parts[:, 8:] - 1.0)
        candidate = th.tanh(reset * candidate)
        th.testing.assert_close(cell(x, h), update * candidate + (1 - update) * h)


class TestNetworks:
    @pytest.mark.parametrize("shape", [(1, 64, 64), (3, 84, 84), (4, 10, 10), (2, 17, 23), (3, 32, 32)])
    def test_decoder_mirrors_encoder_exactly(self, shape):
        space = spaces.Box(0, 255, shape, np.uint8)
        encoder = MultiEncoder(space, cnn_depth=4, mlp_layers=1, mlp_units=8)
        decoder = MultiDecoder(12, encoder, mlp_layers=1, mlp_units=8)
        obs = th.randint(0, 255, (2, 3, *shape), dtype=th.uint8)  # [B, T, C, H, W]
        inputs = encoder.preprocess(obs)
        assert inputs["obs"].min() >= -0.5 and inputs["obs"].max() <= 0.5
        assert encoder(inputs).shape == (2, 3, encoder.output_dim)
        assert decoder(th.randn(2, 3, 12))["obs"].shape == (2, 3, *shape)

    def test_point_transposed_convolution_is_the_same_layer_as_a_gemm(self):
        th.manual_seed(0)
        reference = th.nn.ConvTranspose2d(12, 5, 5, 2)
        point = networks.PointConvTranspose2d(12, 5, 5, 2)
        point.load_state_dict(reference.state_dict())  # same parameters, same state dict keys
        reference.double(), point.double()
        for shape in [(3, 12, 1, 1), (2, 12, 3, 4)]:  # 1x1: the GEMM; larger: the parent's kernel
            assert_same_layer(reference, point, th.randn(shape, dtype=th.float64))
            reference.zero_grad(), point.zero_grad()
        decoder = networks.ConvDecoder(16, ConvEncoder((1, 64, 64), depth=4), channels=1)
        assert type(decoder.net[0]) is networks.PointConvTranspose2d  # the official decoder's first layer

    @pytest.mark.parametrize("c_out,kernel,stride", [(1, 6, 2), (3, 5, 2), (2, 6, 3), (4, 4, 1)])
    def test_phase_transposed_convolution_is_the_same_layer(self, c_out, kernel, stride):
        th.manual_seed(0)
        reference = th.nn.ConvTranspose2d(6, c_out, kernel, stride).double()
        phase = networks.PhaseConvTranspose2d(6, c_out, kernel, stride).double()
        phase.load_state_dict(reference.state_dict())  # same parameters, same state dict keys
        got = assert_same_layer(reference, phase, th.randn(2, 6, 7, 5, dtype=th.float64))
        assert got.shape == (2, c_out, (7 - 1) * stride + kernel, (5 - 1) * stride + kernel)
        decoder = networks.ConvDecoder(16, ConvEncoder((1, 64, 64), depth=4), channels=1)
        assert type(decoder.net[-1]) is networks.PhaseConvTranspose2d  # the official decoder's last layer

    def test_blocked_linear_is_the_same_layer_and_blocks_only_single_rows(self, monkeypatch):
        th.manual_seed(0)
        reference = th.nn.Linear(12, 8).double()
        blocked = networks.BlockedLinear(12, 8).double()
        blocked.load_state_dict(reference.state_dict())  # same parameters, same state dict keys
        calls = []
        original = th.baddbmm
        monkeypatch.setattr(th, "baddbmm", lambda *args: calls.append(args[1].shape) or original(*args))
        for shape, blocked_path in [((1, 12), True), ((12,), True), ((1, 1, 12), True), ((3, 12), False)]:
            calls.clear()
            got = assert_same_layer(reference, blocked, th.randn(shape, dtype=th.float64))
            assert got.shape == (*shape[:-1], 8)
            assert calls == ([(networks.ROW_BLOCKS, 2, 12)] if blocked_path else [])  # 4 blocks of 2 output rows
            reference.zero_grad(), blocked.zero_grad()
        no_bias = networks.BlockedLinear(12, 8, bias=False).double()
        x = th.randn(1, 12, dtype=th.float64)
        th.testing.assert_close(no_bias(x), x @ no_bias.weight.t())
        with pytest.raises(ValueError, match="divisible by 4"):
            networks.BlockedLinear(12, 6)

    def test_dense_layer_blocks_only_weights_beyond_the_cache(self):
        assert type(networks.dense_layer(1024, 512)) is networks.BlockedLinear  # 2**19 weights
        assert type(networks.dense_layer(1024, 511)) is th.nn.Linear  # rows not divisible into blocks
        assert type(networks.dense_layer(400, 400)) is th.nn.Linear  # fits in the cache: the plain layer is faster
        atari = RSSM(action_dim=6, embed_dim=1536, deter_size=600, hidden_size=600, stoch_size=32, classes=32)
        assert type(atari.cell.linear) is networks.BlockedLinear and type(atari.obs_out[0]) is networks.BlockedLinear
        small = RSSM(action_dim=6, embed_dim=64, deter_size=200, hidden_size=200, stoch_size=32, classes=32)
        assert type(small.cell.linear) is th.nn.Linear

    def test_small_batches_use_the_native_cpu_convolution_with_the_same_result(self, monkeypatch):
        th.manual_seed(0)
        encoder = ConvEncoder((1, 64, 64), depth=8)
        images = th.rand(3, 1, 64, 64) - 0.5
        calls = []
        original = networks.native_cpu_conv

        def spy():
            calls.append(th.backends.mkldnn.enabled)
            return original()

        monkeypatch.setattr(networks, "native_cpu_conv", spy)
        with th.no_grad():
            batched = encoder(images)  # 3 > NATIVE_CONV_MAX_BATCH: oneDNN
            assert calls == []
            singles = th.cat([encoder(images[i : i + 1]) for i in range(3)])
        assert len(calls) == 3 and networks.NATIVE_CONV_MAX_BATCH == 2
        th.testing.assert_close(singles, batched, rtol=1e-5, atol=1e-5)

        enabled = th.backends.mkldnn.enabled
        with pytest.raises(RuntimeError, match="boom"), networks.native_cpu_conv():
            assert th.backends.mkldnn.enabled is False
            raise RuntimeError("boom")
        assert th.backends.mkldnn.enabled == enabled  # restored, even after an error

    def test_paper_atari_encoder_layout(self):
        encoder = ConvEncoder((1, 64, 64), depth=48)
        assert [m.out_channels for m in encoder.net if isinstance(m, th.nn.Conv2d)] == [48, 96, 192, 384]
        assert encoder.out_shape == (384, 2, 2)

    def test_paper_atari_decoder_layout(self):
        encoder = MultiEncoder(spaces.Box(0, 255, (1, 64, 64), np.uint8), cnn_depth=48, mlp_layers=1, mlp_units=8)
        decoder = MultiDecoder(1624, encoder, mlp_layers=1, mlp_units=8).cnns["obs"]
        deconvs = [m for m in decoder.net if isinstance(m, th.nn.ConvTranspose2d)]
        assert decoder.linear.out_features == 32 * 48
        assert [m.kernel_size[0] for m in deconvs] == [5, 5, 6, 6]
        assert [m.out_channels for m in deconvs] == [192, 96, 48, 1]

    def test_channel_last_bool_grid_is_moved_to_channel_first(self):
        space = spaces.Box(0, 1, (10, 10, 4), bool)
        encoder = MultiEncoder(space, cnn_depth=4, mlp_layers=1, mlp_units=8)
        obs = th.zeros(1, 10, 10, 4, dtype=th.bool)
        obs[0, 2, 3, 1] = True
        grid = encoder.preprocess(obs)["obs"]
        assert grid.shape == (1, 4, 10, 10)
        assert grid[0, 1, 2, 3] == 0.5 and grid[0, 0, 2, 3] == -0.5

    def test_dict_observations_mix_cnn_and_mlp(self):
        space = spaces.Dict({"image": spaces.Box(0, 255, (3, 16, 16), np.uint8), "vec": spaces.Box(-1, 1, (5,))})
        encoder = MultiEncoder(space, cnn_depth=4, mlp_layers=2, mlp_units=8)
        assert encoder.cnn_keys == ["image"] and encoder.mlp_keys == ["vec"]
        decoder = MultiDecoder(10, encoder, mlp_layers=1, mlp_units=8)
        out = decoder(th.randn(4, 10))
        assert out["image"].shape == (4, 3, 16, 16) and out["vec"].shape == (4, 5)

    @pytest.mark.parametrize("space", [spaces.Box(0, 1, (2, 3, 4, 5)), spaces.Box(0, 255, (2, 2, 3), np.uint8)])
    def test_unsupported_observation_shapes_raise(self, space):
        with pytest.raises(ValueError):
            MultiEncoder(space, cnn_depth=4, mlp_layers=1, mlp_units=8)


class TestActionCodec:
    def test_discrete_round_trip(self):
        codec = ActionCodec(spaces.Discrete(4))
        model = codec.buffer_to_model(th.tensor([[2.0], [0.0]]))
        assert model.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
        assert codec.model_to_buffer(model).tolist() == [[2], [0]]
        assert codec.buffer_to_env(np.array([[2], [0]])).tolist() == [2, 0]

    def test_multidiscrete_round_trip(self):
        codec = ActionCodec(spaces.MultiDiscrete([2, 3]))
        model = codec.buffer_to_model(th.tensor([[1.0, 2.0]]))
        assert model.tolist() == [[0, 1, 0, 0, 1]]
        assert codec.model_to_buffer(model).tolist() == [[1, 2]]
        dist = codec.distribution(th.zeros(1, 5))
        assert dist.entropy().item() == pytest.approx(np.log(2) + np.log(3))

    def test_box_scaling(self):
        codec = ActionCodec(spaces.Box(np.array([0.0, -2.0]), np.array([1.0, 2.0])))
        assert codec.buffer_to_env(np.array([[-1.0, 0.5]])).tolist() == [[0.0, 1.0]]
        assert codec.env_to_buffer(np.array([[1.0, -2.0]])).tolist() == [[1.0, -1.0]]

    def test_discrete_noise_replaces_a_share_of_actions_uniformly(self):
        codec = ActionCodec(spaces.MultiDiscrete([3, 4]))
        chosen = codec.buffer_to_model(th.tensor([[2.0, 0.0]])).repeat(40000, 1)  # always action (2, 0)
        assert codec.add_noise(chosen, 0.0) is chosen
        th.manual_seed(0)
        noisy = codec.add_noise(chosen, 0.4)
        index = th.as_tensor(codec.model_to_buffer(noisy))  # [N, 2]
        assert (noisy.sum(-1) == 2).all() and ((noisy == 0) | (noisy == 1)).all()  # still one one-hot per block
        # P(a != chosen) = ε (n - 1) / n in each block, independently; a replaced action is uniform over all n.
        assert (index[:, 0] != 2).float().mean().item() == pytest.approx(0.4 * 2 / 3, abs=0.01)
        assert (index[:, 1] != 0).float().mean().item() == pytest.approx(0.4 * 3 / 4, abs=0.01)
        both = ((index[:, 0] != 2) & (index[:, 1] != 0)).float().mean().item()
        assert both == pytest.approx(0.4 * 2 / 3 * 0.4 * 3 / 4, abs=0.01)
        counts = th.bincount(th.as_tensor(codec.model_to_buffer(codec.add_noise(chosen, 1.0))[:, 1]), minlength=4)
        assert (counts.float() / 40000 - 0.25).abs().max().item() < 0.01

    def test_continuous_noise_is_gaussian_and_clipped(self):
        codec = ActionCodec(spaces.Box(-2.0, 2.0, (2,)))
        th.manual_seed(0)
        actions = th.tensor([[0.0, 0.95]]).repeat(40000, 1)
        noisy = codec.add_noise(actions, 0.3)
        assert noisy.min() >= -1 and noisy.max() <= 1
        assert noisy[:, 0].std().item() == pytest.approx(0.3, abs=0.01)
        assert (noisy[:, 1] == 1.0).float().mean().item() == pytest.approx(0.43, abs=0.01)  # P(N(0.95, 0.3) > 1)

    @pytest.mark.parametrize("space", [spaces.MultiBinary(3), spaces.Box(-np.inf, np.inf, (2,)), spaces.Box(-1, 1, (2, 2))])
    def test_unsupported_action_spaces_raise(self, space):
        with pytest.raises(ValueError):
            ActionCodec(space)


def test_argmax_onehot_matches_torch_one_hot_including_ties():
    logits = th.tensor([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0], [-1.0, -2.0, -3.0, -0.5]], dtype=th.float64)
    got = argmax_onehot(logits)
    assert got.dtype == th.float64
    th.testing.assert_close(got, th.nn.functional.one_hot(logits.argmax(-1), 4).double(), rtol=0, atol=0)
    assert got[0].tolist() == [0.0, 1.0, 0.0, 0.0]  # a tie goes to the first maximum, as argmax
    th.manual_seed(0)
    grid = th.randn(16, 32, 32, requires_grad=True)
    sample = straight_through_onehot(grid)
    hot = sample.detach() > 0.5
    assert (hot.sum(-1) == 1).all()  # one hot per variable (+ probs - sg(probs): equal up to rounding)
    th.testing.assert_close(sample.detach(), hot.float())


class TestTruncatedNormal:
    def test_samples_stay_in_bounds_and_match_log_prob(self):
        th.manual_seed(0)
        dist = TruncatedNormalActions(th.full((20000, 1), 0.8), th.full((20000, 1), 0.5))
        samples = dist.rsample()
        assert samples.min() >= -1 and samples.max() <= 1
        # the density integrates to one over [-1, 1]
        grid = th.linspace(-1, 1, 2001).unsqueeze(-1)
        density = TruncatedNormalActions(th.full((2001, 1), 0.8), th.full((2001, 1), 0.5)).log_prob(grid).exp()
        assert th.trapezoid(density, grid.squeeze(-1)).item() == pytest.approx(1.0, abs=1e-3)
        # the entropy matches a Monte-Carlo estimate
        assert dist.entropy()[0].item() == pytest.approx(-dist.log_prob(samples).mean().item(), abs=0.02)

    def test_rsample_is_differentiable(self):
        mean = th.zeros(3, 2, requires_grad=True)
        TruncatedNormalActions(mean, th.ones(3, 2)).rsample().sum().backward()
        assert mean.grad is not None and th.all(mean.grad > 0)
