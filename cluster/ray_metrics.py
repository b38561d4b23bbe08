"""The job's RL metrics on Ray's Prometheus endpoint (``ray start --metrics-export-port``), so
Prometheus, Grafana (``docs/grafana/aha_dashboard.json``) and the Ray dashboard's metrics view can
plot a running job. ``docs/metrics.md`` says how to set them up and lists every metric.

Every metrics.jsonl row goes through three pieces:

- :data:`METRICS`, the one table from row key to metric (name, type, description). The docs'
  metric list and the Grafana dashboard are generated from it (``python -m cluster.ray_metrics
  --markdown`` / ``--grafana``; a test checks that the shipped files match).
- :class:`RowMetrics` (plain Python) turns a row into :class:`Point` s. Gauges take the row's value.
  Counters are incremented: by the row's value where it is this step's amount, by the growth
  since the previous row where the row holds a running total (per stage: ``samples_generated``;
  per job: the reward actors' ``reward_pool/*``); a total that went down restarted (a new actor),
  so it counts whole, as Prometheus reads a counter reset.
- :class:`MetricsPublisher`, a Ray actor (``num_cpus=0``, on the driver's node) that owns the
  ``ray.util.metrics`` objects: metrics made in a driver are not exported (ray-project/ray#36813).
  :class:`RayMetrics`, the driver's side, sends it each row's points fire-and-forget, starts it
  on the first row once Ray is up, and never fails the job: the first error is logged and
  publishing stops.

Labels: ``run`` (the run directory's name) and ``stage`` on every metric, one more where a row key
holds a name (``samples_dropped_<reason>`` -> ``aha_samples_dropped{reason=...}``). Never the step:
it is the value of ``aha_step``. Each such extra label keeps at most :data:`MAX_LABEL_VALUES`
values (then ``other``). A numeric key missing from the table is still exported, as the gauge
``aha_<key>`` (non-alphanumerics -> ``_``), for the first :data:`MAX_GENERIC` such keys (a reward
component's ``<name>_mean`` gets there); further ones are skipped with a warning.

What Ray does with them (2.60, measured by ``tests/cluster/test_ray_metrics.py``): names get a
``ray_`` prefix and counters a ``_total`` suffix, and Ray adds its own labels (``SessionName``,
``WorkerId``, ...). A gauge is exported only while it is being set: Ray drops one not set for two
report intervals (``RAY_metrics_report_interval_ms``, 10 s by default), so the publisher sets
every gauge again each half interval, and a stage's gauges stop when the next stage starts. When
the job ends the publisher exits: its gauges leave the endpoint ~2 intervals later (Prometheus
keeps what it scraped); counters stay until the node restarts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger(__name__)

GAUGE = "gauge"
STEP = "counter, this step's amount"
STAGE_TOTAL = "counter, stage running total"
JOB_TOTAL = "counter, job running total"

MAX_LABEL_VALUES = 32
MAX_GENERIC = 64
IGNORED = {"stage", "samples_dropped"}  # the label itself; the sum of samples_dropped_<reason>


@dataclass(frozen=True)
class Metric:
    key: str
    """The row key; a ``{label}`` part becomes that label's value (``{label:a|b}``: only a or b)."""
    name: str
    """Exported by Ray as ``ray_<name>``, a counter as ``ray_<name>_total``."""
    kind: str
    """GAUGE, or a counter whose row value is STEP, STAGE_TOTAL or JOB_TOTAL."""
    help: str

    @property
    def label(self) -> str:
        m = re.search(r"\{(\w+)", self.key)
        return m.group(1) if m else ""

    @property
    def exported(self) -> str:
        return f"ray_{self.name}" + ("" if self.kind == GAUGE else "_total")


