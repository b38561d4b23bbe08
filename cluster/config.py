"""The job configuration: one typed config per component, composed here, validated once.

A job is one YAML file. ``load_config(path, overrides)`` reads it, applies ``dotted.key=value``
overrides, builds the dataclasses (an unknown key is an error that lists the known ones), and runs
every ``validate()`` before any actor starts. The resolved config is written to the run directory.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from learner.config import LearnerConfig
from rewards.config import RewardConfig
from rollout.engine import RolloutConfig

STAGE_TYPES = ("sft", "grpo")


@dataclass
class ModelConfig:
    path: str = "tiny"
    """A Hugging Face checkpoint directory, or 'tiny' for the built-in tiny Qwen2 (created on first use
    under ``<run dir>/tiny-model``)."""
    tiny: dict = field(default_factory=dict)
    """Settings of the built-in tiny model (rollout.tiny.create_tiny_model arguments)."""


@dataclass
class DataConfig:
    train: str = "arithmetic"
    """'arithmetic' (built-in synthetic task) or a .parquet/.jsonl file of {question, answer, ...}."""
    test: str = "arithmetic"
    """Held-out prompts for evaluation: 'arithmetic' or a file."""
    sft: str = "arithmetic"
    """Gold completions for SFT stages: 'arithmetic' or a file with a 'solution' column."""
    max_operand: int = 10
    """Built-in arithmetic: operands are drawn from [0, max_operand)."""
    heldout_fraction: float = 0.2
    """Built-in arithmetic: share of problems held out for evaluation (disjoint from training)."""
    seed: int = 0


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every N GRPO steps (0: only at the start and end of each stage)."""
    num_prompts: int = 100
    k: int = 4
    """Samples per prompt: pass@1 is averaged over k, cons@k is the majority vote of k."""
    temperature: float = 1.0
    top_p: float = 1.0
    """Nucleus sampling for evaluation only (training needs rollout.top_p = 1, see validate)."""


@dataclass
class StageConfig:
    type: str = "grpo"
    """'sft' (cold start on gold completions) or 'grpo'."""
    name: str = ""
    steps: int = 10
    batch_size: int = 64
    """SFT: sequences per step (GRPO batch size is algo.prompts_per_step x rollout.group_size)."""
    lr: float = 0.0
    """Learning rate for this stage; 0 keeps learner.lr."""


@dataclass
class AlgoConfig:
    prompts_per_step: int = 16
    """Groups per learner step; the batch is prompts_per_step x rollout.group_size samples."""
    max_staleness: int = 1
    """How many weight versions behind a trained-on sample may be (0 = synchronous on-policy)."""
    truncated: str = "mask"
    """Responses cut at rollout.max_tokens: ``mask`` (no loss; DAPO's overlong filtering) or
    ``keep`` (trained on with their reward). See learner/shaping.py."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: the last N tokens before max_tokens cost up to
    ``overlong_penalty`` reward, linearly (0: off)."""
    overlong_penalty: float = 1.0
    failed_checks: str = "mask"
    """Samples whose verification timed out or crashed: ``mask`` (no loss, left out of their
    group's statistics) or ``zero`` (trained on as reward 0). Counted either way."""
    zero_variance_groups: str = "keep"
    """Groups whose rewards are all equal (advantage 0): ``keep`` or ``drop`` from the loss
    (DAPO's dynamic-sampling filter). A step where nothing is left is skipped and counted."""


