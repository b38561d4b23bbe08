"""Megatron-core MoE learner backend with FP8 through Transformer Engine (GPU only).

Modules, from the bottom up:

- :mod:`learner.megatron.spec`     model shape read from a Hugging Face config; config validation.
- :mod:`learner.megatron.convert`  HF <-> Megatron-core state dicts and TP/PP/EP sharding (pure torch).
- :mod:`learner.megatron.backend`  :class:`MegatronBackend`, the :class:`learner.backend.LearnerBackend`
  on Megatron-core (imports megatron.core and transformer_engine lazily, on construction).
- :mod:`learner.megatron.weight_stream`  bucketed weight streaming into vLLM engines through vLLM's
  native weight-transfer API (CUDA IPC on a shared GPU, NCCL across GPUs).

Importing this package imports neither megatron nor transformer_engine, so CPU CI can test the
conversion code.
"""