M = Metric
METRICS: list[Metric] = [
    # progress
    M("step", "aha_step", GAUGE, "Step of the stage (the last one logged)"),
    M("global_step", "aha_global_step", GAUGE, "Learner step over the whole job"),
    M("weight_version", "aha_weight_version", GAUGE, "Weight version the learner holds"),
    # the trained-on batch
    M("reward_mean", "aha_reward_mean", GAUGE, "Mean reward of the step's samples"),
    M("accuracy_mean", "aha_accuracy_mean", GAUGE, "Mean accuracy component of the reward"),
    M("format_mean", "aha_format_mean", GAUGE, "Mean format component of the reward"),
    M("language_mean", "aha_language_mean", GAUGE, "Mean language-consistency component of the reward"),
    M("reflection_words_mean", "aha_reflection_words_mean", GAUGE, "Mean reflection words per response"),
    M("response_len_mean", "aha_response_len_mean", GAUGE, "Mean response length (tokens)"),
    M("truncated_frac", "aha_truncated_frac", GAUGE, "Fraction of responses cut at rollout.max_tokens"),
    M("staleness_mean", "aha_staleness_mean", GAUGE, "Mean weight versions a sample lags the learner"),
    M("staleness_max", "aha_staleness_max", GAUGE, "Largest weight-version lag of a trained-on sample"),
    M("zero_variance_groups", "aha_zero_variance_groups", GAUGE, "Groups of the step with equal rewards"),
    M("loss_samples", "aha_loss_samples", GAUGE, "Samples of the step that got a loss"),
    M("reward_reason/{reason}", "aha_reward_reasons", STEP, "Trained-on samples by reward reason"),
    # the learner
    M("kl", "aha_kl", GAUGE, "KL to the reference policy (k3 estimator)"),
    M("entropy", "aha_entropy", GAUGE, "Mean token entropy (nats)"),
    M("clip_frac", "aha_clip_frac", GAUGE, "Fraction of tokens whose ratio was clipped"),
    M("ratio_mean", "aha_ratio_mean", GAUGE, "Mean policy ratio"),
    M("pg_loss", "aha_pg_loss", GAUGE, "Policy-gradient loss"),
    M("loss", "aha_loss", GAUGE, "Total GRPO loss"),
    M("sft_loss", "aha_sft_loss", GAUGE, "SFT negative log-likelihood per token"),
    M("grad_norm", "aha_grad_norm", GAUGE, "Gradient norm before clipping"),
    M("logprob_mismatch", "aha_logprob_mismatch", GAUGE, "Mean absolute learner-engine logprob difference"),
    M("is_weight_mean", "aha_is_weight_mean", GAUGE, "Mean truncated importance-sampling weight"),
    # samples
    M("samples_generated", "aha_samples_generated", STAGE_TOTAL, "Samples generated"),
    M("samples_trained", "aha_samples_trained", STAGE_TOTAL, "Samples trained on"),
    M("samples_dropped_{reason}", "aha_samples_dropped", STAGE_TOTAL, "Generated samples dropped, by reason"),
    M("samples_masked_{reason}", "aha_samples_masked", STEP, "Samples masked from the loss, by reason"),
    M("reward_retries", "aha_reward_retries", STAGE_TOTAL, "Reward batches resent after a reward actor failed"),
    M("steps_skipped", "aha_steps_skipped", STAGE_TOTAL, "Steps skipped: every sample was masked"),
    # generation
    M("gen_tokens_per_s", "aha_gen_tokens_per_s", GAUGE, "Generated tokens per engine-second of the step"),
    M("gen_tokens_per_s_per_engine", "aha_gen_tokens_per_s_per_engine", GAUGE,
      "Mean over engines of each one's tokens/s"),
    M("engine_tokens_per_s/{engine}", "aha_engine_tokens_per_s", GAUGE,
      "Tokens/s of each engine that answered the step"),
    M("gen_tokens", "aha_tokens_generated", STEP,
      "Tokens generated (gen_tokens_per_s x time_generate_s when the row has no gen_tokens)"),
    # time
    M("time_{phase}_s", "aha_phase_seconds", GAUGE,
      "Seconds of the step per phase (generate and reward: summed over the step's requests)"),
    # weight sync
    M("sync_s", "aha_sync_seconds", GAUGE, "Seconds of the weight push to the engines"),
    M("sync_bytes", "aha_sync_bytes", GAUGE, "Bytes of weights sent in the step"),
    M("sync_gb_per_s", "aha_sync_gb_per_s", GAUGE, "Weight sync GB/s (sync_bytes / time_sync_s)"),
    M("sync_{event:retries|group_rebuilds}", "aha_weight_sync_events", STAGE_TOTAL,
      "Weight sync retries and group rebuilds"),
    # pools
    M("pool_{pool}", "aha_pool_size", GAUGE,
      "Actors per pool: rollout (serving), rollout_starting, rollout_retiring, reward"),
    M("rollout_engines_{event}", "aha_rollout_engine_events", STAGE_TOTAL,
      "Rollout engines started, replaced, start_failed, retired, died"),
    M("reward_pool/verifications_per_s", "aha_reward_verifications_per_s", GAUGE,
      "Verifications per busy second, summed over reward actors"),
    M("reward_pool/verifications", "aha_reward_verifications", JOB_TOTAL, "Reward verifications run"),
    M("reward_pool/timeouts", "aha_reward_timeouts", JOB_TOTAL, "Reward verifications that timed out"),
    M("reward_pool/errors", "aha_reward_errors", JOB_TOTAL, "Reward verifications that failed otherwise"),
    M("reward_pool/errors/{kind}", "aha_reward_errors_by_kind", JOB_TOTAL, "Failed verifications by kind"),
    M("reward_pool/samples", "aha_reward_samples", JOB_TOTAL, "Samples scored"),
    M("reward_pool/busy_s", "aha_reward_busy_seconds", JOB_TOTAL, "Seconds reward actors spent scoring"),
    M("reward_pool/reasons/{reason}", "aha_reward_pool_reasons", JOB_TOTAL, "Scored samples by reason kind"),
    M("reward_pool/{counter}", "aha_reward_pool_events", JOB_TOTAL,
      "Other reward-pool counters (batches, worker_starts, worker_kills, worker_crashes, ...)"),
    # held-out evaluation (eval.jsonl rows, keys prefixed eval/)
    M("eval/accuracy", "aha_eval_pass_at_1", GAUGE, "Held-out pass@1 (mean over k samples)"),
    M("eval/cons_at_k", "aha_eval_cons_at_k", GAUGE, "Held-out majority vote over k samples"),
    M("eval/response_len_mean", "aha_eval_response_len_mean", GAUGE, "Held-out mean response length"),
]
del M
_EXACT = {m.key: m for m in METRICS if not m.label}


