"""Exact learner state (CPU, torch backend): N steps straight, or k steps, ``save_state``, a fresh
backend built from the same checkpoint, ``load_state`` and N-k steps, give the same weights bit for
bit and the same per-step metrics. The tiny model gets attention dropout, so training draws from
the RNG and the restored RNG states are what makes the two runs agree. Both runs share this process
and so its torch thread count: bit-exactness across thread counts is not claimed."""
import json
import os
import shutil

import pytest
import torch

from learner.batch import collate
from learner.config import LearnerConfig, LossConfig
from rollout.tiny import create_tiny_model

# (objective, batch): SFT in the middle moves the version and Adam's step count like a GRPO step
STEPS = [("grpo", 0), ("grpo", 1), ("sft", 2), ("grpo", 2), ("grpo", 0)]
K = 2  # the run is cut after this many steps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), layers=1, hidden=64, heads=2,
                             kv_heads=1, intermediate=128)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["attention_dropout"] = 0.1  # training draws from torch's RNG
    json.dump(cfg, open(cfg_file, "w"))
    return path


def _batch(i):
    g = torch.Generator().manual_seed(i)
    prompts = [[5 + j, 6, 7] for j in range(5)]
    responses = [torch.randint(3, 90, (2 + j % 3,), generator=g).tolist() for j in range(5)]
    lps = [[-1.0 - 0.1 * t for t in range(len(r))] for r in responses]
    return collate(prompts, responses, lps, [1.0, -1.0, 0.5, -0.5, 2.0], 0)


def _cfg(dtype="float32", compute="float32"):
    # a reference (kl_coef > 0), two Adam steps per GRPO batch, micro-batches of 2
    return LearnerConfig(lr=1e-2, micro_batch_size=2, mini_batches=2, dtype=dtype, compute_dtype=compute,
                         loss=LossConfig(kl_coef=0.05, old_logprobs="learner"))


def _backend(path, cfg):
    from learner.torch_backend import TorchBackend
    return TorchBackend(path, cfg, 1.0)


def _train(be, steps):
    return [getattr(be, f"train_{kind}")(_batch(i)) for kind, i in steps]


def _weights(be):
    return {n: p.detach().clone() for n, p in be.model.named_parameters()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("dtype,compute", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                           ("float32", "bfloat16")])  # the last: bf16 over fp32 masters
def test_cut_save_load_continue_equals_the_straight_run(model, tmp_path, dtype, compute):
    cfg = _cfg(dtype, compute)
    straight = _backend(model, cfg)
    want_stats = _train(straight, STEPS)
    want = _weights(straight)

    cut = _backend(model, cfg)
    assert _train(cut, STEPS[:K]) == want_stats[:K]
    state = str(tmp_path / "state")
    cut.save_state(state)
    assert sorted(os.listdir(state)) == ["meta.json", "model.safetensors", "optimizer.pt", "rank0.pt",
                                         "ref.safetensors"]
    del cut

    resumed = _backend(model, cfg)
    resumed.load_state(state)
    assert resumed.version == K
    assert _train(resumed, STEPS[K:]) == want_stats[K:]
    assert resumed.version == len(STEPS)
    _assert_same(want, _weights(resumed))
    assert next(resumed.model.parameters()).dtype == getattr(torch, dtype)

    # the control: the same restore with another RNG draw gives other weights (dropout is live)
    other = _backend(model, cfg)
    other.load_state(state)
    torch.manual_seed(1234)
    _train(other, STEPS[K:])
    assert any(not torch.equal(want[n], p) for n, p in _weights(other).items())


