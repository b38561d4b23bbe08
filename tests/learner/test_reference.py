"""``learner.reference``: the frozen KL reference in the learner, or in reference actors of its
own (``pool``), which score each request while the learner only reads the numbers. Both must
train the same: the same reference logprobs, the same KL, the same update."""
import pytest
import torch

from learner.batch import collate
from learner.config import LearnerConfig, LossConfig
from learner.reference import Reference, ReferenceSpec
from rollout.tiny import create_tiny_model
from rollout.types import Sample, from_arrow, to_arrow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), layers=2, hidden=64, heads=2,
                             kv_heads=1, intermediate=128)


def _rows():
    g = torch.Generator().manual_seed(1)
    prompts = [[5 + j // 3, 6, 7, 8][: 3 + j % 2] for j in range(9)]  # 3 groups of 3, two shapes
    responses = [torch.randint(3, 90, (2 + j % 5,), generator=g).tolist() for j in range(9)]
    return prompts, responses


def _cfg(reference, compute="float32", **kw):
    return LearnerConfig(lr=1e-2, micro_batch_size=4, compute_dtype=compute, reference=reference,
                         loss=LossConfig(kl_coef=0.5, old_logprobs="learner"), mini_batches=2, **kw)


def _backend(path, cfg):
    from learner.torch_backend import TorchBackend
    return TorchBackend(path, cfg, 0.9)


@pytest.mark.parametrize("compute", ["float32", "auto"])
def test_reference_actors_reference_gives_the_learners_numbers(model, compute):
    prompts, responses = _rows()
    cfg = _cfg("learner", compute)
    be = _backend(model, cfg)
    batch = collate(prompts, responses, None, None, 0)
    want = be.reference.logprobs(batch)
    ref = Reference(model, ReferenceSpec.of(cfg, 0.9), "cpu")
    assert ref.dtype == be.compute_dtype
    got, secs = ref.sample_logprobs(prompts, responses)
    assert secs > 0 and [len(x) for x in got] == [len(r) for r in responses]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert torch.allclose(torch.tensor(got[i]), want[i, len(p):len(p) + len(r)], atol=1e-5)
        assert all(x < 0 for x in got[i])


def test_learner_reading_the_batchs_reference_trains_like_one_that_holds_it(model):
    prompts, responses = _rows()
    adv = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3, 0.0]
    lps = [[-1.0] * len(r) for r in responses]
    torch.manual_seed(0)
    holder = _backend(model, _cfg("learner"))
    reader = _backend(model, _cfg("pool"))
    assert reader.ref is None and reader.reference is None  # no copy of the model in the learner
    ref_lp, _ = Reference(model, ReferenceSpec.of(reader.cfg, 0.9), "cpu").sample_logprobs(prompts, responses)
    a = holder.train_grpo(collate(prompts, responses, lps, adv, 0))
    b = reader.train_grpo(collate(prompts, responses, lps, adv, 0, ref_logprobs=ref_lp))
    assert a["kl"] > 0 and abs(a["kl"] - b["kl"]) < 1e-6 and abs(a["loss"] - b["loss"]) < 1e-6
    for (n, p), q in zip(holder.model.named_parameters(), reader.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    # a second step, after the weights moved: the KL now differs from 0 through the policy
    a2 = holder.train_grpo(collate(prompts, responses, lps, adv, 0))
    b2 = reader.train_grpo(collate(prompts, responses, lps, adv, 0, ref_logprobs=ref_lp))
    assert abs(a2["kl"] - b2["kl"]) < 1e-6


def test_a_batch_without_reference_logprobs_is_refused_when_the_learner_has_none(model):
    prompts, responses = _rows()
    be = _backend(model, _cfg("pool"))
    with pytest.raises(ValueError, match="no reference logprobs"):
        be.train_grpo(collate(prompts, responses, None, [1.0] * 9, 0))
    assert be.version == 0


def test_collate_checks_reference_lengths_and_slices_them():
    b = collate([[1, 2], [3]], [[4, 5], [6]], None, None, 0, ref_logprobs=[[-0.5, -0.25], [-2.0]])
    assert b.ref_logprobs.tolist() == [[0.0, 0.0, -0.5, -0.25], [0.0, -2.0, 0.0, 0.0]]
    assert b.slice(1, 2).ref_logprobs.tolist() == [[0.0, -2.0, 0.0, 0.0]]
    assert b.shard(0, 2).ref_logprobs.shape == (1, 4)
    assert collate([[1]], [[2]], None, None, 0).slice(0, 1).ref_logprobs is None
    with pytest.raises(ValueError, match="1 reference logprobs for 2 tokens"):
        collate([[1]], [[2, 3]], None, None, 0, ref_logprobs=[[-1.0]])


def test_samples_carry_reference_logprobs_through_arrow():
    s = Sample(prompt_id="p", group_index=0, prompt="", response="", prompt_ids=[1], response_ids=[2, 3],
               response_logprobs=[-1.0, -2.0], weight_version=0, ref_logprobs=[-0.5, -1.5])
    t = Sample(**{**s.__dict__, "ref_logprobs": None})
    back = from_arrow(to_arrow([s, t]))
    assert back[0].ref_logprobs == [-0.5, -1.5] and back[1].ref_logprobs is None


def test_config_checks_where_the_reference_runs():
    with pytest.raises(ValueError, match="reference must be learner or pool"):
        LearnerConfig(reference="gpu").validate()
    with pytest.raises(ValueError, match="reference=pool is for the torch backend"):
        LearnerConfig(backend="megatron", gpus_per_actor=1, reference="pool").validate()
    LearnerConfig(reference="pool").validate()