def _regex(key: str) -> re.Pattern:
    head, label, choices, tail = re.match(r"(.*)\{(\w+)(?::([^}]+))?\}(.*)$", key).groups()
    return re.compile(f"^{re.escape(head)}(?P<{label}>{choices or '.+?'}){re.escape(tail)}$")


_PATTERNS = [(_regex(m.key), m) for m in METRICS if m.label]
BY_NAME = {m.name: m for m in METRICS}


class Point(NamedTuple):
    name: str
    kind: str  # GAUGE or one of the counter kinds
    value: float
    tags: dict


def _label_value(v: str) -> str:
    """A short label value: a reason's kind (``'timeout (0/3 passed): ...'`` -> ``'timeout'``)."""
    return v.split(":")[0].split(" (")[0].strip()[:48] or "unknown"


def derived(row: dict) -> dict:
    """The row plus what the table exports but the row only holds in parts."""
    out = dict(row)
    if "gen_tokens" not in out and out.get("time_generate_s") and out.get("gen_tokens_per_s"):
        out["gen_tokens"] = round(out["gen_tokens_per_s"] * out["time_generate_s"])
    if "sync_gb_per_s" not in out and out.get("time_sync_s") and "sync_bytes" in out:
        out["sync_gb_per_s"] = out["sync_bytes"] / out["time_sync_s"] / 1e9
    return out