@dataclass
class RunConfig:
    name: str = "run"
    root: str = "runs"
    address: str = ""
    """Ray cluster to join ('auto', 'ray://host:10001', ...); empty starts a local Ray in-process
    (RAY_ADDRESS in the environment also joins)."""
    dashboard: bool = True
    checkpoint_every: int = 0
    """Save a Hugging Face checkpoint every N steps (0: end of each stage only)."""
    tensorboard: bool = True
    seed: int = 0
    """Master seed: added to data.seed, rollout.seed and learner.seed, and seeds the tiny model
    (so ``run.seed=N`` alone gives an independent repetition)."""
    rollout_cpus: float = 1.0
    reward_cpus: float = 0.5
    learner_cpus: float = 1.0
    """Ray CPU resources per actor (fractions share cores on a laptop)."""
    timeout_s: float = 900.0
    """Longest any single actor call may take before the job stops with an error."""
    if_exists: str = "error"
    """When ``<root>/<name>`` already holds a run (a metrics.jsonl): ``error`` (stop before any
    actor starts), ``overwrite`` (delete it first) or ``new`` (use ``<name>-2``, ``-3``, ...)."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    def validate(self) -> None:
        self.rollout.validate("rollout")
        self.reward.validate("reward")
        self.learner.validate("learner")
        if self.algo.prompts_per_step < 1:
            raise ValueError(f"algo.prompts_per_step must be >= 1, got {self.algo.prompts_per_step}")
        if self.algo.max_staleness < 0:
            raise ValueError(f"algo.max_staleness must be >= 0, got {self.algo.max_staleness}")
        for key, allowed in (("truncated", ("mask", "keep")), ("failed_checks", ("mask", "zero")),
                             ("zero_variance_groups", ("keep", "drop"))):
            if getattr(self.algo, key) not in allowed:
                raise ValueError(f"algo.{key} must be {' or '.join(allowed)}, got {getattr(self.algo, key)!r}")
        if not 0 <= self.algo.overlong_buffer < self.rollout.max_tokens:
            raise ValueError(f"algo.overlong_buffer must be in [0, rollout.max_tokens="
                             f"{self.rollout.max_tokens}), got {self.algo.overlong_buffer}")
        if self.eval.k < 1 or self.eval.num_prompts < 0:
            raise ValueError("eval.k must be >= 1 and eval.num_prompts >= 0")
        if not 0 < self.eval.top_p <= 1:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.eval.top_p}")
        if self.run.if_exists not in ("error", "overwrite", "new"):
            raise ValueError(f"run.if_exists must be error|overwrite|new, got {self.run.if_exists!r}")
        if self.rollout.max_tokens >= self.rollout.max_model_len:
            raise ValueError(f"rollout.max_tokens={self.rollout.max_tokens} leaves no room for the "
                             f"prompt in rollout.max_model_len={self.rollout.max_model_len}")
        if self.rollout.top_p < 1 and any(st.type == "grpo" for st in self.stages):
            raise ValueError(
                f"rollout.top_p={self.rollout.top_p} with a grpo stage: vLLM's logprobs are then "
                "renormalised over the nucleus while the learner's are over the full tempered "
                "softmax, which biases every token's importance ratio (at top_p 0.7 the mean weight "
                "is 0.82). Train with rollout.top_p=1; eval.top_p may be lower.")
        if not self.stages:
            raise ValueError("stages is empty: list at least one stage, e.g. [{type: grpo, steps: 10}]")
        for i, st in enumerate(self.stages):
            if st.type not in STAGE_TYPES:
                raise ValueError(f"stages.{i}.type must be one of {', '.join(STAGE_TYPES)}, got {st.type!r}")
            if st.steps < 0:
                raise ValueError(f"stages.{i}.steps must be >= 0, got {st.steps}")
            if st.type == "sft" and st.batch_size < 1:
                raise ValueError(f"stages.{i}.batch_size must be >= 1, got {st.batch_size}")
            st.name = st.name or f"{i}-{st.type}"
        if self.model.path != "tiny" and not os.path.isdir(self.model.path):
            raise ValueError(f"model.path {self.model.path!r} is not a directory; give a Hugging Face "
                             "checkpoint directory or 'tiny'")
        for key in ("train", "test", "sft"):
            v = getattr(self.data, key)
            if v != "arithmetic" and not os.path.isfile(v):
                raise ValueError(f"data.{key} {v!r}: no such file (or use 'arithmetic')")
        wt = self.rollout.weight_transport
        if wt.startswith("vllm_") and self.learner.gpus_per_actor <= 0:
            raise ValueError(f"rollout.weight_transport={wt} streams from a GPU learner: set "
                             "learner.gpus_per_actor > 0 (or use torch_dist)")
        if wt == "vllm_ipc" and self.learner.num_actors != 1:
            raise ValueError("rollout.weight_transport=vllm_ipc streams from one learner process "
                             f"(learner.num_actors=1), got {self.learner.num_actors}; use vllm_nccl "
                             "with the engines on their own GPUs")
        if not self.learner.loss.norm_len:
            self.learner.loss.norm_len = self.rollout.max_tokens


# ---- building dataclasses from plain data --------------------------------------------------------

def _build(cls, data: Any, where: str):
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in sorted(unknown))}; "
                         f"known keys{' of ' + where if where else ''}: {', '.join(sorted(known))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{where}.{f.name}".lstrip(".")
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], path)
    return cls(**kwargs)


def _coerce(tp, value, path):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}.{i}") for i, v in enumerate(value)] if args else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path) if len(inner) == 1 else value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool, float):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{path} must be {tp.__name__}, got {value!r}")
        return value
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"{path} must be a mapping, got {value!r}")
    return value


def apply_override(data: dict, dotted: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to nested dicts/lists in place."""
    if "=" not in dotted:
        raise ValueError(f"override {dotted!r} must look like key.path=value")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.split(".")
    node: Any = data
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> JobConfig:
    data: dict = dict(base or {})
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
        data.update(loaded)
    for o in overrides:
        apply_override(data, o)
    cfg = _build(JobConfig, data, "")
    cfg.validate()
    return cfg


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)
