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

STAGE_TYPES = ("sft", "grpo", "rejection_sample", "reward_model", "distill")
POLICY_STAGES = ("sft", "grpo", "distill")
"""Stage types whose output checkpoint is a policy (what ``model:`` of a later stage may name)."""
DATASET_STAGES = ("rejection_sample", "distill")
"""Stage types that write a dataset under ``runs/<name>/datasets/<stage>/``."""
DATA_USED = {"sft": ("sft", "test"), "grpo": ("train", "test"), "rejection_sample": ("train",),
             "reward_model": ("pairs",), "distill": ("train", "test")}
"""The ``data`` keys each stage type reads (held-out ``test`` for the eval of the model it makes)."""
SECTIONS = ("data", "rollout", "reward", "learner", "algo", "eval")
"""Job sections a stage may override (``stages.N.<section>``), merged over the job's."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """A Hugging Face checkpoint directory, or 'tiny' for the built-in tiny Qwen2 (created on first use
    under ``<run dir>/tiny-model``)."""
    tiny: dict = field(default_factory=dict)
    """Settings of the built-in tiny model (rollout.tiny.create_tiny_model arguments)."""


@dataclass
class DataConfig:
    train: Any = "arithmetic"
    """Prompts with checkable answers: 'arithmetic' (built-in synthetic task), a data source (a
    Parquet / JSONL / JSON-array / CSV file, a folder of Parquet shards or a ``save_to_disk``
    folder, see rollout.datasets.load_prompts), or ``{from_stage: NAME}`` (the dataset a
    rejection_sample or distill stage kept). Or a list of prompt sets mixed in every batch, each
    a source or ``{source: SOURCE, reward_weights: {verifier: weight}}`` (its own weights, e.g.
    rule rewards for reasoning prompts and the reward model for the others)."""
    test: Any = "arithmetic"
    """Held-out prompts for evaluation: 'arithmetic', a data source or ``{from_stage: NAME}``."""
    sft: Any = "arithmetic"
    """Gold completions for SFT stages (a 'solution' column, or GSM8K-style '#### answer' text):
    'arithmetic', a data source or ``{from_stage: NAME}``."""
    pairs: Any = ""
    """Preference pairs for a reward_model stage: ``{from_stage: NAME}`` of a rejection_sample
    stage (chosen = kept, rejected = a wrong answer to the same prompt), or a file with
    ``prompt``, ``chosen``, ``rejected`` columns."""
    columns: dict = field(default_factory=dict)
    """Column mapping of file sources, our field -> the file's column, e.g.
    ``{question: problem, answer: solution}`` (fields: id, question, answer, task, tests, solution)."""
    max_operand: int = 10
    """Built-in arithmetic: operands are drawn from [0, max_operand)."""
    cot: str = "compact"
    """Built-in arithmetic: gold chains of thought ``3+4=7`` ('compact') or ``3 plus 4 is 7``
    ('words': something for the language-consistency reward to measure)."""
    cot_mix: float = 0.0
    """Built-in arithmetic with cot 'words': share of gold chains of thought worded in Greek
    (``3 συν 4 ισον 7``), a mixed-language cold start; the tiny model then needs
    ``model.tiny.extra_chars`` to hold rollout.datasets.GREEK_CHARS."""
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
class FilterConfig:
    """What a rejection_sample (or distill) stage keeps: R1's filter-then-SFT, applied to every
    sample in this order; each rejected sample is counted under the first filter it fails."""
    accuracy_min: float = 1.0
    """Keep samples whose ``accuracy`` reward is at least this (1: verified correct)."""
    format: bool = True
    """Require the R1 tag format (``rewards.format``)."""
    language_min: float = 0.0
    """Least share of chain-of-thought words in ``reward.language`` (0: off; rewards.language)."""
    min_tokens: int = 1
    max_tokens: int = 0
    """Response length bounds in tokens (0: no upper bound; responses cut at rollout.max_tokens
    are always rejected as ``truncated``)."""
    max_per_prompt: int = 0
    """At most N kept samples per prompt (0: all)."""
    dedupe: bool = True
    """Drop a response identical (whitespace folded) to one already kept for the same prompt."""


@dataclass
class StageConfig:
    type: str = "grpo"
    """'sft' (cold start on gold completions), 'grpo', 'rejection_sample' (k samples per prompt,
    keep the verified ones: a dataset), 'reward_model' (Bradley-Terry on preference pairs) or
    'distill' (teacher traces, then SFT of ``student``). See cluster/stages/."""
    name: str = ""
    """Defaults to ``<index>-<type>``; later stages name their inputs by it (``from_stage``)."""
    model: Any = ""
    """Input checkpoint: '' (the previous policy stage's output; the base model for the first),
    'base' or ``{from_stage: base}`` (model.path), ``{from_stage: NAME}``, or a checkpoint
    directory. A stage takes the weights only: step, optimizer and data position start fresh."""
    steps: int = 10
    batch_size: int = 64
    """SFT, distill and reward_model: sequences (pairs) per step (GRPO's batch is
    algo.prompts_per_step x rollout.group_size)."""
    lr: float = 0.0
    """Learning rate for this stage; 0 keeps learner.lr."""
    samples_per_prompt: int = 8
    """rejection_sample / distill: completions generated per prompt (at rollout.temperature)."""
    num_prompts: int = 0
    """rejection_sample / distill: prompts of data.train to sample (0: all)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    student: dict = field(default_factory=dict)
    """distill: the student model, ``model`` section keys (``{path: DIR}`` or ``{path: tiny,
    tiny: {hidden: 64, layers: 2}}``); its own tokenizer re-tokenizes the teacher's text."""
    heldout_fraction: float = 0.1
    """reward_model: share of prompts whose pairs are held out for pair accuracy."""
    data: dict = field(default_factory=dict)
    rollout: dict = field(default_factory=dict)
    reward: dict = field(default_factory=dict)
    learner: dict = field(default_factory=dict)
    algo: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    """Per-stage overrides of the job's sections, merged key by key over them (``reward.weights``
    is replaced whole: a stage names its complete reward) and validated as
    ``stages.N.<section>.<key>``."""


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
    """GRPO: write an in-stage checkpoint every N steps (0: none; ``aha stop`` writes one too):
    learner weights, optimizer, reference and RNG states, the data cursor, step, weight version
    and counters, in ``checkpoints/<stage>-state`` (the latest only; deleted when the stage ends,
    which writes its Hugging Face checkpoint). ``--resume`` continues from it."""
    tensorboard: bool = True
    seed: int = 0
    """Master seed: added to data.seed, rollout.seed and learner.seed, and seeds the tiny model
    (so ``run.seed=N`` alone gives an independent repetition)."""
    rollout_cpus: float = 1.0
    reward_cpus: float = 0.5
    learner_cpus: float = 1.0
    reference_cpus: float = 0.5
    """Ray CPU resources per actor (fractions share cores on a laptop); ``reference_cpus``: per
    reference actor (``learner.reference: pool``)."""
    rollout_resources: dict = field(default_factory=dict)
    reward_resources: dict = field(default_factory=dict)
    learner_resources: dict = field(default_factory=dict)
    reference_resources: dict = field(default_factory=dict)
    """Custom Ray resources each actor of the pool requires, which places it: a node started with
    ``ray start --resources='{"rollout_node": 4}'`` takes the engines of
    ``run.rollout_resources={rollout_node: 1}``. Empty: anywhere with the CPUs/GPUs."""
    timeout_s: float = 900.0
    """Longest any single actor call may take before the job stops with an error."""
    if_exists: str = "error"
    """When ``<root>/<name>`` already holds a run (metrics.jsonl or pipeline.json) and the job is
    not resumed (``--resume``): ``error`` (stop before any actor starts), ``overwrite`` (delete it
    first) or ``new`` (use ``<name>-2``, ``-3``, ...)."""


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
        if not self.stages:
            raise ValueError("stages is empty: list at least one stage, e.g. [{type: grpo, steps: 10}]")
        names: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            if st.type not in STAGE_TYPES:
                raise ValueError(f"stages.{i}.type must be one of {', '.join(STAGE_TYPES)}, got {st.type!r}")
            st.name = st.name or f"{i}-{st.type}"
            if st.name == "base" or st.name in names or "/" in st.name:
                raise ValueError(f"stages.{i}.name {st.name!r} must be unique, not 'base' and without '/'")
            names[st.name] = i
        if self.run.checkpoint_every and self.learner.backend != "torch":
            raise ValueError(f"run.checkpoint_every: in-stage checkpoints are written by the torch "
                             f"learner only; learner.backend={self.learner.backend} saves at the end "
                             "of each stage (set run.checkpoint_every=0)")
        for kind in ("rollout", "reward", "learner", "reference"):
            res = getattr(self.run, f"{kind}_resources")
            bad = {k: v for k, v in res.items()
                   if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0}
            if bad or any(k in ("CPU", "GPU", "memory") for k in res):
                raise ValueError(f"run.{kind}_resources maps custom Ray resource names to amounts > 0 "
                                 f"(CPUs/GPUs come from run.{kind}_cpus and *.gpus_per_actor), got {res}")
        if self.run.if_exists not in ("error", "overwrite", "new"):
            raise ValueError(f"run.if_exists must be error|overwrite|new, got {self.run.if_exists!r}")
        if self.model.path != "tiny" and not os.path.isdir(self.model.path):
            raise ValueError(f"model.path {self.model.path!r} is not a directory; give a Hugging Face "
                             "checkpoint directory or 'tiny'")
        self._check_sections("")
        for i, st in enumerate(self.stages):
            self._check_stage(i, st, names)
        if not self.learner.loss.norm_len:
            self.learner.loss.norm_len = self.rollout.max_tokens

    def for_stage(self, i: int) -> "JobConfig":
        """This job with stage ``i``'s section overrides merged in (``stages.i.reward`` etc.)."""
        st = self.stages[i]
        if not any(getattr(st, sec) for sec in SECTIONS):
            return self
        job = dataclasses.replace(self)
        for sec in SECTIONS:
            over = getattr(st, sec)
            if over:
                merged = merge(dataclasses.asdict(getattr(self, sec)), over,
                               replace_keys=("weights",) if sec == "reward" else ())
                setattr(job, sec, _build(type(getattr(self, sec)), merged, f"stages.{i}.{sec}"))
        return job

    def _check_sections(self, p: str) -> None:
        """Checks of the component sections; ``p`` prefixes names (``stages.3.``) for a stage's
        merged sections."""
        self.rollout.validate(f"{p}rollout")
        self.reward.validate(f"{p}reward")
        self.learner.validate(f"{p}learner")
        if self.algo.prompts_per_step < 1:
            raise ValueError(f"{p}algo.prompts_per_step must be >= 1, got {self.algo.prompts_per_step}")
        if self.algo.max_staleness < 0:
            raise ValueError(f"{p}algo.max_staleness must be >= 0, got {self.algo.max_staleness}")
        for key, allowed in (("truncated", ("mask", "keep")), ("failed_checks", ("mask", "zero")),
                             ("zero_variance_groups", ("keep", "drop"))):
            if getattr(self.algo, key) not in allowed:
                raise ValueError(f"{p}algo.{key} must be {' or '.join(allowed)}, got {getattr(self.algo, key)!r}")
        if not 0 <= self.algo.overlong_buffer < self.rollout.max_tokens:
            raise ValueError(f"{p}algo.overlong_buffer must be in [0, rollout.max_tokens="
                             f"{self.rollout.max_tokens}), got {self.algo.overlong_buffer}")
        if self.eval.k < 1 or self.eval.num_prompts < 0:
            raise ValueError(f"{p}eval.k must be >= 1 and {p}eval.num_prompts >= 0")
        if not 0 < self.eval.top_p <= 1:
            raise ValueError(f"{p}eval.top_p must be in (0, 1], got {self.eval.top_p}")
        if self.rollout.max_tokens >= self.rollout.max_model_len:
            raise ValueError(f"{p}rollout.max_tokens={self.rollout.max_tokens} leaves no room for the "
                             f"prompt in {p}rollout.max_model_len={self.rollout.max_model_len}")
        wt = self.rollout.weight_transport
        if wt.startswith("vllm_") and self.learner.gpus_per_actor <= 0:
            raise ValueError(f"{p}rollout.weight_transport={wt} streams from a GPU learner: set "
                             f"{p}learner.gpus_per_actor > 0 (or use torch_dist)")
        if wt == "vllm_ipc" and self.learner.num_actors != 1:
            raise ValueError(f"{p}rollout.weight_transport=vllm_ipc streams from one learner process "
                             f"(learner.num_actors=1), got {self.learner.num_actors}; use vllm_nccl "
                             "with the engines on their own GPUs")
        if self.data.cot not in ("compact", "words") or not 0 <= self.data.cot_mix < 1 or \
                (self.data.cot_mix and self.data.cot != "words"):
            raise ValueError(f"{p}data.cot must be compact|words and {p}data.cot_mix in [0, 1) "
                             f"(only with cot: words), got {self.data.cot!r}, {self.data.cot_mix}")
        if self.data.cot_mix and self.model.path == "tiny":
            from rollout.datasets import GREEK_CHARS
            missing = set(GREEK_CHARS) - set(self.model.tiny.get("extra_chars", ""))
            if missing:
                raise ValueError(f"{p}data.cot_mix={self.data.cot_mix} words chains of thought in Greek, which "
                                 "the tiny model's tokenizer cannot spell: set model.tiny.extra_chars: "
                                 f"{GREEK_CHARS!r}")
        if self.data.columns:
            from rollout.datasets import FIELDS
            bad = set(self.data.columns) - set(FIELDS)
            if bad:
                raise ValueError(f"{p}data.columns: unknown field(s) {', '.join(sorted(bad))}; fields: "
                                 f"{', '.join(FIELDS)}")

    def _check_stage(self, i: int, st: StageConfig, names: dict[str, int]) -> None:
        p = f"stages.{i}."
        job = self.for_stage(i)
        if job is not self:
            job._check_sections(p)
        if st.steps < 0:
            raise ValueError(f"{p}steps must be >= 0, got {st.steps}")
        if st.type != "grpo" and st.batch_size < 1:
            raise ValueError(f"{p}batch_size must be >= 1, got {st.batch_size}")
        if st.type == "grpo" and job.rollout.top_p < 1:
            raise ValueError(
                f"{p}rollout.top_p={job.rollout.top_p} in a grpo stage: vLLM's logprobs are then "
                "renormalised over the nucleus while the learner's are over the full tempered "
                "softmax, which biases every token's importance ratio (at top_p 0.7 the mean weight "
                "is 0.82). Train with rollout.top_p=1; eval.top_p may be lower.")
        model = st.model
        if isinstance(model, dict):
            if set(model) != {"from_stage"}:
                raise ValueError(f"{p}model must be a checkpoint directory, 'base' or {{from_stage: NAME}}, got {model!r}")
            model = model["from_stage"]
            self._ref(f"{p}model.from_stage", model, i, names, POLICY_STAGES, "a policy checkpoint")
        elif not isinstance(model, str):
            raise ValueError(f"{p}model must be a checkpoint directory, 'base' or {{from_stage: NAME}}, got {model!r}")
        elif model not in ("", "base") and not os.path.isdir(model):
            raise ValueError(f"{p}model {model!r} is not a directory (a checkpoint directory, 'base' "
                             "or {from_stage: NAME})")
        for key in DATA_USED[st.type]:
            src, where = getattr(job.data, key), f"{p}data.{key}"
            kinds = ("rejection_sample",) if key == "pairs" else DATASET_STAGES
            if isinstance(src, list) and key == "train":
                if not src:
                    raise ValueError(f"{where} is an empty list: name at least one prompt set")
                for j, item in enumerate(src):
                    if isinstance(item, dict) and "source" in item:
                        if set(item) - {"source", "reward_weights"}:
                            raise ValueError(f"{where}.{j}: a prompt set takes source and reward_weights, "
                                             f"got {', '.join(sorted(item))}")
                        unknown = set(item.get("reward_weights") or {}) - set(job.reward.weights)
                        if unknown:
                            raise ValueError(f"{where}.{j}.reward_weights.{sorted(unknown)[0]}: not a verifier "
                                             f"of {p}reward.weights ({', '.join(job.reward.weights)}); every "
                                             "verifier a prompt set weighs must be in the stage's reward.weights")
                        item = item["source"]
                    self._check_source(f"{where}.{j}", item, i, names, kinds)
            else:
                self._check_source(where, src, i, names, kinds)
        for where, ref in find_refs(job.reward.options, f"{p}reward.options"):
            self._ref(where, ref, i, names, ("reward_model",), "a reward model")
        weights = job.reward.weights
        if "reward_model" in weights and not (job.reward.options.get("reward_model") or {}).get("path"):
            raise ValueError(f"{p}reward.weights.reward_model needs {p}reward.options.reward_model.path: "
                             "a sequence-classification checkpoint directory, or {from_stage: NAME} of a "
                             "reward_model stage")
        if st.type in ("rejection_sample", "distill"):
            if "accuracy" not in weights:
                raise ValueError(f"{p}reward.weights has no 'accuracy': the {st.type} filter keeps "
                                 "verified-correct samples; add accuracy to the stage's reward weights")
            if st.samples_per_prompt < 1 or st.num_prompts < 0:
                raise ValueError(f"{p}samples_per_prompt must be >= 1 and {p}num_prompts >= 0")
            f = st.filters
            if f.max_tokens and f.max_tokens < f.min_tokens:
                raise ValueError(f"{p}filters.max_tokens={f.max_tokens} < filters.min_tokens={f.min_tokens}")
            if not 0 <= f.language_min <= 1 or f.max_per_prompt < 0:
                raise ValueError(f"{p}filters.language_min must be in [0, 1] and max_per_prompt >= 0")
        if st.type == "distill":
            if not st.student:
                raise ValueError(f"{p}student is missing: a distill stage trains a student model, "
                                 "e.g. student: {path: tiny, tiny: {hidden: 64, layers: 2}}")
            student = _build(ModelConfig, st.student, f"{p}student")
            if student.path != "tiny" and not os.path.isdir(student.path):
                raise ValueError(f"{p}student.path {student.path!r} is not a directory (or 'tiny')")
        if st.type == "reward_model":
            if not job.data.pairs:
                raise ValueError(f"{p}data.pairs is missing: a reward_model stage trains on preference "
                                 "pairs, e.g. data: {pairs: {from_stage: NAME}} of a rejection_sample stage")
            if not 0 < st.heldout_fraction < 1:
                raise ValueError(f"{p}heldout_fraction must be in (0, 1), got {st.heldout_fraction}")

    def _check_source(self, where: str, src: Any, i: int, names: dict[str, int], kinds) -> None:
        if isinstance(src, dict) and "from_stage" in src:
            if set(src) - {"from_stage"}:
                raise ValueError(f"{where}: {{from_stage: NAME}} takes no other keys, got {src!r}")
            self._ref(f"{where}.from_stage", src["from_stage"], i, names, kinds, "a dataset")
        elif isinstance(src, str):
            if src not in ("", "arithmetic") and not os.path.exists(src):
                raise ValueError(f"{where} {src!r}: no such file or folder (or use 'arithmetic', or "
                                 "{from_stage: NAME})")
        else:
            raise ValueError(f"{where} must be 'arithmetic', a file or folder, or {{from_stage: NAME}}, got {src!r}")

    def _ref(self, where: str, name: Any, i: int, names: dict[str, int], kinds, what: str) -> None:
        if name == "base" and "sft" in kinds:
            return
        if name not in names:
            raise ValueError(f"{where}: no stage named {name!r}; stages: {', '.join(names)}"
                             + (" (or 'base')" if "sft" in kinds else ""))
        j = names[name]
        if j >= i:
            raise ValueError(f"{where}: stage {name!r} is stage {j}, not before stage {i}; a stage "
                             "reads only earlier stages' outputs")
        if self.stages[j].type not in kinds:
            raise ValueError(f"{where}: stage {name!r} is a {self.stages[j].type} stage, which does not "
                             f"produce {what} (stage types that do: {', '.join(kinds)})")


def find_refs(obj: Any, where: str):
    """``(dotted path, stage name)`` of every ``{from_stage: NAME}`` inside nested dicts / lists."""
    if isinstance(obj, dict):
        if set(obj) == {"from_stage"}:
            yield where, obj["from_stage"]
            return
        for k, v in obj.items():
            yield from find_refs(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for j, v in enumerate(obj):
            yield from find_refs(v, f"{where}.{j}")


def merge(base: dict, over: dict, replace_keys: tuple = ()) -> dict:
    """``over`` merged into a copy of ``base`` key by key (nested mappings too), except the
    top-level ``replace_keys``, which ``over`` replaces whole."""
    out = dict(base)
    for k, v in over.items():
        if k not in replace_keys and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


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