class RowMetrics:
    """Rows to points for one run; holds the previous running totals.

    >>> rm = RowMetrics("r")
    >>> rm.points({"stage": "s", "step": 1, "samples_generated": 16})
    [Point(name='aha_step', kind='gauge', value=1.0, tags={'run': 'r', 'stage': 's'}), \
Point(name='aha_samples_generated', kind='counter, stage running total', value=16.0, tags={'run': 'r', 'stage': 's'})]
    >>> [p.value for p in rm.points({"stage": "s", "step": 2, "samples_generated": 40})]
    [2.0, 24.0]
    """

    def __init__(self, run: str):
        self.run = run
        self._totals: dict[tuple, float] = {}
        self._labels: dict[str, set[str]] = {}
        self._generic: set[str] = set()
        self.skipped: set[str] = set()  # keys over MAX_GENERIC, not exported

    def metric_of(self, key: str) -> tuple[Metric | None, str]:
        """The table entry of ``key`` and its label value ("" when it has no label)."""
        if key in _EXACT:
            return _EXACT[key], ""
        for rx, m in _PATTERNS:
            hit = rx.match(key)
            if hit:
                return m, hit.group(m.label)
        return None, ""

    def points(self, row: dict, generic: bool = True) -> list[Point]:
        stage = str(row.get("stage", ""))
        out = []
        for key, v in derived(row).items():
            if (key in IGNORED or isinstance(v, bool) or not isinstance(v, (int, float))
                    or not math.isfinite(v)):
                continue
            m, label = self.metric_of(key)
            tags = {"run": self.run, "stage": stage}
            if m is None:
                name = self._generic_name(key) if generic else None
                if name:
                    out.append(Point(name, GAUGE, float(v), tags))
                continue
            if m.label:
                tags[m.label] = self._bounded(m.name, _label_value(label))
            value = self._value(m, stage, key, float(v))
            if m.kind == GAUGE or value > 0:  # a counter only takes increments > 0
                out.append(Point(m.name, m.kind, value, tags))
        return out

    def _value(self, m: Metric, stage: str, key: str, v: float) -> float:
        """What to set (a gauge) or add (a counter)."""
        if m.kind in (GAUGE, STEP):
            return v
        k = (stage if m.kind == STAGE_TOTAL else "", key)
        before = self._totals.get(k, 0.0)
        self._totals[k] = v
        return v - before if v >= before else v  # went down: a new actor's total, counted whole

    def _bounded(self, metric: str, value: str) -> str:
        seen = self._labels.setdefault(metric, set())
        if value not in seen and len(seen) >= MAX_LABEL_VALUES:
            return "other"
        seen.add(value)
        return value

    def _generic_name(self, key: str) -> str | None:
        name = "aha_" + re.sub(r"[^A-Za-z0-9_]", "_", key)[:96]
        if name in BY_NAME:  # would clash with a table metric's labels
            return None
        if name not in self._generic and len(self._generic) >= MAX_GENERIC:
            if key not in self.skipped:
                log.warning("Ray metrics: more than %d keys outside cluster/ray_metrics.py's table; "
                            "%r is not exported", MAX_GENERIC, key)
            self.skipped.add(key)
            return None
        self._generic.add(name)
        return name


def report_interval_s() -> float:
    """How often this process's metrics reach the node's exporter (Ray floors it at 1 s)."""
    try:
        import ray
        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
    except Exception:  # noqa: BLE001 - a private API; Ray's default
        return 10.0


