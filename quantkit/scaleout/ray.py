"""Scale-out on Ray: calibration shards and sensitivity/tuning trials as Ray tasks.

``ray`` is an optional extra (``quantkit-onnx[distributed]``), imported only here and only when
``workers`` is asked for. Without a ``--ray-address`` a local Ray instance is started, and
with one an existing cluster is joined.

- **Calibration**: the samples are cut into contiguous shards whose sizes are multiples of the
  batch size, so the batches match the single-process run. Each worker is a Ray actor that keeps
  one onnxruntime session across its shards. The histograms merge exactly, so the ranges and
  caches are byte-identical to a single-process run on the same data.
- **Trials** (sensitivity, tuning): each plan is built and evaluated by a Ray task. The
  validation data, the FP32 reference outputs, the model and the ranges go into the object store
  once, not with every task.
- **Failures**: a task whose worker dies is submitted again (up to ``retries`` times), and the
  retry is recorded, so no trial is lost or counted twice.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import ModuleType
from typing import Any

from quantkit._deps import install_hint, require
from quantkit._io import interactive
from quantkit.calibration.collect import CalibrationStats, CollectRequest, SourceSpec, collect_statistics
from quantkit.data import PreprocessSpec, batches
from quantkit.errors import QuantkitError
from quantkit.evaluation.objectives import objective as named_objective
from quantkit.model import ModelInfo, load_model
from quantkit.options import ScaleOut
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.tuning.sensitivity import Evaluator, build_candidate

INSTALL_HINT = install_hint("ray")
#: test hook: with this set to a directory, the first task to see it kills its worker process once
KILL_ONCE_ENV = "QUANTKIT_TEST_KILL_ONCE"


def import_ray() -> ModuleType:
    return require("ray", "scale-out (workers)")


@contextmanager
def ray_cluster(workers: int, address: str | None = None) -> Iterator[ModuleType]:
    """A connected Ray (a local instance with ``workers`` CPUs, or the cluster at ``address``)."""
    if workers < 1:
        raise QuantkitError(f"workers must be at least 1, got {workers}", option="workers")
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = workers
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - connection and start-up errors of every kind
            raise QuantkitError(f"cannot start or join Ray ({'at ' + address if address else 'locally'}): {exc}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _maybe_die() -> None:
    marker_dir = os.environ.get(KILL_ONCE_ENV)
    if marker_dir and Path(marker_dir).is_dir():  # armed only once the directory exists
        marker = Path(marker_dir) / "killed"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)  # a worker dying mid-task, once


def run_with_retries(
    ray: ModuleType,
    submit: Callable[[int], Any],
    count: int,
    retries: int = 2,
    on_done: Callable[[int, Any], None] | None = None,
    describe: Callable[[int], str] = lambda i: f"task {i}",
) -> tuple[list[Any], list[str]]:
    """Submit ``count`` tasks (``submit(i)`` returns an ObjectRef), resubmitting those whose worker
    died. Returns results in order and the notes of what was retried."""
    results: list[Any] = [None] * count
    attempts = [0] * count
    pending = {submit(i): i for i in range(count)}
    notes: list[str] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        i = pending.pop(ref)
        try:
            results[i] = ray.get(ref)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as exc:
            attempts[i] += 1
            if attempts[i] > retries:
                raise QuantkitError(f"{describe(i)} failed {attempts[i]} times, its worker dying each time: {type(exc).__name__}") from None
            notes.append(f"{describe(i)} retried after its worker died ({type(exc).__name__})")
            pending[submit(i)] = i
            continue
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else exc
            if isinstance(cause, QuantkitError):
                raise cause from None
            raise QuantkitError(f"{describe(i)} failed: {type(cause).__name__}: {cause}") from None
        if on_done is not None:
            on_done(i, results[i])
    return results, notes


# ---- calibration ---------------------------------------------------------------------------------
def shard_bounds(total: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) sample ranges, each a multiple of ``batch_size`` except the last."""
    batches = -(-total // batch_size)
    per = max(1, -(-batches // shards))
    bounds = []
    for start_batch in range(0, batches, per):
        start = start_batch * batch_size
        bounds.append((start, min(total, (start_batch + per) * batch_size)))
    return bounds


def _calibration_actor(ray: ModuleType) -> Any:
    @ray.remote
    class CalibrationWorker:
        """One onnxruntime session, reused for every shard this worker collects."""

        def __init__(self, model_bytes: bytes, tensors: list[str], bins: int) -> None:
            from quantkit.backends.ort import ActivationRunner

            # the session holds the model in memory: the file is needed only while loading
            with tempfile.TemporaryDirectory(prefix="quantkit-worker-") as tmp:
                path = Path(tmp) / "model.onnx"
                path.write_bytes(model_bytes)
                self.model = load_model(path)
                self.runner = ActivationRunner(self.model, tensors)
            self.bins = bins

        def collect(self, data: str, source_args: dict[str, Any], start: int, stop: int, batch_size: int) -> dict[str, Any]:
            _maybe_die()
            args = dict(source_args)
            args["preprocess"] = PreprocessSpec.from_mapping(args["preprocess"]) if args.get("preprocess") else None
            source = SourceSpec(data, **args).open(self.model)
            samples = islice(iter(source), start, stop)
            stats = collect_statistics(
                self.model, batches(samples, self.model, batch_size, stop - start), runner=self.runner, bins=self.bins
            )
            return stats.to_dict()

    return CalibrationWorker


def collect_statistics_distributed(
    model: Any,
    data: str | Path,
    *,
    total: int,
    batch_size: int,
    bins: int,
    tensors: list[str],
    source_args: dict[str, Any],
    workers: int,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    on_shard: Callable[[int], None] | None = None,
) -> tuple[Any, list[str]]:
    """Calibration statistics of the first ``total`` samples, collected by ``workers`` Ray actors."""
    bounds = shard_bounds(total, workers * 2, batch_size)  # two shards per worker keep both busy to the end
    with ray_cluster(workers, address) as ray:
        model_ref = ray.put(model.path.read_bytes())
        actor_cls = _calibration_actor(ray)
        actors = [actor_cls.options(num_gpus=gpus_per_worker).remote(model_ref, tensors, bins) for _ in range(workers)]
        payload = {**source_args, "preprocess": source_args["preprocess"].to_json() if source_args.get("preprocess") else None}

        submitted = [False] * len(bounds)

        def submit(i: int) -> Any:
            k = i % len(actors)
            if submitted[i]:  # a retry: the worker that had this shard died, start a new one
                actors[k] = actor_cls.options(num_gpus=gpus_per_worker).remote(model_ref, tensors, bins)
            submitted[i] = True
            return actors[k].collect.remote(str(data), payload, bounds[i][0], bounds[i][1], batch_size)

        results, notes = run_with_retries(
            ray,
            submit,
            len(bounds),
            on_done=lambda i, r: on_shard(r["num_samples"]) if on_shard else None,
            describe=lambda i: f"calibration shard {i} (samples {bounds[i][0]}-{bounds[i][1] - 1})",
        )
    stats = CalibrationStats.from_dict(results[0])
    for r in results[1:]:
        stats = stats.merge(CalibrationStats.from_dict(r))
    order = [t for t in tensors if t in stats.histograms]
    stats.histograms = {t: stats.histograms[t] for t in order}  # the single-process order, whatever shard saw what
    return stats, notes


@dataclass(frozen=True)
class RayCollector:
    """A ``Collector`` that shards the samples over Ray actors; the statistics equal one process's."""

    scale_out: ScaleOut

    def collect(self, model: ModelInfo, source: Any, request: CollectRequest) -> CalibrationStats:
        r = request
        if not isinstance(r.spec.data, str):
            raise QuantkitError(
                "calibration on Ray workers needs data that each worker can open: a path or hf:NAME, not a Python "
                f"{type(r.spec.data).__name__}; save it (e.g. datasets' save_to_disk, or .npy) or calibrate in one process",
                option="workers",
            )
        available = source.size if source.size is not None else sum(1 for _ in source)
        num_samples = r.num_samples
        if num_samples is not None and available < num_samples:
            raise QuantkitError(
                f"{source.description} has only {available} sample(s) but {num_samples} were asked (num_samples); "
                "ask for fewer or omit it to use all",
                option="num_samples",
            )
        total = num_samples if num_samples is not None else available
        if total == 0:
            raise QuantkitError(f"{source.description} yielded no samples")
        spec = r.spec
        source_args = {"preprocess": spec.preprocess, "input_name": spec.input_name, "shuffle": spec.shuffle, "seed": spec.seed}
        stats, notes = collect_statistics_distributed(
            model,
            spec.data,
            total=total,
            batch_size=r.batch_size,
            bins=r.bins,
            tensors=list(r.tensors),
            source_args=source_args,
            workers=int(self.scale_out.workers or 1),
            address=self.scale_out.address,
            gpus_per_worker=self.scale_out.gpus_per_worker,
            on_shard=r.on_samples,
        )
        r.warnings.extend(notes)
        return stats


# ---- trials (sensitivity and tuning) -------------------------------------------------------------
class RayExecutor:
    """Evaluates precision plans as Ray tasks; data, reference outputs, model and ranges are put once."""

    def __init__(
        self,
        ray: ModuleType,
        model: Any,
        ranges: Any,
        method: str | None,
        target: str,
        workers: int,
        gpus_per_worker: float = 0.0,
        quiet: bool = False,
    ) -> None:
        self.ray = ray
        self.workers = workers
        self.model_ref = ray.put(model.path.read_bytes())
        self.ranges_ref = ray.put(ranges.dumps())
        self.method, self.target = method, target
        self.gpus = gpus_per_worker
        self.quiet = quiet
        self.notes: list[str] = []
        self._data_refs: dict[int, tuple[Any, Any, Any]] = {}

        @ray.remote(max_retries=0)
        def evaluate_plan(
            model_bytes: bytes, ranges_text: str, plan_doc: dict, method: str | None, target: str, data: Any, latency: bool
        ) -> Any:
            import json as _json

            _maybe_die()
            batches_, reference, labels, metric = data
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "model.onnx").write_bytes(model_bytes)
                (Path(tmp) / "ranges.json").write_text(ranges_text)
                info = load_model(Path(tmp) / "model.onnx")
                ranges = RangeSet.load(Path(tmp) / "ranges.json")
            # a built-in or file metric is rebuilt here; a Python callable travels pickled
            objective = named_objective(metric[0], **metric[1]) if isinstance(metric, tuple) else metric
            # as many onnxruntime threads as CPUs Ray reserved for the task, so workers do not oversubscribe
            ev = Evaluator(info, batches_, objective, labels, reference=reference, threads=1)
            return ev.evaluate(
                build_candidate(info, ranges, PrecisionPlan.from_mapping(_json.loads(_json.dumps(plan_doc))), method=method, target=target),
                latency,
            )

        self._evaluate_plan = evaluate_plan

    def _data(self, evaluator: Any) -> Any:
        key = id(evaluator)
        if key not in self._data_refs:  # one put per evaluator (the full set and the sensitivity subset)
            metric = evaluator.objective.rebuildable() or evaluator.objective
            self._data_refs[key] = self.ray.put((evaluator.data, evaluator.reference, evaluator.labels, metric))
        return self._data_refs[key]

    def map(self, evaluator: Any, plans: Sequence[Any], latency: bool = False) -> list[Any]:
        data_ref = self._data(evaluator)

        def submit(i: int) -> Any:
            return self._evaluate_plan.options(num_gpus=self.gpus).remote(
                self.model_ref, self.ranges_ref, plans[i].to_json(), self.method, self.target, data_ref, latency
            )

        from tqdm import tqdm

        desc = f"trials on {self.workers} workers"
        with tqdm(total=len(plans), desc=desc, unit="trial", disable=not interactive(self.quiet), leave=False) as bar:
            scores, notes = run_with_retries(
                self.ray,
                submit,
                len(plans),
                on_done=lambda i, _: bar.update(1),
                describe=lambda i: f"trial {plans[i].to_json()['nodes'] or 'all-int8'}",
            )
        self.notes += notes
        for _ in scores:
            evaluator.account()
        return scores
