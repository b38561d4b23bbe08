"""Which vLLM-native weight transport serves which placement (checked before the first sync)."""
from actors.weight_sync import check_placement


def test_ipc_needs_every_engine_on_the_single_learner_gpu():
    assert check_placement("vllm_ipc", {"0"}, [{"0"}, {"0"}], 1) is None
    assert "engine 1 holds ['1']" in check_placement("vllm_ipc", {"0"}, [{"0"}, {"1"}], 1)
    assert "one learner process" in check_placement("vllm_ipc", {"0"}, [{"0"}], 2)
    assert "learner on a GPU" in check_placement("vllm_ipc", set(), [{"0"}], 1)


def test_nccl_needs_disjoint_gpus():
    assert check_placement("vllm_nccl", {"0", "1"}, [{"2"}, {"3"}], 2) is None
    assert "shares GPU ['1']" in check_placement("vllm_nccl", {"0", "1"}, [{"2"}, {"1"}], 2)
    assert "on GPUs" in check_placement("vllm_nccl", {"0"}, [set()], 1)


def test_other_transports_take_any_placement():
    assert check_placement("torch_dist", set(), [set()], 1) is None
