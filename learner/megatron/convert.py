"""Hugging Face <-> Megatron-core checkpoint layouts, as pure torch functions on state dicts.

No megatron import: this module runs in CI. Conversions only reshape, concatenate, split and rename,
so a round trip is bit-exact in any dtype.

Megatron-core ``GPTModel`` with the Transformer Engine layer spec names (per layer ``i``):

================================================  ============================================
Megatron-core                                     Hugging Face (Qwen2/Qwen3, dense and MoE)
================================================  ============================================
embedding.word_embeddings.weight                  model.embed_tokens.weight
decoder.layers.i.self_attention.linear_qkv        q_proj, k_proj, v_proj (weight and bias),
  .weight / .bias                                 fused per query group: [q(g) k(g) v(g)] * G
  .layer_norm_weight                              input_layernorm.weight (fused into TE linear)
decoder.layers.i.self_attention.q_layernorm       self_attn.q_norm.weight (Qwen3)
decoder.layers.i.self_attention.k_layernorm       self_attn.k_norm.weight (Qwen3)
decoder.layers.i.self_attention.linear_proj       self_attn.o_proj.weight
dense: decoder.layers.i.mlp.linear_fc1.weight     [gate_proj; up_proj] (fused gate/up)
       decoder.layers.i.mlp.linear_fc1            post_attention_layernorm.weight
         .layer_norm_weight
       decoder.layers.i.mlp.linear_fc2.weight     mlp.down_proj.weight
MoE:   decoder.layers.i.pre_mlp_layernorm.weight  post_attention_layernorm.weight
       decoder.layers.i.mlp.router.weight         mlp.gate.weight
       ...mlp.experts.linear_fc1.weight{e}        mlp.experts.{e}.[gate_proj; up_proj]
       ...mlp.experts.linear_fc2.weight{e}        mlp.experts.{e}.down_proj.weight
       ...mlp.shared_experts.linear_fc1.weight    mlp.shared_expert.[gate_proj; up_proj]
       ...mlp.shared_experts.linear_fc2.weight    mlp.shared_expert.down_proj.weight
       ...mlp.shared_experts.gate_weight          mlp.shared_expert_gate.weight
decoder.final_layernorm.weight                    model.norm.weight
output_layer.weight                               lm_head.weight (absent when tied)
================================================  ============================================

Experts use the grouped-GEMM names (``TEGroupedMLP``: ``linear_fc1.weight{e}``); with
``grouped_gemm=False`` the sequential names ``mlp.experts.local_experts.{e}.linear_fc1.weight`` are
used instead. Names are those of the *unsharded* model (TP = PP = EP = 1); :func:`shard` and
:func:`unshard` move between it and one rank's local state dict.

Hugging Face names are those of the saved checkpoint (``save_pretrained`` writes one tensor per
expert; vLLM's loaders take the same names).

>>> import torch
>>> from learner.megatron.spec import ModelSpec
>>> spec = ModelSpec.from_hf_config({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 4,
...     "intermediate_size": 6, "num_hidden_layers": 1, "num_attention_heads": 2,
...     "num_key_value_heads": 1})
>>> hf = random_hf_state_dict(spec)
>>> back = mcore_to_hf(hf_to_mcore(hf, spec), spec)
>>> sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
True
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import torch

from learner.megatron.spec import ModelSpec

_L = "decoder.layers."
_HL = "model.layers."


# ---------------------------------------------------------------------------------------------
# fused tensors
# ---------------------------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """``q [nq*d, ...]``, ``k, v [ng*d, ...]`` -> Megatron's ``[ng * (nq/ng + 2) * d, ...]``.

    Megatron groups the fused projection by key/value head: for each group the ``nq/ng`` query
    heads, then its key head, then its value head. Works for weights (``[*, H]``) and biases.
    """
    ng, d = spec.num_kv_heads, spec.head_dim
    per = spec.num_heads // ng
    rest = q.shape[1:]
    qg = q.reshape(ng, per * d, *rest)
    kg = k.reshape(ng, d, *rest)
    vg = v.reshape(ng, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(ng * (per + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` (also on one TP rank's slice when ``spec`` is that rank's)."""
    ng, d = spec.num_kv_heads, spec.head_dim
    per = spec.num_heads // ng
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (per + 2) * d, *rest)
    q, k, v = torch.split(g, [per * d, d, d], dim=1)
    return (q.reshape(ng * per * d, *rest).contiguous(), k.reshape(ng * d, *rest).contiguous(),
            v.reshape(ng * d, *rest).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[F, H]`` twice -> ``[2F, H]`` (gate rows first, as Megatron's SwiGLU ``linear_fc1``)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


# ---------------------------------------------------------------------------------------------
# whole state dicts
# ---------------------------------------------------------------------------------------------
def _expert_fc(i: int, e: int, which: str, grouped: bool) -> str:
    if grouped:
        return f"{_L}{i}.mlp.experts.linear_{which}.weight{e}"
    return f"{_L}{i}.mlp.experts.local_experts.{e}.linear_{which}.weight"


def hf_to_mcore(hf: Mapping[str, torch.Tensor], spec: ModelSpec, grouped_gemm: bool = True
                ) -> dict[str, torch.Tensor]:
    """Unsharded Megatron-core state dict from a Hugging Face one (both complete)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"Hugging Face checkpoint lacks {name!r} (is it a {spec.family} model?)")
        used.add(name)
        return hf[name]

    out["embedding.word_embeddings.weight"] = take("model.embed_tokens.weight")
    for i in range(spec.num_layers):
        h, m = f"{_HL}{i}.", f"{_L}{i}."
        a = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight"), spec)
        if spec.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias"), spec)
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = take(h + "input_layernorm.weight")
        if spec.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = take(a + "q_norm.weight")
            out[m + "self_attention.k_layernorm.weight"] = take(a + "k_norm.weight")
        out[m + "self_attention.linear_proj.weight"] = take(a + "o_proj.weight")
        if not spec.is_moe:
            out[m + "mlp.linear_fc1.weight"] = fuse_gate_up(take(h + "mlp.gate_proj.weight"),
                                                            take(h + "mlp.up_proj.weight"))
            out[m + "mlp.linear_fc1.layer_norm_weight"] = take(h + "post_attention_layernorm.weight")
            out[m + "mlp.linear_fc2.weight"] = take(h + "mlp.down_proj.weight")
            continue
        out[m + "pre_mlp_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
        out[m + "mlp.router.weight"] = take(h + "mlp.gate.weight")
        for e in range(spec.num_experts):
            x = f"{h}mlp.experts.{e}."
            out[_expert_fc(i, e, "fc1", grouped_gemm)] = fuse_gate_up(
                take(x + "gate_proj.weight"), take(x + "up_proj.weight"))
            out[_expert_fc(i, e, "fc2", grouped_gemm)] = take(x + "down_proj.weight")
        if spec.shared_expert_size:
            s = h + "mlp.shared_expert."
            out[m + "mlp.shared_experts.linear_fc1.weight"] = fuse_gate_up(
                take(s + "gate_proj.weight"), take(s + "up_proj.weight"))
            out[m + "mlp.shared_experts.linear_fc2.weight"] = take(s + "down_proj.weight")
            out[m + "mlp.shared_experts.gate_weight"] = take(h + "mlp.shared_expert_gate.weight")
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if not spec.tie_embeddings:
        out["output_layer.weight"] = take("lm_head.weight")
    left = sorted(k for k in hf if k not in used and not _ignorable_hf(k, spec))
    if left:
        raise KeyError(f"Hugging Face tensors with no Megatron counterpart: {left[:8]}"
                       f"{' …' if len(left) > 8 else ''}")
    return out


def _ignorable_hf(name: str, spec: ModelSpec) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (spec.tie_embeddings and name == "lm_head.weight")


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_G = re.compile(r"^mlp\.experts\.linear_(fc1|fc2)\.weight(\d+)$")
_EXPERT_S = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_(fc1|fc2)\.weight$")

_SIMPLE_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}
_SIMPLE_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
# Megatron-only state that has no Hugging Face counterpart.
_SKIP_SUFFIXES = ("_extra_state", "mlp.router.expert_bias", "local_tokens_per_expert",
                  "global_tokens_per_expert", "ga_steps", "qb_beta", "qb_beta_accum", "qb_beta_count")


def is_mcore_only(name: str) -> bool:
    """Megatron state that is not a weight of the Hugging Face model (TE extra state, router bias)."""
    return any(name.endswith(s) for s in _SKIP_SUFFIXES)


def mcore_tensor_to_hf(name: str, t: torch.Tensor, spec: ModelSpec
                       ) -> list[tuple[str, torch.Tensor]]:
    """One unsharded Megatron tensor -> its Hugging Face tensor(s) (splits fused QKV and gate/up).

    Returns ``[]`` for Megatron-only state (:func:`is_mcore_only`).
    """
    if is_mcore_only(name):
        return []
    if name in _SIMPLE_TOP:
        return [(_SIMPLE_TOP[name], t)]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"unknown Megatron tensor {name!r}")
    i, rest = m.group(1), m.group(2)
    h = f"{_HL}{i}."
    if rest in _SIMPLE_LAYER:
        return [(h + _SIMPLE_LAYER[rest], t)]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = split_qkv(t, spec)
        a = h + "self_attn."
        return [(f"{a}q_proj.{kind}", q), (f"{a}k_proj.{kind}", k), (f"{a}v_proj.{kind}", v)]
    if rest == "mlp.linear_fc1.weight":
        g, u = split_gate_up(t)
        return [(h + "mlp.gate_proj.weight", g), (h + "mlp.up_proj.weight", u)]
    if rest == "mlp.shared_experts.linear_fc1.weight":
        g, u = split_gate_up(t)
        return [(h + "mlp.shared_expert.gate_proj.weight", g),
                (h + "mlp.shared_expert.up_proj.weight", u)]
    em = _EXPERT_G.match(rest)
    if em:
        which, e = em.group(1), em.group(2)
    else:
        em = _EXPERT_S.match(rest)
        if not em:
            raise KeyError(f"unknown Megatron tensor {name!r}")
        e, which = em.group(1), em.group(2)
    x = f"{h}mlp.experts.{e}."
    if which == "fc1":
        g, u = split_gate_up(t)
        return [(x + "gate_proj.weight", g), (x + "up_proj.weight", u)]
    return [(x + "down_proj.weight", t)]


def mcore_to_hf_iter(named: Iterable[tuple[str, torch.Tensor]], spec: ModelSpec
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream version of :func:`mcore_to_hf`: converts tensor by tensor, holding none back."""
    for name, t in named:
        yield from mcore_tensor_to_hf(name, t, spec)


def mcore_to_hf(mc: Mapping[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Hugging Face state dict from an unsharded Megatron-core one."""
    return dict(mcore_to_hf_iter(mc.items(), spec))


def hf_name_map(spec: ModelSpec, grouped_gemm: bool = True) -> dict[str, list[str]]:
    """Megatron name -> the Hugging Face names it is made of (for docs, checks and debugging)."""
    fake = random_hf_state_dict(spec, dtype=torch.float32, meta=True)
    mc = hf_to_mcore(fake, spec, grouped_gemm)
    return {k: [n for n, _ in mcore_tensor_to_hf(k, v, spec)] for k, v in mc.items()}


# ---------------------------------------------------------------------------------------------
# sharding across tensor / expert / pipeline parallel ranks
# ---------------------------------------------------------------------------------------------
def _tp_dim(rest: str) -> int | None:
    """Dimension a (layer-relative or top-level) Megatron weight is split on across TP ranks."""
    if rest.endswith(("layer_norm_weight", "layernorm.weight", "router.weight", "gate_weight",
                      "expert_bias")) or ".experts." in f".{rest}":
        return None  # replicated; experts are not tensor-parallel (expert TP size 1)
    if rest.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
                      "word_embeddings.weight", "output_layer.weight")):
        return 0
    if rest.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def _is_gate_up(rest: str) -> bool:
    return rest.endswith("linear_fc1.weight")


def _split_tp(name: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    d = _tp_dim(name)
    if d is None or tp == 1:
        return t
    if _is_gate_up(name):  # each rank holds [gate_r; up_r]
        g, u = split_gate_up(t)
        return torch.cat([g.chunk(tp, 0)[rank], u.chunk(tp, 0)[rank]], 0).contiguous()
    # QKV is grouped by kv head, so contiguous chunks are whole groups (num_kv_heads % tp == 0).
    return t.chunk(tp, d)[rank].contiguous()


def merge_tp(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of the TP split of ``name``: one tensor from every TP rank's slice, in rank order."""
    d = _tp_dim(name)
    if d is None or len(parts) == 1:
        return parts[0]
    if _is_gate_up(name):
        gs, us = zip(*(split_gate_up(p) for p in parts))
        return torch.cat([*gs, *us], 0)
    return torch.cat(parts, d)


def tp_split_dim(name: str) -> int | None:
    """Public: the dim along which ``name`` is sharded across TP ranks (None = replicated)."""
    return _tp_dim(name)


def _expert_index(rest: str) -> tuple[int, str] | None:
    em = _EXPERT_G.match(rest)
    if em:
        return int(em.group(2)), f"mlp.experts.linear_{em.group(1)}.weight{{}}"
    em = _EXPERT_S.match(rest)
    if em:
        return int(em.group(1)), "mlp.experts.local_experts.{}.linear_" + em.group(2) + ".weight"
    return None


def shard(mc: Mapping[str, torch.Tensor], spec: ModelSpec, tp: int = 1, tp_rank: int = 0,
          pp: int = 1, pp_rank: int = 0, ep: int = 1, ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """One rank's local Megatron-core state dict from the unsharded one.

    Pipeline stage ``pp_rank`` keeps layers ``[pp_rank*n, (pp_rank+1)*n)`` renumbered from 0 (and the
    embedding on the first stage, final norm and output layer on the last); expert rank ``ep_rank``
    keeps experts ``[ep_rank*k, (ep_rank+1)*k)`` renumbered from 0; TP splits as Megatron does.
    """
    per_stage = spec.num_layers // pp
    per_ep = spec.num_experts // ep if spec.is_moe else 0
    out: dict[str, torch.Tensor] = {}
    for name, t in mc.items():
        m = _LAYER.match(name)
        if m is None:
            first, last = pp_rank == 0, pp_rank == pp - 1
            if (name.startswith("embedding.") and not first) or \
               (name.startswith(("decoder.final_layernorm", "output_layer")) and not last):
                continue
            out[name] = _split_tp(name, t, tp, tp_rank)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if not pp_rank * per_stage <= i < (pp_rank + 1) * per_stage:
            continue
        li = i - pp_rank * per_stage
        ex = _expert_index(rest)
        if ex is not None:
            e, pattern = ex
            if not ep_rank * per_ep <= e < (ep_rank + 1) * per_ep:
                continue
            rest = pattern.format(e - ep_rank * per_ep)
        out[f"{_L}{li}.{rest}"] = _split_tp(rest, t, tp, tp_rank)
    return out


def global_name(local: str, spec: ModelSpec, pp: int = 1, pp_rank: int = 0, ep: int = 1,
                ep_rank: int = 0) -> str:
    """Unsharded name of a rank-local Megatron name (inverse renumbering of :func:`shard`)."""
    m = _LAYER.match(local)
    if m is None:
        return local
    i = int(m.group(1)) + pp_rank * (spec.num_layers // pp)
    rest = m.group(2)
    ex = _expert_index(rest)
    if ex is not None:
        e, pattern = ex
        rest = pattern.format(e + ep_rank * (spec.num_experts // ep))
    return f"{_L}{i}.{rest}"


def unshard(shards: Mapping[tuple[int, int, int], Mapping[str, torch.Tensor]], spec: ModelSpec,
            tp: int = 1, pp: int = 1, ep: int = 1) -> dict[str, torch.Tensor]:
    """Unsharded state dict from local ones keyed by ``(tp_rank, pp_rank, ep_rank)``.

    Expert tensors are taken from ``tp_rank`` 0 (experts are replicated across TP here).
    """
    out: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        for ep_rank in range(ep):
            base = shards[(0, pp_rank, ep_rank)]
            for name in base:
                g = global_name(name, spec, pp, pp_rank, ep, ep_rank)
                if g in out:
                    continue
                out[g] = merge_tp(name, [shards[(r, pp_rank, ep_rank)][name] for r in range(tp)])
    return out


# ---------------------------------------------------------------------------------------------
# test helpers
# ---------------------------------------------------------------------------------------------
def random_hf_state_dict(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                         meta: bool = False) -> dict[str, torch.Tensor]:
    """A complete random Hugging Face state dict for ``spec`` (shapes as ``save_pretrained`` writes)."""
    g = torch.Generator().manual_seed(seed)
    H, d = spec.hidden_size, spec.head_dim

    def r(*shape):
        if meta:
            return torch.empty(*shape, dtype=dtype, device="meta")
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {"model.embed_tokens.weight": r(spec.vocab_size, H), "model.norm.weight": r(H)}
    if not spec.tie_embeddings:
        sd["lm_head.weight"] = r(spec.vocab_size, H)
    for i in range(spec.num_layers):
        h = f"{_HL}{i}."
        a = h + "self_attn."
        sd[a + "q_proj.weight"] = r(spec.num_heads * d, H)
        sd[a + "k_proj.weight"] = r(spec.num_kv_heads * d, H)
        sd[a + "v_proj.weight"] = r(spec.num_kv_heads * d, H)
        if spec.qkv_bias:
            sd[a + "q_proj.bias"] = r(spec.num_heads * d)
            sd[a + "k_proj.bias"] = r(spec.num_kv_heads * d)
            sd[a + "v_proj.bias"] = r(spec.num_kv_heads * d)
        if spec.qk_norm:
            sd[a + "q_norm.weight"] = r(d)
            sd[a + "k_norm.weight"] = r(d)
        sd[a + "o_proj.weight"] = r(H, spec.num_heads * d)
        sd[h + "input_layernorm.weight"] = r(H)
        sd[h + "post_attention_layernorm.weight"] = r(H)
        if not spec.is_moe:
            F = spec.ffn_hidden_size
            sd[h + "mlp.gate_proj.weight"] = r(F, H)
            sd[h + "mlp.up_proj.weight"] = r(F, H)
            sd[h + "mlp.down_proj.weight"] = r(H, F)
            continue
        sd[h + "mlp.gate.weight"] = r(spec.num_experts, H)
        F = spec.moe_ffn_hidden_size
        for e in range(spec.num_experts):
            x = f"{h}mlp.experts.{e}."
            sd[x + "gate_proj.weight"] = r(F, H)
            sd[x + "up_proj.weight"] = r(F, H)
            sd[x + "down_proj.weight"] = r(H, F)
        if spec.shared_expert_size:
            S = spec.shared_expert_size
            s = h + "mlp.shared_expert."
            sd[s + "gate_proj.weight"] = r(S, H)
            sd[s + "up_proj.weight"] = r(S, H)
            sd[s + "down_proj.weight"] = r(H, S)
            sd[h + "mlp.shared_expert_gate.weight"] = r(1, H)
    return sd
