"""Data parallel over gloo gives the same update as one process on the whole batch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learner.batch import collate
from learner.config import LearnerConfig, LossConfig
from rollout.tiny import create_tiny_model
from rollout.weights import free_tcp_port


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[5 + i, 6, 7] for i in range(6)]
    responses = [list(torch.randint(3, 90, (2 + i % 3,), generator=g).tolist()) for i in range(6)]
    lps = [[-1.0 - 0.1 * j for j in range(len(r))] for r in responses]
    return collate(prompts, responses, lps, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0], 0)


def _cfg(aggregation):
    return LearnerConfig(lr=1e-2, grad_clip=1e9, micro_batch_size=2, loss=LossConfig(aggregation=aggregation,
                                                                      old_logprobs="learner"))


def close_group():
    """End a gloo worker: every rank tears down together. A rank that destroyed its group and
    exited while its peer was still writing its result once aborted that peer in gloo ("terminate
    called without an active exception", SIGABRT; seen once in a full suite run)."""
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank, world, port, path, aggregation, out):
    from learner.torch_backend import TorchBackend
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = TorchBackend(path, _cfg(aggregation), 1.0)
    b.opt = torch.optim.SGD(b.model.parameters(), lr=1.0)  # update = -grad: sensitive to its scale
    b.train_grpo(_batch().shard(rank, world))
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in b.model.named_parameters()}, out)
    close_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    from learner.torch_backend import TorchBackend
    path = create_tiny_model(str(tmp_path / "m"), layers=1, hidden=64, heads=2, kv_heads=1,
                             intermediate=128)
    for aggregation in ("token_mean", "seq_mean_token_mean"):
        single = TorchBackend(path, _cfg(aggregation), 1.0)
        single.opt = torch.optim.SGD(single.model.parameters(), lr=1.0)
        before = {n: p.detach().clone() for n, p in single.model.named_parameters()}
        single.train_grpo(_batch())
        out = str(tmp_path / f"dp-{aggregation}.pt")
        mp.spawn(_worker, args=(2, free_tcp_port(), path, aggregation, out), nprocs=2)
        dp = torch.load(out)
        moved = max((before[n] - p).abs().max().item() for n, p in single.model.named_parameters())
        diff = max((dp[n] - p.detach()).abs().max().item() for n, p in single.model.named_parameters())
        assert moved > 1e-3          # the update did something
        assert diff < 1e-5, aggregation  # and both ways agree


def _uneven_worker(rank, world, port, path, n, out):
    import datetime

    from learner.torch_backend import TorchBackend
    # a collective that one rank never joins fails after 60 s instead of hanging the test
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    cfg = LearnerConfig(lr=1e-2, micro_batch_size=2, mini_batches=2,
                        loss=LossConfig(old_logprobs="learner"))
    b = TorchBackend(path, cfg, 1.0)
    full = _batch().slice(0, n)
    b.train_grpo(full.shard(rank, world))
    if rank == 0:
        torch.save({nm: p.detach().clone() for nm, p in b.model.named_parameters()}, out)
    close_group()


def test_uneven_and_empty_shards_take_the_same_steps(tmp_path):
    """3 samples on 2 ranks (shards of 2 and 1, with 2 mini-batches) and 1 sample (an empty
    shard): every rank takes the same optimizer steps, so no collective waits forever."""
    path = create_tiny_model(str(tmp_path / "m"), layers=1, hidden=64, heads=2, kv_heads=1,
                             intermediate=128)
    for n in (3, 1):
        out = str(tmp_path / f"uneven-{n}.pt")
        mp.spawn(_uneven_worker, args=(2, free_tcp_port(), path, n, out), nprocs=2)
        assert torch.load(out)