def test_reference_can_be_reloaded_instead_of_saved(model, tmp_path):
    """``save_ref=False`` keeps only the reference's fingerprint: a backend built from the same
    checkpoint continues exactly, one built from another checkpoint is refused."""
    cfg = _cfg()
    straight = _backend(model, cfg)
    want_stats = _train(straight, STEPS[:3])
    want = _weights(straight)
    cut = _backend(model, cfg)
    _train(cut, STEPS[:1])
    state = str(tmp_path / "state")
    cut.save_state(state, save_ref=False)
    assert not os.path.exists(os.path.join(state, "ref.safetensors"))
    resumed = _backend(model, cfg)
    resumed.load_state(state)
    assert _train(resumed, STEPS[1:3]) == want_stats[1:3]
    _assert_same(want, _weights(resumed))

    other = create_tiny_model(str(tmp_path / "other"), layers=1, hidden=64, heads=2, kv_heads=1,
                              intermediate=128, seed=1)
    with pytest.raises(ValueError, match="reference"):
        _backend(other, cfg).load_state(state)


def test_a_state_from_another_layout_is_refused(model, tmp_path):
    cfg = _cfg()
    be = _backend(model, cfg)
    state = str(tmp_path / "state")
    be.save_state(state)
    meta_file = os.path.join(state, "meta.json")
    meta = json.load(open(meta_file))
    json.dump({**meta, "world": 2}, open(meta_file, "w"))
    with pytest.raises(ValueError, match="num_actors"):
        _backend(model, cfg).load_state(state)
    json.dump({**meta, "backend": "megatron"}, open(meta_file, "w"))
    with pytest.raises(ValueError, match="megatron"):
        _backend(model, cfg).load_state(state)
    json.dump(meta, open(meta_file, "w"))
    no_ref = LearnerConfig(lr=1e-2, micro_batch_size=2)  # kl_coef 0: no reference to restore
    assert _backend(model, no_ref).ref is None
    shutil.rmtree(state)
    _backend(model, no_ref).save_state(state)
    with pytest.raises(ValueError, match="kl_coef"):
        _backend(model, cfg).load_state(state)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from learner.backend import rng_state, set_rng_state
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), random.random(), np.random.rand(), np.random.randn())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand(), np.random.randn())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def _arrow(i):
    from rollout.types import Sample, to_arrow
    b = _batch(i)
    samples = []
    for j in range(len(b)):
        ids = b.input_ids[j][b.attention_mask[j] > 0].tolist()
        resp = b.response_mask[j] > 0
        samples.append(Sample(f"p{j}", 0, "", "", ids[:3], ids[3:], b.rollout_logprobs[j][resp].tolist(),
                              0, advantage=float(b.advantages[j])))
    return to_arrow(samples)


def test_two_learner_actors_save_and_load_through_the_group(model, tmp_path):
    """Two data-parallel actors (gloo) on a local Ray: 2 steps, save_state, 2 more steps; a fresh
    group loads the state and its 2 steps give the same statistics and weights."""
    import ray

    from actors.learner import LearnerGroup
    cfg = LearnerConfig(num_actors=2, lr=1e-2, micro_batch_size=2, loss=LossConfig(kl_coef=0.05))
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"AHA_LEARNER_THREADS": "1"}})  # one thread in both groups
    try:
        group = LearnerGroup(model, cfg, 1.0, timeout_s=300)
        for i in (0, 1):
            group.train_grpo(_arrow(i))
        state = str(tmp_path / "state")
        assert group.save_state(state) == state
        want = [group.train_grpo(_arrow(i)) for i in (2, 0)]
        want_w, want_v = ray.get(group.rank0.weights_by_value.remote(), timeout=120)
        group.shutdown()
        assert sorted(os.listdir(state)) == ["meta.json", "model.safetensors", "optimizer.pt",
                                             "rank0.pt", "rank1.pt", "ref.safetensors"]
        assert json.load(open(os.path.join(state, "meta.json")))["shared"] is True

        group = LearnerGroup(model, cfg, 1.0, timeout_s=300)
        assert group.load_state(state) == 2
        got = [group.train_grpo(_arrow(i)) for i in (2, 0)]
        got_w, got_v = ray.get(group.rank0.weights_by_value.remote(), timeout=120)
        group.shutdown()
    finally:
        ray.shutdown()
    assert got == want and got_v == want_v == 4
    _assert_same(dict(want_w), dict(got_w))


