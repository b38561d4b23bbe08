"""CPU tests of the Megatron backend's pure parts: HF <-> Megatron conversion, sharding, names, config.

No megatron-core, Transformer Engine or GPU needed.
"""
import pytest
import torch

from learner.config import LearnerConfig, MegatronConfig
from learner.megatron import convert as C
from learner.megatron.spec import ModelSpec, validate

BASE = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
SPECS = {
    "qwen2": {**BASE, "model_type": "qwen2"},
    "qwen3": {**BASE, "model_type": "qwen3", "head_dim": 8, "tie_word_embeddings": True},
    "qwen2_moe": {**BASE, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12},
    "qwen3_moe": {**BASE, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 8, "norm_topk_prob": True, "head_dim": 8},
}


def spec_of(name):
    return ModelSpec.from_hf_config(SPECS[name])


@pytest.mark.parametrize("family", list(SPECS))
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_exact(family, grouped, dtype):
    spec = spec_of(family)
    hf = C.random_hf_state_dict(spec, dtype=dtype, seed=1)
    mc = C.hf_to_mcore(hf, spec, grouped_gemm=grouped)
    back = C.mcore_to_hf(mc, spec)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert back[k].dtype == hf[k].dtype and torch.equal(back[k], hf[k]), k
    # and the other way: mcore -> hf -> mcore
    again = C.hf_to_mcore(back, spec, grouped_gemm=grouped)
    assert sorted(again) == sorted(mc) and all(torch.equal(again[k], mc[k]) for k in mc)


def test_qkv_layout_is_grouped_by_kv_head():
    """Hand-built: 4 query heads, 2 kv heads, head_dim 1 -> [q0 q1 k0 v0 | q2 q3 k1 v1]."""
    spec = ModelSpec.from_hf_config({**BASE, "model_type": "qwen2", "hidden_size": 4,
                                     "head_dim": 1})
    q = torch.tensor([[0.], [1.], [2.], [3.]])
    k = torch.tensor([[10.], [11.]])
    v = torch.tensor([[20.], [21.]])
    fused = C.fuse_qkv(q, k, v, spec)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(C.split_qkv(fused, spec), (q, k, v)))


def test_fc1_is_gate_then_up():
    g, u = torch.zeros(3, 2), torch.ones(3, 2)
    fc1 = C.fuse_gate_up(g, u)
    assert fc1[:3].eq(0).all() and fc1[3:].eq(1).all()


def test_moe_names():
    spec = spec_of("qwen2_moe")
    names = C.hf_name_map(spec)
    assert names["decoder.layers.1.mlp.experts.linear_fc1.weight3"] == [
        "model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight"]
    assert names["decoder.layers.0.mlp.router.weight"] == ["model.layers.0.mlp.gate.weight"]
    assert names["decoder.layers.0.pre_mlp_layernorm.weight"] == [
        "model.layers.0.post_attention_layernorm.weight"]
    assert names["decoder.layers.0.mlp.shared_experts.gate_weight"] == [
        "model.layers.0.mlp.shared_expert_gate.weight"]
    assert names["decoder.layers.0.self_attention.linear_qkv.bias"] == [
        f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"]
    # every HF tensor is covered exactly once
    flat = [n for ns in names.values() for n in ns]
    assert sorted(flat) == sorted(C.random_hf_state_dict(spec, meta=True))


def test_tied_and_qk_norm_names():
    spec = spec_of("qwen3")
    names = C.hf_name_map(spec)
    assert "output_layer.weight" not in names
    assert names["decoder.layers.0.self_attention.q_layernorm.weight"] == [
        "model.layers.0.self_attn.q_norm.weight"]
    assert names["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] == [
        "model.layers.0.post_attention_layernorm.weight"]


def test_megatron_only_state_is_skipped():
    spec = spec_of("qwen3_moe")
    extra = {"decoder.layers.0.mlp.router.expert_bias": torch.zeros(4),
             "decoder.layers.0.self_attention.linear_qkv._extra_state": torch.zeros(1)}
    assert C.mcore_to_hf(extra, spec) == {}


def test_missing_and_unknown_hf_tensors_raise():
    spec = spec_of("qwen2")
    hf = C.random_hf_state_dict(spec)
    bad = dict(hf)
    del bad["model.layers.0.self_attn.q_proj.bias"]
    with pytest.raises(KeyError, match="q_proj.bias"):
        C.hf_to_mcore(bad, spec)
    with pytest.raises(KeyError, match="no Megatron counterpart"):
        C.hf_to_mcore({**hf, "model.layers.0.foo.weight": torch.zeros(1)}, spec)
    with pytest.raises(KeyError, match="unknown Megatron tensor"):
        C.mcore_tensor_to_hf("decoder.layers.0.bogus.weight", torch.zeros(1), spec)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (2, 1, 4)])
