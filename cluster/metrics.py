"""Run-directory outputs: metrics.jsonl, eval.jsonl, TensorBoard scalars, Parquet trajectories, and a
one-line summary per step on the terminal; the same rows on Ray's Prometheus endpoint
(``cluster/ray_metrics.py``). Also the per-phase timer of the controller loop."""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.ray_metrics import RayMetrics
from rollout.types import Sample, to_arrow

log = logging.getLogger(__name__)


class PhaseTimer:
    """``with timer("train"): ...`` accumulates seconds per phase; ``pop()`` returns and resets."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.times = {f"time_{k}_s": v for k, v in self.times.items()}, {}
        return out


class RunLogger:
    """``run``: the ``run`` label of the Ray metrics (default: the run directory's name)."""

    def __init__(self, run_dir: str, tensorboard: bool = True, run: str = ""):
        self.dir = run_dir
        os.makedirs(os.path.join(run_dir, "trajectories"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self._eval = open(os.path.join(run_dir, "eval.jsonl"), "a")
        self._parts: dict[str, int] = {}
        self.ray = RayMetrics(run or os.path.basename(os.path.normpath(run_dir)))
        self.tb = None
        self._tensorboard = tensorboard  # the writer opens at the first row: importing it imports
        # torch, which a driver should not wait for before Ray starts (cluster.controller)

    def _tb(self, prefix: str, row: dict, step: int) -> None:
        if self._tensorboard and self.tb is None:
            self._tensorboard = False
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional
                log.warning("TensorBoard disabled: %s", e)
        if self.tb is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.tb.flush()

    def metrics(self, row: dict, global_step: int) -> None:
        row = {**row, "global_step": global_step}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self._tb(row.get("stage", "train"), row, global_step)
        self.ray.publish(row)

    def eval(self, row: dict, global_step: int) -> None:
        row = {**row, "global_step": global_step}
        self._eval.write(json.dumps(row) + "\n")
        self._eval.flush()
        self._tb("eval", row, global_step)
        self.ray.publish({"stage": row.get("stage", ""), **{f"eval/{k}": v for k, v in row.items()}},
                         generic=False)

    def trajectories(self, name: str, samples: list[Sample]) -> None:
        """Append samples to the dataset ``trajectories/<name>/`` as one Parquet part file per call,
        so it is readable while the job runs: ``pyarrow.parquet.read_table(<that folder>)``."""
        if not samples:
            return
        folder = os.path.join(self.dir, "trajectories", name)
        os.makedirs(folder, exist_ok=True)
        n = self._parts.get(name, len(os.listdir(folder)))
        self._parts[name] = n + 1
        tmp = os.path.join(folder, f".part-{n:06d}.parquet.tmp")
        pq.write_table(pa.Table.from_batches([to_arrow(samples)]), tmp)
        os.replace(tmp, os.path.join(folder, f"part-{n:06d}.parquet"))  # readers never see half a file

    def close(self) -> None:
        self.ray.close()
        self._metrics.close()
        self._eval.close()
        if self.tb is not None:
            self.tb.close()


def summary_line(row: dict) -> str:
    keys = [("step", "{:d}"), ("reward_mean", "{:.3f}"), ("accuracy_mean", "{:.3f}"),
            ("format_mean", "{:.2f}"), ("response_len_mean", "{:.1f}"), ("kl", "{:.4f}"),
            ("clip_frac", "{:.3f}"), ("entropy", "{:.3f}"), ("staleness_mean", "{:.2f}"),
            ("samples_dropped", "{:d}"), ("time_step_s", "{:.1f}s")]
    parts = []
    for k, fmt in keys:
        if k in row:
            try:
                parts.append(f"{k.replace('_mean', '')}={fmt.format(row[k])}")
            except (ValueError, TypeError):
                parts.append(f"{k}={row[k]}")
    return " ".join(parts)
