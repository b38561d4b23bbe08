"""Model-parallel helpers of the learner, run over gloo on CPU: the same code the Megatron backend
runs over NCCL (vocab-parallel entropy; every pipeline stage's weights streamed to rank 0)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learner.losses import masked_entropy, token_entropy
from learner.weight_sync import stream_stages_to_rank0
from rollout.weights import free_tcp_port
from tests.learner.test_data_parallel import close_group


def _init(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _entropy_worker(rank, world, port, out):
    _init(rank, world, port)
    logits = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0)) * 3
    mask = torch.tensor([[1, 1, 0, 0, 1]] * 3)
    part = logits.chunk(world, dim=-1)[rank]  # this rank's vocab shard
    got = token_entropy(part, dist.group.WORLD)
    mean = masked_entropy(part, mask, dist.group.WORLD)
    if rank == 0:
        torch.save({"ent": got, "mean": mean}, out)
    close_group()


def test_vocab_parallel_entropy_equals_full_vocab_entropy(tmp_path):
    logits = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits, -1)
    want = -(p * p.log()).sum(-1)
    assert torch.allclose(token_entropy(logits), want, atol=1e-5)
    out = str(tmp_path / "ent.pt")
    mp.spawn(_entropy_worker, args=(2, free_tcp_port(), out), nprocs=2)
    got = torch.load(out)
    assert torch.allclose(got["ent"], want, atol=1e-5)
    mask = torch.tensor([[1, 1, 0, 0, 1]] * 3).float()
    assert abs(got["mean"] - float((want * mask).sum() / mask.sum())) < 1e-5


def _stage_tensors(stage):
    """What each pipeline stage owns (unsharded), in the order it yields them."""
    return [(f"layers.{2 * stage + i}.w", torch.arange(8, dtype=torch.float32).view(2, 4) + 100 * stage + i)
            for i in range(2)] + ([("lm_head", torch.full((4,), 7.0, dtype=torch.bfloat16))] if stage == 1 else [])


def _stream_worker(rank, world, port, out):
    _init(rank, world, port)
    stage = rank // 2  # ranks {0,1} stage 0, {2,3} stage 1; two "tensor-parallel" ranks per stage
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = tp_groups[stage]

    def local():  # each rank holds half of every tensor and all-gathers it, as Megatron's TP does
        for name, full in _stage_tensors(stage):
            mine = full.chunk(2, dim=-1)[rank % 2].contiguous()
            parts = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(parts, mine, group=group)
            yield name, torch.cat(parts, dim=-1)

    got = [(n, t.clone()) for n, t in stream_stages_to_rank0(local(), stage, 2, sync_bytes=1)]
    torch.save(got, f"{out}.{rank}")
    close_group()


def test_every_stage_reaches_rank0_and_other_ranks_get_nothing(tmp_path):
    out = str(tmp_path / "stream")
    mp.spawn(_stream_worker, args=(4, free_tcp_port(), out), nprocs=4)
    want = _stage_tensors(0) + _stage_tensors(1)
    got = torch.load(f"{out}.0")
    assert [n for n, _ in got] == [n for n, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for r in (1, 2, 3):
        assert torch.load(f"{out}.{r}") == []


def test_one_process_streams_its_own_weights():
    named = _stage_tensors(0)
    assert list(stream_stages_to_rank0(iter(named), 0, 1)) == named


# ---- the Megatron backend's data-parallel bookkeeping (its GPU-free methods, on a bare instance) ----

class _PS:
    """parallel_state stand-in: the whole gloo world is one data-parallel group."""
    @staticmethod
    def get_data_parallel_group():
        return dist.group.WORLD


def _bare_backend(dp, micro_batch_size=2):
    from learner.config import LearnerConfig
    from learner.megatron.backend import MegatronBackend
    from learner.megatron.spec import Parallel
    be = object.__new__(MegatronBackend)  # no model: only the bookkeeping methods are exercised
    be.par, be.ps, be.version = Parallel(dp=dp), _PS(), 0
    be.cfg = LearnerConfig(micro_batch_size=micro_batch_size)
    return be


def _micro(n_rows, Lp=8):
    return [{"n": n, "mask": torch.ones(n, Lp - 1), "rollout": torch.zeros(n, Lp - 1)} for n in n_rows]


def _equalize_worker(rank, world, port, out):
    _init(rank, world, port)
    be = _bare_backend(dp=world)
    micro = be._equalize(_micro([2, 2, 1] if rank == 0 else []), 8, ["mask", "rollout"], "cpu")
    weights = be._weights(micro, "token_mean")
    res = [{"loss": 1.0 + rank, "kl": 0.5, "tokens": float(mb["mask"].sum())} if mb["n"] else
           {"tokens": 0.0} for mb in micro]
    stats = be._reduce_stats(res, weights, {"time/learner_step_s": 1.0})
    torch.save({"n": [mb["n"] for mb in micro], "weights": weights, "stats": stats}, f"{out}.{rank}")
    close_group()


def test_data_parallel_ranks_run_as_many_micro_batches_and_share_statistics(tmp_path):
    """A rank whose shard is short (here: empty) pads with empty micro-batches, so both ranks run
    the same collectives; padding weighs nothing; statistics cover both replicas."""
    out = str(tmp_path / "eq")
    mp.spawn(_equalize_worker, args=(2, free_tcp_port(), out), nprocs=2)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["n"] == [2, 2, 1] and r1["n"] == [0, 0, 0]
    assert abs(sum(r0["weights"]) - 1.0) < 1e-9 and r1["weights"] == [0.0, 0.0, 0.0]
    for r in (r0, r1):  # mean over replicas of each replica's mean; tokens summed
        assert r["stats"]["tokens"] == 5 * 7
        assert abs(r["stats"]["loss"] - (1.0 + 0.0) / 2) < 1e-9 and abs(r["stats"]["kl"] - 0.25) < 1e-9


def test_one_replica_pads_only_an_empty_shard():
    be = _bare_backend(dp=1)
    assert [mb["n"] for mb in be._equalize(_micro([2, 1]), 8, ["mask"], "cpu")] == [2, 1]
    padded = be._equalize([], 8, ["mask", "rollout"], "cpu")
    assert [mb["n"] for mb in padded] == [0] and padded[0]["mask"].shape == (0, 7)
    assert be._weights(padded, "seq_mean_token_mean") == [0.0]