def test_shard_unshard_round_trip(family, tp, pp, ep):
    spec = spec_of(family)
    if not spec.is_moe and ep > 1:
        pytest.skip("dense model")
    mc = C.hf_to_mcore(C.random_hf_state_dict(spec, dtype=torch.float32), spec)
    shards = {(t, p, e): C.shard(mc, spec, tp, t, pp, p, ep, e)
              for t in range(tp) for p in range(pp) for e in range(ep)}
    # local shapes are what a TP rank's Megatron module holds
    local = shards[(0, 0, 0)]
    qkv = local["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape[0] == (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim // tp
    assert local["embedding.word_embeddings.weight"].shape[0] == spec.vocab_size // tp
    if spec.is_moe:
        assert sum(".experts.linear_fc1." in k for k in local) == \
            spec.num_experts // ep * (spec.num_layers // pp)
    back = C.unshard(shards, spec, tp, pp, ep)
    assert sorted(back) == sorted(mc)
    assert all(torch.equal(back[k], mc[k]) for k in mc)


def test_tp_split_of_fc1_keeps_gate_and_up_halves():
    spec = spec_of("qwen2")
    F, H = spec.ffn_hidden_size, spec.hidden_size
    gate = torch.arange(F).float().unsqueeze(1).expand(F, H)
    up = 100 + gate
    mc = {"decoder.layers.0.mlp.linear_fc1.weight": C.fuse_gate_up(gate, up)}
    r1 = C.shard(mc, spec, tp=2, tp_rank=1)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert r1[:, 0].tolist() == list(range(F // 2, F)) + [100.0 + i for i in range(F // 2, F)]


def test_spec_reads_hf_configs():
    s = spec_of("qwen2_moe")
    assert (s.is_moe, s.num_experts, s.moe_topk, s.shared_expert_size, s.qkv_bias, s.qk_norm) == \
        (True, 4, 2, 12, True, False)
    s = spec_of("qwen3_moe")
    assert (s.norm_topk_prob, s.head_dim, s.qkv_bias, s.qk_norm) == (True, 8, False, True)
    with pytest.raises(ValueError, match="not supported"):
        ModelSpec.from_hf_config({**BASE, "model_type": "llama"})
    with pytest.raises(ValueError, match="every layer is MoE"):
        ModelSpec.from_hf_config({**SPECS["qwen2_moe"], "decoder_sparse_step": 2})


def test_spec_matches_transformers_checkpoint(tmp_path):
    """Names of a real ``save_pretrained`` Qwen2-MoE checkpoint convert and come back exactly."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    cfg = transformers.Qwen2MoeConfig(**{k: v for k, v in SPECS["qwen2_moe"].items()
                                         if k != "model_type"})
    torch.manual_seed(0)
    transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path)
    spec = ModelSpec.from_pretrained(str(tmp_path))
    hf = load_file(str(tmp_path / "model.safetensors"))
    back = C.mcore_to_hf(C.hf_to_mcore(hf, spec), spec)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("kw,msg", [
    (dict(tensor_parallel=3), "divisible"),
    (dict(tensor_parallel=0), "integer >= 1"),
    (dict(expert_parallel=3), "expert_parallel"),
    (dict(fp8="e4m3"), "fp8 must be"),
    (dict(fp8_recipe="mxfp8"), "fp8_recipe"),
    (dict(moe_router_load_balancing="sinkhorn"), "moe_router_load_balancing"),
    (dict(moe_router_topk=9), "moe_router_topk"),
    (dict(moe_aux_loss_coef=-1.0), "moe_aux_loss_coef"),
])
def test_validate_rejects_bad_configs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        validate(MegatronConfig(**kw), spec_of("qwen2_moe"), world_size=4)


def test_validate_resolves_parallel_sizes():
    p = validate(MegatronConfig(tensor_parallel=2, expert_parallel=4, fp8="hybrid"),
                 spec_of("qwen2_moe"), world_size=8)
    assert (p.tp, p.pp, p.ep, p.dp) == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="dense"):
        validate(MegatronConfig(expert_parallel=2), spec_of("qwen2"), world_size=2)
    with pytest.raises(ValueError, match="tied embeddings"):
        validate(MegatronConfig(pipeline_parallel=2), spec_of("qwen3"), world_size=2)


def test_learner_config_megatron_needs_gpu():
    with pytest.raises(ValueError, match="gpus_per_actor"):
        LearnerConfig(backend="megatron").validate()
    LearnerConfig(backend="megatron", gpus_per_actor=1).validate()