class MetricsPublisher:
    """Owns the ``ray.util.metrics`` objects (run as a Ray actor; see the module docstring).
    Sets every gauge again each half report interval: Ray drops a gauge not set for two."""

    def __init__(self):
        self._lock = threading.Lock()
        self._metrics: dict[str, object] = {}
        self._gauges: dict[tuple, tuple[str, float, dict]] = {}
        self._stage = None
        self.recorded = 0
        threading.Thread(target=self._refresh, args=(report_interval_s() / 2,), daemon=True).start()

    def record(self, points: list) -> int:
        with self._lock:
            for name, kind, value, tags in points:
                if tags.get("stage") != self._stage:  # a new stage: the last one's gauges stop
                    self._gauges.clear()
                    self._stage = tags.get("stage")
                metric = self._metric(name, kind, tuple(tags))
                if kind == GAUGE:
                    metric.set(value, tags=tags)
                    self._gauges[(name, *sorted(tags.items()))] = (name, value, tags)
                else:
                    metric.inc(value, tags=tags)
                self.recorded += 1
        return self.recorded

    def _metric(self, name: str, kind: str, tag_keys: tuple):
        from ray.util.metrics import Counter, Gauge

        if name not in self._metrics:
            m = BY_NAME.get(name)
            desc = m.help if m else "a metrics.jsonl key outside cluster/ray_metrics.py's table"
            self._metrics[name] = (Gauge if kind == GAUGE else Counter)(name, desc, tag_keys=tag_keys)
        return self._metrics[name]

    def _refresh(self, period_s: float) -> None:
        while True:
            time.sleep(period_s)
            with self._lock:
                for name, value, tags in self._gauges.values():
                    self._metrics[name].set(value, tags=tags)