# ---- the Megatron backend's save/load plumbing on CPU: a bare instance whose model, reference and
# optimizer are plain torch stand-ins (Megatron itself runs in test_state_checkpoint_gpu.py) ----

class _Tracker:
    states = {"model-parallel-rng": torch.tensor([1, 2, 3], dtype=torch.uint8)}

    def get_states(self):
        return dict(self.states)

    def set_states(self, states):
        self.states = states


class _DistOptimizer:
    """Megatron's optimizer API as the backend calls it: a state_dict without the parameter state,
    which save_parameter_state / load_parameter_state move separately."""
    def __init__(self, model):
        self.inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        self.calls = []

    def state_dict(self):
        return {"param_groups": self.inner.state_dict()["param_groups"]}

    def load_state_dict(self, sd):
        self.calls.append("load_state_dict")
        self.groups = sd["param_groups"]

    def save_parameter_state(self, file):
        torch.save(self.inner.state_dict()["state"], file)

    def load_parameter_state(self, file):
        self.calls.append("load_parameter_state")
        self.inner.load_state_dict({"state": torch.load(file), "param_groups": self.groups})


def _tiny_module(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    m.register_buffer("tokens_per_expert", torch.zeros(2), persistent=False)
    return m


def _bare_megatron(seed=0):
    from learner.megatron.backend import MegatronBackend
    from learner.megatron.spec import Parallel
    be = object.__new__(MegatronBackend)
    be.par, be.version = Parallel(), 0
    be.model, be.ref_model = _tiny_module(seed), _tiny_module(seed).requires_grad_(False)
    be.optimizer = _DistOptimizer(be.model)
    return be


def _megatron_step(be):
    loss = be.model(torch.randn(5, 4)).square().sum()
    loss.backward()
    be.optimizer.inner.step()
    be.optimizer.inner.zero_grad()
    be.model.tokens_per_expert += 1
    be.version += 1


@pytest.mark.parametrize("save_ref", [True, False])
def test_megatron_state_plumbing_on_cpu(tmp_path, monkeypatch, save_ref):
    import sys
    import types

    import torch.distributed as dist
    core = types.ModuleType("megatron.core")
    core.tensor_parallel = types.SimpleNamespace(get_cuda_rng_tracker=lambda t=_Tracker(): t)
    monkeypatch.setitem(sys.modules, "megatron", types.ModuleType("megatron"))
    monkeypatch.setitem(sys.modules, "megatron.core", core)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        straight = _bare_megatron()
        for _ in range(3):
            _megatron_step(straight)
        cut = _bare_megatron()
        _megatron_step(cut)
        state = str(tmp_path / "state")
        cut.save_state(state, save_ref=save_ref)
        saved_tracker = core.tensor_parallel.get_cuda_rng_tracker().get_states()
        core.tensor_parallel.get_cuda_rng_tracker().set_states({})
        assert sorted(os.listdir(state)) == ["meta.json", "rank0.optim_params.pt", "rank0.pt"]
        resumed = _bare_megatron()
        resumed.load_state(state)
        assert resumed.optimizer.calls == ["load_state_dict", "load_parameter_state"]
        assert core.tensor_parallel.get_cuda_rng_tracker().get_states().keys() == saved_tracker.keys()
        assert resumed.version == 1 and torch.equal(resumed.model.tokens_per_expert, torch.ones(2))
        for _ in range(2):
            _megatron_step(resumed)
        _assert_same(dict(straight.model.named_parameters()), dict(resumed.model.named_parameters()))
        if not save_ref:  # a reference other than the saved run's is refused
            with pytest.raises(ValueError, match="reference"):
                _bare_megatron(seed=1).load_state(state)
    finally:
        dist.destroy_process_group()