class RayMetrics:
    """The driver's side: ``publish(row)`` never blocks and never raises. Does nothing until Ray
    is initialised, or at all with ``AHA_RAY_METRICS=0``."""

    def __init__(self, run: str):
        self.rows = RowMetrics(run)
        self._actor = None
        self._last = None
        self._off = os.environ.get("AHA_RAY_METRICS", "1") == "0"

    def publish(self, row: dict, generic: bool = True) -> None:
        if self._off:
            return
        try:
            import ray
            if not ray.is_initialized():
                return
            if self._actor is None:  # on the driver's node: no other node's loss stops it
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
                self._actor = ray.remote(MetricsPublisher).options(
                    num_cpus=0, scheduling_strategy=here).remote()
            if self._last is not None and ray.wait([self._last], timeout=0)[0]:
                ray.get(self._last)  # the previous batch's error, if it failed, without waiting
            points = self.rows.points(row, generic)
            if points:
                self._last = self._actor.record.remote(points)
        except Exception as e:  # noqa: BLE001 - metrics must never fail the job
            self._off = True
            log.warning("Ray metrics disabled for the rest of the job: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        """Let the publisher finish what it was sent and exit (its last values are exported)."""
        if self._actor is not None:
            try:
                self._actor.__ray_terminate__.remote()
            except Exception:  # noqa: BLE001 - teardown
                pass
            self._actor = None


# ---- generated docs --------------------------------------------------------------------------
def markdown_table() -> str:
    """The metric list of docs/metrics.md."""
    lines = ["| row key | Prometheus name | type | labels | description |",
             "|---|---|---|---|---|"]
    for m in METRICS:
        labels = "run, stage" + (f", {m.label}" if m.label else "")
        key, text = m.key.replace("|", "\\|"), m.help.replace("|", "\\|")
        lines.append(f"| `{key}` | `{m.exported}` | {m.kind} | {labels} | {text} |")
    return "\n".join(lines) + "\n"


def _q(metric: str, by: str = "run, stage", rate: bool = False, stage: bool = True, extra: str = "") -> str:
    sel = '{run=~"$run"' + (', stage=~"$stage"' if stage else "") + extra + "}"
    m = BY_NAME[metric]
    if rate:
        return f"sum by ({by}) (rate({m.exported}{sel}[$__rate_interval]))"
    return f"max by ({by}) ({m.exported}{sel})"


# (title, unit, [(expr, legend)])
PANELS = [
    ("Reward, accuracy, format", "none", [
        (_q("aha_reward_mean"), "{{run}} {{stage}} reward"),
        (_q("aha_accuracy_mean"), "{{run}} {{stage}} accuracy"),
        (_q("aha_format_mean"), "{{run}} {{stage}} format"),
        (_q("aha_language_mean"), "{{run}} {{stage}} language")]),
    ("Held-out pass@1 and cons@k", "percentunit", [
        (_q("aha_eval_pass_at_1"), "{{run}} {{stage}} pass@1"),
        (_q("aha_eval_cons_at_k"), "{{run}} {{stage}} cons@k")]),
    ("KL, entropy, clip fraction", "none", [
        (_q("aha_kl"), "{{run}} {{stage}} kl"),
        (_q("aha_entropy"), "{{run}} {{stage}} entropy"),
        (_q("aha_clip_frac"), "{{run}} {{stage}} clip_frac")]),
    ("Response length", "none", [
        (_q("aha_response_len_mean"), "{{run}} {{stage}} tokens"),
        (_q("aha_truncated_frac"), "{{run}} {{stage}} truncated fraction")]),
    ("Staleness (weight versions)", "none", [
        (_q("aha_staleness_mean"), "{{run}} {{stage}} mean"),
        (_q("aha_staleness_max"), "{{run}} {{stage}} max")]),
    ("Samples generated / trained per second", "ops", [
        (_q("aha_samples_generated", rate=True), "{{run}} {{stage}} generated"),
        (_q("aha_samples_trained", rate=True), "{{run}} {{stage}} trained")]),
    ("Samples dropped and masked per second, by reason", "ops", [
        (_q("aha_samples_dropped", "run, stage, reason", rate=True), "{{run}} {{stage}} dropped {{reason}}"),
        (_q("aha_samples_masked", "run, stage, reason", rate=True), "{{run}} {{stage}} masked {{reason}}")]),
    ("Generated tokens per second", "none", [
        (_q("aha_tokens_generated", rate=True), "{{run}} {{stage}} job-wide"),
        (_q("aha_gen_tokens_per_s"), "{{run}} {{stage}} per engine-second"),
        (_q("aha_engine_tokens_per_s", "run, stage, engine"), "{{run}} engine {{engine}}")]),
    ("Phase times", "s", [
        (_q("aha_phase_seconds", "run, stage, phase"), "{{run}} {{stage}} {{phase}}")]),
    ("Pool sizes", "none", [
        (_q("aha_pool_size", "run, pool", stage=False), "{{run}} {{pool}}")]),
    ("Reward pool: verifications, timeouts, errors per second", "ops", [
        (_q("aha_reward_verifications", "run", rate=True, stage=False), "{{run}} verifications"),
        (_q("aha_reward_timeouts", "run", rate=True, stage=False), "{{run}} timeouts"),
        (_q("aha_reward_errors", "run", rate=True, stage=False), "{{run}} errors")]),
    ("Weight sync seconds", "s", [
        (_q("aha_sync_seconds"), "{{run}} {{stage}} push"),
        (_q("aha_phase_seconds", extra=', phase="sync"'), "{{run}} {{stage}} sync phase")]),
    ("Weight sync GB/s", "none", [
        (_q("aha_sync_gb_per_s"), "{{run}} {{stage}} GB/s")]),
    ("Step and weight version", "none", [
        (_q("aha_step"), "{{run}} {{stage}} step"),
        (_q("aha_weight_version"), "{{run}} {{stage}} weight version")]),
]


def grafana_dashboard() -> dict:
    """docs/grafana/aha_dashboard.json: a time series per PANELS entry, ``$datasource`` (any
    Prometheus), ``$run`` and ``$stage`` variables."""
    ds = {"type": "prometheus", "uid": "${datasource}"}

    def var(name, query):
        return {"name": name, "label": name, "type": "query", "datasource": ds, "definition": query,
                "query": {"query": query, "refId": "StandardVariableQuery"}, "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": ds,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}},
            "targets": [{"datasource": ds, "expr": e, "legendFormat": lg, "refId": chr(65 + j)}
                        for j, (e, lg) in enumerate(targets)]})
    return {
        "title": "aha: GRPO run", "uid": "aha-grpo", "tags": ["aha", "ray"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            var("run", f"label_values({BY_NAME['aha_step'].exported}, run)"),
            var("stage", f'label_values({BY_NAME["aha_step"].exported}{{run=~"$run"}}, stage)')]},
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(grafana_dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(dashboard_json() if "--grafana" in sys.argv else markdown_table())
