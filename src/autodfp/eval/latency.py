"""Measured speed: honest latency of whole models, and a per-layer lookup table that predicts it.

MACs are what pruning papers report, but a model with half the MACs is rarely twice as fast: thin
layers waste vector lanes, per-layer dispatch does not shrink, and runtimes fuse differently. This
module measures instead of counting.

**Whole models** (:func:`measure_latency`). Every model of a comparison is measured in *one* run
and *alternated*: for each repeat, model A is timed, then model B, then A again. Thermal throttling,
a neighbour's job or a frequency change then slows both models alike instead of whichever happened
to be measured second. Each model first runs ``warmup`` untimed passes (allocator, oneDNN kernel
selection, TorchScript's profiling executor, ONNX Runtime's arena), then ``repeats`` timed ones; the
report gives the median (robust to a stray slow run) *with* the spread (10th-90th percentile and the
interquartile range), and the thread count the runtime used, since a number without its thread
count cannot be compared with anything. At least :data:`MIN_REPEATS` runs are timed. Runtimes:

* ``torch``: eager PyTorch under ``torch.inference_mode``;
* ``torchscript``: :func:`autodfp.eval.export.to_torchscript` (what ``model.ts`` holds);
* ``onnxruntime``: ``torch.onnx.export`` with a dynamic batch axis, run by an
  ``onnxruntime.InferenceSession`` with all graph optimisations, its intra-op threads set to the
  same count as PyTorch's so the two runtimes are compared on equal cores; ``CPUExecutionProvider``
  on the CPU, ``CUDAExecutionProvider`` on CUDA (whose timings include the host-device copies of
  the input and output, as ``session.run`` with NumPy arrays does in deployment).

On CUDA every timed region is bracketed by ``torch.cuda.synchronize``, so the time is the kernels'
and not that of queueing them.

**Per-layer table** (:class:`LatencyTable`, after NetAdapt, Yang et al. 2018). Each conv/linear
layer is timed alone, at each candidate (input channels, output channels) pair, on an input of the
shape it sees inside the model. A plan's latency is then predicted as the sum over layers plus a
constant, ``overhead_ms``: the measured whole model at full width minus the sum of its layers at
full width. The constant absorbs what the table does not time per width (BatchNorm, activations,
pooling, residual adds, and the runtime's per-call overhead, which timing layers one by one counts
once per layer); so the prediction is exact at full width, and :func:`prediction_error` says how
far it is for pruned plans. Widths between measured ones are interpolated (bilinear in the two
channel counts). Tables are cached on disk like the synthetic inputs
(``autodfp.models.hub.cache_dir()/"latency"``), keyed by the architecture and shapes, runtime,
device, batch, PyTorch (and ONNX Runtime) version and thread count; a damaged entry is re-measured.
:func:`plan_latency` maps a plan's kept widths (per group, in the units
:class:`autodfp.search.budget.MacsModel` uses) to each layer's channels, mirroring how
``MacsModel`` scales layers, so the search can take a latency budget as it takes a MACs budget.

**Report section** (:func:`latency_section`): the JSON object, to be stored under ``"latency"`` in
``report.json``. Schema (:func:`check_section` validates it)::

    {
      "format": "autodfp.latency/1",          # str
      "device": "cpu",                        # str: the torch device measured on
      "device_name": "x86_64 ...",            # str: CPU model or GPU name
      "torch_version": "2.x",                 # str
      "onnxruntime_version": "1.x" | null,    # str, or null when onnxruntime is not installed
      "input_shape": [3, 32, 32],             # list[int]: one input, without the batch
      "batch_sizes": [1, 8, 32],              # list[int]
      "warmup": 5,                            # int: untimed passes per model and batch size
      "repeats": 20,                          # int: timed, alternated passes per model and batch size
      "runtimes": {                           # one entry per runtime measured
        "torch": {
          "threads": 4,                       # int: intra-op threads of the runtime
          "provider": null,                   # str (ONNX Runtime's execution provider) or null
          "batches": [                        # one per batch size, in the order of batch_sizes
            {
              "batch": 1,                     # int
              "before": TIMING | null,        # the reference (unpruned) model; null when none
              "after": TIMING,                # the model measured (the pruned one)
              "speedup": 1.8 | null           # float: before.median_ms / after.median_ms
            }
          ]
        }
      }
    }

    TIMING = {"median_ms": float, "p10_ms": float, "p90_ms": float, "iqr_ms": float, "runs": int}

Times are milliseconds per forward pass of one batch. ``autodfp bench-latency`` prints this object
(with ``"model"`` and ``"against"`` added) and plots it (:func:`plot_latency`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autodfp.errors import AutoDFPError, CacheWarning, PlanError

__all__ = [
    "FORMAT",
    "MIN_REPEATS",
    "RUNTIMES",
    "LatencyReport",
    "LatencyTable",
    "LayerSpec",
    "Timing",
    "available_runtimes",
    "candidate_widths",
    "check_batch_sizes",
    "check_runtime",
    "check_section",
    "latency_section",
    "layer_specs",
    "layer_timer",
    "layer_widths",
    "measure_latency",
    "parse_batch_sizes",
    "plan_latency",
    "plot_latency",
    "prediction_error",
    "ratio_keeps",
    "wall_timer",
]

#: format tag of a :func:`latency_section` object
FORMAT = "autodfp.latency/1"
#: format tag of a cached :class:`LatencyTable`
TABLE_FORMAT = "autodfp.latency-table/1"
#: the runtimes :func:`measure_latency` knows
RUNTIMES = ("torch", "torchscript", "onnxruntime")
#: fewest timed runs per model and batch size: a median of fewer moves with a single slow run
MIN_REPEATS = 20
#: largest batch size accepted (a typo such as 3200 would otherwise run for minutes)
MAX_BATCH = 4096

#: ``timer(name, run) -> ms``: time one call of ``run`` (one forward pass of model ``name``)
Timer = Callable[[str, Callable[[], object]], float]


# -- checks ------------------------------------------------------------------------------------
def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else a one-line :class:`PlanError`.

    :param runtime: the runtime's name, as a user typed it (case-insensitive)
    """
    name = str(runtime).strip().lower()
    if name not in RUNTIMES:
        raise PlanError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    return name


def available_runtimes() -> tuple[str, ...]:
    """The runtimes usable here: ONNX Runtime only where it is installed (``--runtime all`` uses these)."""
    return tuple(r for r in RUNTIMES if r != "onnxruntime" or _has_onnxruntime())


def _has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise AutoDFPError(
            "the onnxruntime runtime needs the onnxruntime package: pip install onnxruntime (onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


def check_batch_sizes(batch_sizes: Iterable[int], what: str = "batch_sizes") -> tuple[int, ...]:
    """The batch sizes as a tuple of distinct integers in [1, :data:`MAX_BATCH`], in the given order.

    :param batch_sizes: the sizes to measure; a zero, a negative, a fraction or a repeat is refused
        (a batch of 0 measures nothing, and a repeat measures the same thing twice)
    :param what: how messages name the parameter (the CLI passes ``--batch-sizes``)
    """
    sizes = list(batch_sizes)
    if not sizes:
        raise PlanError(f"{what} is empty; give at least one batch size, e.g. 1")
    out: list[int] = []
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH:
            raise PlanError(f"{what} must be integers from 1 to {MAX_BATCH}, got {b!r}")
        if b in out:
            raise PlanError(f"{what} lists batch size {b} twice")
        out.append(int(b))
    return tuple(out)


def parse_batch_sizes(text: str, what: str = "--batch-sizes") -> tuple[int, ...]:
    """``"1,8,32"`` → ``(1, 8, 32)``, checked by :func:`check_batch_sizes`.

    :param text: comma-separated integers, as typed on a command line
    :param what: how messages name the flag
    """
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise PlanError(f"{what} must be comma-separated integers, got '{text}'") from None
    return check_batch_sizes(values, what)


def _check_counts(warmup: int, repeats: int, threads: int | None) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise PlanError(f"warmup must be a non-negative integer, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < MIN_REPEATS:
        raise PlanError(
            f"repeats must be an integer of at least {MIN_REPEATS} (a median of fewer runs moves with one slow "
            f"run), got {repeats!r}"
        )
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PlanError(f"threads must be a positive integer, got {threads!r}")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise PlanError(f"input_shape must be positive integers (one input, without the batch), got {input_shape!r}")
    return shape


# -- timings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """The distribution of one model's timed runs at one batch size, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    runs: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        """Median, 10th/90th percentiles and interquartile range of ``samples`` (at least two).

        :param samples: one wall time per timed run, in milliseconds
        """
        xs = [float(s) for s in samples]
        if len(xs) < 2:
            raise ValueError("a timing needs at least two runs")
        q = statistics.quantiles(xs, n=20, method="inclusive")  # 5 %, 10 %, ..., 95 %
        return cls(median_ms=float(statistics.median(xs)), p10_ms=q[1], p90_ms=q[17], iqr_ms=q[14] - q[4], runs=len(xs))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyReport:
    """What :func:`measure_latency` measured: every model at every batch size, under one runtime.

    ``timings[model][batch]`` is a :class:`Timing`; ``threads`` the runtime's intra-op thread
    count; ``provider`` ONNX Runtime's execution provider (None for the other runtimes).
    """

    runtime: str
    device: str
    threads: int
    provider: str | None
    input_shape: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    warmup: int
    repeats: int
    timings: dict[str, dict[int, Timing]]

    def median(self, model: str, batch: int) -> float:
        """Median milliseconds of ``model`` at ``batch``."""
        return self.timings[model][batch].median_ms

    def speedup(self, before: str, after: str) -> dict[int, float]:
        """``{batch: median(before) / median(after)}``: above 1 when ``after`` is faster.

        :param before: the reference model's name (the unpruned one)
        :param after: the compared model's name (the pruned one)
        """
        return {b: self.median(before, b) / max(self.median(after, b), 1e-12) for b in self.batch_sizes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "device": self.device,
            "threads": self.threads,
            "provider": self.provider,
            "input_shape": list(self.input_shape),
            "batch_sizes": list(self.batch_sizes),
            "warmup": self.warmup,
            "repeats": self.repeats,
            "timings": {m: {str(b): t.to_dict() for b, t in per.items()} for m, per in self.timings.items()},
        }


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def wall_timer(device: str | torch.device = "cpu") -> Timer:
    """The default timer: wall time of one call in milliseconds, synchronised on CUDA/MPS.

    :param device: where the timed work runs; on an accelerator the queue is drained before and
        after the call, or the time would be that of launching kernels, not running them
    """
    sync = _sync(torch.device(device))

    def timer(name: str, run: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        return (time.perf_counter() - t0) * 1e3

    return timer


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    """PyTorch's intra-op threads set to ``threads`` for the block (restored after); yields the count in use."""
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _resolve_device(device: str | torch.device) -> torch.device:
    from autodfp.api import resolve_device

    return resolve_device(device)


def _example(shape: tuple[int, ...], batch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=g).to(device)


def _flat(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _flat(o)]
    return []


def _moved(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``; moved only if it is elsewhere (moving a ScriptModule warns about ``.grad``)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device or (t.device.type == device.type and device.index is None) for t in tensors):
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.to(device)


class _Prepared:
    """One model made ready for one runtime; :meth:`call` gives a zero-argument forward at a batch size."""

    def __init__(
        self, model: nn.Module, shape: tuple[int, ...], runtime: str, device: torch.device, threads: int, tmp: Path
    ) -> None:
        self.shape = shape
        self.device = device
        self.provider: str | None = None
        self.threads = threads
        self._session: Any = None
        cpu_copy = _moved(copy.deepcopy(model), torch.device("cpu")).eval()
        if runtime == "torch":
            self._module: Any = _moved(cpu_copy, device)
        elif runtime == "torchscript":
            from autodfp.eval.export import to_torchscript

            self._module = _moved(to_torchscript(cpu_copy, shape), device)
        else:
            self._module = None
            self._session = self._onnx_session(cpu_copy, tmp)

    def _onnx_session(self, model: nn.Module, tmp: Path) -> Any:
        ort = _import_onnxruntime()
        if self.device.type not in ("cpu", "cuda"):
            raise PlanError(f"the onnxruntime runtime runs on cpu or cuda, not on '{self.device.type}'")
        x = _example(self.shape, 1, torch.device("cpu"))
        with torch.inference_mode():
            n_out = len(_flat(model(x)))
        outputs = [f"output{i}" for i in range(max(n_out, 1))]
        fd, name = tempfile.mkstemp(suffix=".onnx", dir=tmp)
        os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    model,
                    (x,),
                    name,
                    input_names=["input"],
                    output_names=outputs,
                    dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                    dynamo=False,
                )
            except Exception as exc:  # an op the exporter lacks: the user's model, not a bug of ours
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
                raise AutoDFPError(f"the model cannot be exported to ONNX ({first})") from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads  # as many as PyTorch uses: the runtimes share the cores alike
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise AutoDFPError(
                    "onnxruntime has no CUDA provider here: install onnxruntime-gpu, or measure with --device cpu"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        session = ort.InferenceSession(name, sess_options=opts, providers=providers)
        self.provider = session.get_providers()[0]
        self.threads = int(session.get_session_options().intra_op_num_threads)
        return session

    def call(self, batch: int) -> Callable[[], object]:
        x = _example(self.shape, batch, self.device)
        if self._session is not None:
            feed = {self._session.get_inputs()[0].name: x.cpu().numpy()}
            session = self._session
            return lambda: session.run(None, feed)
        module = self._module
        return lambda: module(x)


def measure_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    runtime: str = "torch",
    batch_sizes: Sequence[int] = (1, 8, 32),
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = MIN_REPEATS,
    threads: int | None = None,
    timer: Timer | None = None,
) -> LatencyReport:
    """Latency of every model in ``models``, measured in one run and alternated (see module doc).

    For each batch size, every model runs ``warmup`` untimed passes, then ``repeats`` rounds time
    each model once in the order of ``models`` (A, B, A, B, ...), so slow periods hit all alike.

    :param models: ``{name: model}``; the models are copied, never moved or changed
    :param input_shape: one input without the batch, e.g. ``(3, 32, 32)``
    :param runtime: ``torch``, ``torchscript`` or ``onnxruntime`` (which must be installed)
    :param batch_sizes: batch sizes to measure; latency per batch grows sublinearly, and a pruned
        model's gain differs between batch 1 (latency-bound) and large batches (throughput-bound)
    :param device: ``cpu``, ``cuda`` or ``auto``; CUDA timings are synchronised
    :param warmup: untimed passes per model and batch size, so allocation and kernel selection are
        not timed
    :param repeats: timed passes per model and batch size, at least :data:`MIN_REPEATS`
    :param threads: intra-op threads for PyTorch and ONNX Runtime (default: PyTorch's current
        count); recorded in the report either way
    :param timer: ``timer(name, run) -> ms`` times one call; tests inject one (default
        :func:`wall_timer`)
    """
    if not models:
        raise PlanError("measure_latency needs at least one model")
    runtime = check_runtime(runtime)
    sizes = check_batch_sizes(batch_sizes)
    shape = _check_shape(input_shape)
    _check_counts(warmup, repeats, threads)
    dev = _resolve_device(device)
    time_one = timer if timer is not None else wall_timer(dev)
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in sizes} for name in models}
    with _torch_threads(threads) as n_threads, tempfile.TemporaryDirectory(prefix="autodfp-latency-") as tmp:
        prepared = {name: _Prepared(m, shape, runtime, dev, n_threads, Path(tmp)) for name, m in models.items()}
        with torch.inference_mode():
            for b in sizes:
                calls = {name: p.call(b) for name, p in prepared.items()}
                for _ in range(warmup):
                    for call in calls.values():
                        call()
                for _ in range(repeats):
                    for name, call in calls.items():
                        ms = float(time_one(name, call))
                        if not math.isfinite(ms) or ms < 0:
                            raise ValueError(f"the timer returned {ms!r} ms for {name}")
                        samples[name][b].append(ms)
        first = next(iter(prepared.values()))
        threads_used = first.threads
        provider = first.provider
    return LatencyReport(
        runtime=runtime,
        device=str(dev),
        threads=int(threads_used),
        provider=provider,
        input_shape=shape,
        batch_sizes=sizes,
        warmup=warmup,
        repeats=repeats,
        timings={name: {b: Timing.from_samples(per[b]) for b in sizes} for name, per in samples.items()},
    )


# -- per-layer lookup table -------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One conv/linear layer as a table times it: its hyper-parameters, widths and input shape.

    ``input_dims`` are the dimensions of one input besides the channels: the spatial size of a
    conv's input, the leading dimensions of a linear layer's (``()`` for a flat vector).
    ``in_channels``/``out_channels`` are features for a linear layer.
    """

    name: str
    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    input_dims: tuple[int, ...]
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: str | tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @property
    def depthwise(self) -> bool:
        """One filter per channel: its input and output widths move together."""
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input of this layer, without the batch."""
        if self.kind == "linear":
            return (*self.input_dims, self.in_channels)
        return (self.in_channels, *self.input_dims)

    def at(self, in_channels: int, out_channels: int) -> LayerSpec:
        """This layer with other widths (a depthwise conv keeps one group per channel).

        :param in_channels: input channels (features) the pruned layer reads
        :param out_channels: output channels (features) it writes
        """
        i, o = int(in_channels), int(out_channels)
        if i < 1 or o < 1:
            raise ValueError(f"layer {self.name}: widths must be positive, got ({i}, {o})")
        if self.depthwise:
            if i != o:
                raise ValueError(f"layer {self.name} is depthwise: its widths must be equal, got ({i}, {o})")
            return replace(self, in_channels=i, out_channels=o, groups=i)
        if self.groups > 1 and (i % self.groups or o % self.groups):
            raise ValueError(f"layer {self.name} has {self.groups} conv groups: ({i}, {o}) does not split into them")
        return replace(self, in_channels=i, out_channels=o)

    def build(self) -> nn.Module:
        """A fresh layer of this spec (random weights: only its shape matters for timing)."""
        if self.kind == "linear":
            return nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
        cls: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel_size)]
        return cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
        )

    def describe(self) -> str:
        """Every field, as one stable string (the table's cache key hashes these)."""
        return json.dumps(
            [
                self.name,
                self.kind,
                self.in_channels,
                self.out_channels,
                list(self.input_dims),
                list(self.kernel_size),
                list(self.stride),
                self.padding if isinstance(self.padding, str) else list(self.padding),
                list(self.dilation),
                self.groups,
                self.bias,
                self.padding_mode,
            ]
        )


_TIMED_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_specs(model: nn.Module, input_shape: Sequence[int]) -> list[LayerSpec]:
    """The conv/linear layers of ``model`` in module order, with the input shape each one sees.

    Shapes come from one forward pass (:func:`autodfp.eval.metrics.profile`), so they are those
    the model really produces. Transposed convs and layers that never ran are left to the table's
    overhead term.

    :param model: the unpruned model (a TorchScript module has no layers to hook, and is refused)
    :param input_shape: one input without the batch
    """
    from autodfp.eval.metrics import profile

    if isinstance(model, torch.jit.ScriptModule):
        raise AutoDFPError(
            "a TorchScript model has no layers to time one by one; rebuild it from its architecture (--arch)"
        )
    prof = profile(model, _check_shape(input_shape))
    specs: list[LayerSpec] = []
    for lp in prof.layers:
        if lp.input_shape is None:
            continue
        m = model.get_submodule(lp.name)
        if isinstance(m, nn.Linear):
            specs.append(
                LayerSpec(
                    lp.name,
                    "linear",
                    m.in_features,
                    m.out_features,
                    tuple(lp.input_shape[1:-1]),
                    bias=m.bias is not None,
                )
            )
        elif isinstance(m, _TIMED_CONVS):
            pad = m.padding if isinstance(m.padding, str) else tuple(int(p) for p in m.padding)
            specs.append(
                LayerSpec(
                    lp.name,
                    "conv",
                    m.in_channels,
                    m.out_channels,
                    tuple(lp.input_shape[2:]),
                    kernel_size=tuple(int(k) for k in m.kernel_size),
                    stride=tuple(int(s) for s in m.stride),
                    padding=pad,
                    dilation=tuple(int(d) for d in m.dilation),
                    groups=int(m.groups),
                    bias=m.bias is not None,
                    padding_mode=str(m.padding_mode),
                )
            )
    return specs


#: ``timer(spec) -> ms``: the time of one layer at the widths ``spec`` carries
LayerTimer = Callable[[LayerSpec], float]


def layer_timer(
    runtime: str = "torch",
    batch: int = 1,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = MIN_REPEATS,
    threads: int | None = None,
) -> LayerTimer:
    """The default per-layer timer: the median of :func:`measure_latency` on the layer alone.

    :param runtime: the runtime the table is for (a layer exported to ONNX alone for ``onnxruntime``)
    :param batch: the batch size the table predicts
    :param device: where the layers run
    :param warmup: untimed passes per layer and width
    :param repeats: timed passes per layer and width (at least :data:`MIN_REPEATS`)
    :param threads: intra-op threads (default: PyTorch's current count)
    """

    def time_layer(spec: LayerSpec) -> float:
        rep = measure_latency(
            {spec.name: spec.build()}, spec.input_shape, runtime, (batch,), device, warmup, repeats, threads
        )
        return rep.median(spec.name, batch)

    return time_layer


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        name = m.group(1).strip() if m else ""
    return " ".join(x for x in (platform.machine(), name or platform.processor()) if x) or device.type


def _ort_version() -> str | None:
    if not _has_onnxruntime():
        return None
    import onnxruntime

    return str(onnxruntime.__version__)


def _arch_digest(model: nn.Module, specs: Sequence[LayerSpec], input_shape: tuple[int, ...]) -> str:
    """Hash of every module's name and type and every timed layer's spec: the architecture and its shapes."""
    h = hashlib.sha256()
    h.update(json.dumps(list(input_shape)).encode())
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__};".encode())
    for s in specs:
        h.update(s.describe().encode())
    return h.hexdigest()


def _callable_name(fn: Callable[..., Any] | None) -> str:
    if fn is None:
        return "default"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _width_key(i: int, o: int) -> str:
    return f"{i}x{o}"


_WIDTH_KEY = re.compile(r"([1-9][0-9]{0,6})x([1-9][0-9]{0,6})")


def _valid_ms(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


@dataclass
class LatencyTable:
    """Measured time of each conv/linear layer at candidate widths, and the model's at full width.

    Build one with :meth:`build`; predict a plan with :meth:`predict` (per-layer widths) or
    :func:`plan_latency` (per-group kept widths).
    """

    specs: dict[str, LayerSpec]  # full width, module order
    times: dict[str, dict[tuple[int, int], float]]
    model_ms: float | None  # the whole model at full width; None: no overhead term
    input_shape: tuple[int, ...]
    runtime: str
    batch: int
    device: str
    threads: int
    key: str = ""
    path: Path | None = None
    measured: int = 0  # entries timed by the last build (the rest came from the cache)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_shape: Sequence[int],
        widths_per_layer: Mapping[str, Iterable[tuple[int, int]]] | None = None,
        runtime: str = "torch",
        batch: int = 1,
        device: str | torch.device = "cpu",
        timer: LayerTimer | None = None,
        model_timer: Callable[[nn.Module], float] | None = None,
        warmup: int = 5,
        repeats: int = MIN_REPEATS,
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
        calibrate: bool = True,
    ) -> LatencyTable:
        """Time every layer of ``model`` at full width and at the widths asked for, reusing the cache.

        :param model: the unpruned model whose layers are timed
        :param input_shape: one input without the batch
        :param widths_per_layer: ``{layer: [(in, out), ...]}`` to time besides full width (see
            :func:`candidate_widths`, which derives them from the groups' candidate keeps)
        :param runtime: ``torch``, ``torchscript`` or ``onnxruntime``
        :param batch: the batch size the table predicts
        :param device: where the layers run
        :param timer: ``timer(spec) -> ms`` for one layer at ``spec``'s widths; tests inject one
            (default :func:`layer_timer`)
        :param model_timer: ``model_timer(model) -> ms`` for the whole model, from which the
            overhead term is derived (default: :func:`measure_latency`'s median)
        :param warmup: untimed passes per measurement (default timers)
        :param repeats: timed passes per measurement (default timers; at least :data:`MIN_REPEATS`)
        :param threads: intra-op threads (default: PyTorch's current count); part of the cache key
        :param cache_dir: where tables are cached (default ``cache_dir()/"latency"``)
        :param cache: read and write the cache (off: measure everything, keep nothing)
        :param calibrate: measure the whole model for the overhead term (off: the prediction is
            the bare sum over layers)
        """
        runtime = check_runtime(runtime)
        (batch,) = check_batch_sizes([batch], "batch")
        shape = _check_shape(input_shape)
        _check_counts(warmup, repeats, threads)
        dev = _resolve_device(device)
        specs = {s.name: s for s in layer_specs(model, shape)}
        wanted: dict[str, set[tuple[int, int]]] = {n: {(s.in_channels, s.out_channels)} for n, s in specs.items()}
        for name, pairs in (widths_per_layer or {}).items():
            if name not in specs:
                raise ValueError(f"layer '{name}' is not a timed conv/linear layer of the model")
            for i, o in pairs:
                specs[name].at(i, o)  # refuses impossible widths before any timing
                wanted[name].add((int(i), int(o)))
        n_threads = threads if threads is not None else torch.get_num_threads()
        parts = {
            "format": TABLE_FORMAT,
            "arch": _arch_digest(model, list(specs.values()), shape),
            "runtime": runtime,
            "device": str(dev),
            "device_name": _device_name(dev),
            "batch": batch,
            "torch": torch.__version__,
            "onnxruntime": _ort_version() if runtime == "onnxruntime" else None,
            "threads": n_threads,
            # an injected timer's numbers are not measurements: they never share entries with real ones
            "timer": _callable_name(timer),
            "model_timer": _callable_name(model_timer),
        }
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        table = cls(
            specs=specs,
            times={n: {} for n in specs},
            model_ms=None,
            input_shape=shape,
            runtime=runtime,
            batch=batch,
            device=str(dev),
            threads=int(n_threads),
            key=key,
            meta=parts,
        )
        root = Path(cache_dir) if cache_dir is not None else _default_root()
        path = root / f"{runtime}-{dev.type}-b{batch}-t{n_threads}-{key[:20]}.json"
        damaged = False
        if cache and path.exists():
            damaged = not table._load(path)
        time_layer = timer or layer_timer(runtime, batch, dev, warmup, repeats, threads)
        for name, pairs in wanted.items():
            for i, o in sorted(pairs):
                if (i, o) not in table.times[name]:
                    ms = float(time_layer(specs[name].at(i, o)))
                    if not _valid_ms(ms):
                        raise ValueError(f"the layer timer returned {ms!r} ms for {name} at ({i}, {o})")
                    table.times[name][(i, o)] = ms
                    table.measured += 1
        if calibrate and table.model_ms is None:
            if model_timer is None:
                rep = measure_latency({"model": model}, shape, runtime, (batch,), dev, warmup, repeats, threads)
                table.model_ms = rep.median("model", batch)
            else:
                table.model_ms = float(model_timer(model))
            if not _valid_ms(table.model_ms):
                raise ValueError(f"the model timer returned {table.model_ms!r} ms")
            table.measured += 1
        if cache and (table.measured or damaged):
            table._save(path)
        if not calibrate:  # a cached whole-model time stays cached, but this table predicts the bare sum
            table.model_ms = None
        return table

    def _load(self, path: Path) -> bool:
        """Merge the cached entries at ``path``; False (after a warning) if any part was damaged."""
        from autodfp._jsonio import read_json

        try:
            blob = read_json(path, f"latency cache entry {path}")
        except AutoDFPError as exc:
            warnings.warn(f"{exc}; re-measuring", CacheWarning, stacklevel=3)
            return False
        if not isinstance(blob, dict) or blob.get("format") != TABLE_FORMAT or blob.get("key") != self.key:
            warnings.warn(f"latency cache entry {path} is not this table's; re-measuring", CacheWarning, stacklevel=3)
            return False
        ok = True
        model_ms = blob.get("model_ms")
        if model_ms is not None:
            if _valid_ms(model_ms):
                self.model_ms = float(model_ms)
            else:
                ok = False
        layers = blob.get("layers")
        if not isinstance(layers, dict):
            ok = False
            layers = {}
        for name, entries in layers.items():
            if name not in self.specs:
                continue
            if not isinstance(entries, dict):
                ok = False
                continue
            for k, v in entries.items():
                m = _WIDTH_KEY.fullmatch(k) if isinstance(k, str) else None
                if m is None or not _valid_ms(v):
                    ok = False
                    continue
                i, o = int(m.group(1)), int(m.group(2))
                try:
                    self.specs[name].at(i, o)
                except ValueError:
                    ok = False
                    continue
                self.times[name][(i, o)] = float(v)
        if not ok:
            warnings.warn(
                f"latency cache entry {path} holds damaged values; re-measuring them", CacheWarning, stacklevel=3
            )
        return ok

    def _save(self, path: Path) -> None:
        from autodfp._io import atomic_write_text
        from autodfp.models.hub import usable_cache_dir

        if usable_cache_dir(path.parent) is None:
            return
        blob = {
            "format": TABLE_FORMAT,
            "key": self.key,
            "meta": self.meta,
            "model_ms": self.model_ms,
            "layers": {n: {_width_key(i, o): ms for (i, o), ms in sorted(t.items())} for n, t in self.times.items()},
        }
        try:
            atomic_write_text(path, json.dumps(blob, indent=1) + "\n")
            self.path = path
        except OSError as exc:  # a full disk: the table is still good
            reason = exc.strerror or exc.__class__.__name__
            warnings.warn(f"could not cache the latency table at {path} ({reason})", CacheWarning, stacklevel=3)

    # -- predicting ------------------------------------------------------------------------
    @property
    def full_widths(self) -> dict[str, tuple[int, int]]:
        """Every timed layer's (in, out) at full width."""
        return {n: (s.in_channels, s.out_channels) for n, s in self.specs.items()}

    @property
    def overhead_ms(self) -> float:
        """The whole model at full width minus the sum of its layers at full width (0 without calibration)."""
        if self.model_ms is None:
            return 0.0
        return self.model_ms - sum(self.times[n][w] for n, w in self.full_widths.items())

    def layer_ms(self, name: str, in_channels: int, out_channels: int) -> float:
        """One layer's time at (in, out): measured, or interpolated between measured widths.

        :param name: the layer's qualified name
        :param in_channels: its input channels (features)
        :param out_channels: its output channels (features)
        """
        if name not in self.specs:
            raise ValueError(f"layer '{name}' is not in the latency table")
        entries = self.times[name]
        i, o = int(in_channels), int(out_channels)
        if (i, o) in entries:
            return entries[(i, o)]
        if self.specs[name].depthwise:
            pts = sorted((a, ms) for (a, _), ms in entries.items())
            return _interp1(pts, i, name)
        ins = sorted({a for a, _ in entries})
        outs = sorted({b for _, b in entries})
        i0, i1 = _bracket(ins, i, name, "input")
        o0, o1 = _bracket(outs, o, name, "output")
        corners = [(a, b) for a in (i0, i1) for b in (o0, o1)]
        missing = next((c for c in corners if c not in entries), None)
        if missing is not None:
            raise LookupError(f"layer {name} was not measured at {missing}, needed to interpolate ({i}, {o})")
        ti = 0.0 if i1 == i0 else (i - i0) / (i1 - i0)
        to = 0.0 if o1 == o0 else (o - o0) / (o1 - o0)
        low = entries[(i0, o0)] * (1 - to) + entries[(i0, o1)] * to
        high = entries[(i1, o0)] * (1 - to) + entries[(i1, o1)] * to
        return low * (1 - ti) + high * ti

    def predict(self, widths: Mapping[str, tuple[int, int]] | None = None) -> float:
        """Predicted milliseconds per batch: the sum of the layers' times plus :attr:`overhead_ms`.

        :param widths: ``{layer: (in, out)}``; a layer not listed is at full width
        """
        widths = widths or {}
        unknown = next((n for n in widths if n not in self.specs), None)
        if unknown is not None:
            raise ValueError(f"layer '{unknown}' is not in the latency table")
        full = self.full_widths
        return self.overhead_ms + sum(self.layer_ms(n, *widths.get(n, full[n])) for n in self.specs)


def _default_root() -> Path:
    from autodfp.models.hub import cache_dir

    return cache_dir() / "latency"


def _bracket(values: list[int], x: int, name: str, side: str) -> tuple[int, int]:
    if not values or x < values[0] or x > values[-1]:
        span = f"{values[0]}-{values[-1]}" if values else "none"
        raise LookupError(f"layer {name}: {side} width {x} is outside the measured widths ({span})")
    lo = max(v for v in values if v <= x)
    hi = min(v for v in values if v >= x)
    return lo, hi


def _interp1(points: list[tuple[int, float]], x: int, name: str) -> float:
    lo, hi = _bracket([p for p, _ in points], x, name, "channel")
    t = dict(points)
    return t[lo] if hi == lo else t[lo] + (t[hi] - t[lo]) * (x - lo) / (hi - lo)


# -- plans → layer widths ---------------------------------------------------------------------
@dataclass
class _Roles:
    """How groups change one layer's widths: scaling groups per side, concat blocks on the input."""

    out_scale: list[str] = field(default_factory=list)
    in_scale: list[str] = field(default_factory=list)
    in_parts: list[str] = field(default_factory=list)


def _roles(graph: Any) -> dict[str, _Roles]:
    """Each layer's roles in the prunable groups, as :class:`autodfp.search.budget.MacsModel` reads them:
    producers (every member of a coupled stream) and depthwise pass-throughs scale their outputs,
    consumers their inputs (a concat group removes its block of the input instead)."""
    roles: dict[str, _Roles] = {}
    for g in graph.prunable:
        for conv in g.members if g.coupled and g.members else [g.producer.conv]:
            roles.setdefault(conv, _Roles()).out_scale.append(g.name)
        for st in g.passthrough:
            r = roles.setdefault(st.conv, _Roles())
            r.out_scale.append(g.name)
            r.in_scale.append(g.name)
        for c in g.consumers:
            r = roles.setdefault(c, _Roles())
            (r.in_parts if g.kind == "concat" else r.in_scale).append(g.name)
    return roles


def _width(full: int, scales: Iterable[Fraction], removed: int) -> int:
    v = Fraction(full)
    for s in scales:
        v *= s
    return max(1, round(v - removed))


def layer_widths(graph: Any, keep: Mapping[str, int], specs: Mapping[str, LayerSpec]) -> dict[str, tuple[int, int]]:
    """Each timed layer's (in, out) channels when group ``g`` keeps ``keep[g]``.

    Mirrors :class:`autodfp.search.budget.MacsModel`: ``keep`` is in the groups' units (channels,
    or channels per conv group next to a grouped conv); a layer scales by ``keep / units`` on the
    side a group touches (producers and coupled-stream members on the output, consumers on the
    input, a depthwise pass-through on both), and a concat group removes its channels from the
    input count.

    :param graph: the unpruned model's :class:`~autodfp.analysis.graph.GroupGraph`
    :param keep: kept units per group; groups not listed keep all
    :param specs: the layers at full width (``table.specs``)
    """
    units = {g.name: int(g.units) for g in graph.prunable}
    gran = {g.name: int(g.granularity) for g in graph.prunable}
    odd = next((g for g in keep if g not in units), None)
    if odd is not None:
        raise PlanError(f"unknown group '{odd}': not a prunable group of this model")
    for g, k in keep.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= units[g]:
            raise PlanError(f"group '{g}' keeps {k!r} of {units[g]} units; it must keep 1 to {units[g]}")
    roles = _roles(graph)
    out: dict[str, tuple[int, int]] = {}
    for name, s in specs.items():
        r = roles.get(name)
        if r is None:
            out[name] = (s.in_channels, s.out_channels)
            continue
        o = _width(s.out_channels, (Fraction(keep[g], units[g]) for g in r.out_scale if g in keep), 0)
        removed = sum((units[g] - keep[g]) * gran[g] for g in r.in_parts if g in keep)
        i = _width(s.in_channels, (Fraction(keep[g], units[g]) for g in r.in_scale if g in keep), removed)
        out[name] = (o, o) if s.depthwise else (i, o)
    return out


def ratio_keeps(graph: Any, ratios: Iterable[float] = (0.25, 0.5, 0.75, 1.0)) -> dict[str, list[int]]:
    """Candidate kept units per prunable group at the given preserved ratios (at least one unit).

    :param graph: the unpruned model's group graph
    :param ratios: preserved ratios to time; the search's plans fall between them and are interpolated
    """
    from autodfp.compress.plan import n_keep

    return {g.name: sorted({max(1, n_keep(int(g.units), float(r))) for r in ratios}) for g in graph.prunable}


def candidate_widths(
    graph: Any, specs: Mapping[str, LayerSpec], keeps: Mapping[str, Iterable[int]]
) -> dict[str, set[tuple[int, int]]]:
    """Every (in, out) a layer can take when each group keeps one of its candidate counts.

    A layer's input and output widths are combined as a full grid (every input width with every
    output width), so :meth:`LatencyTable.layer_ms` can interpolate any plan whose groups keep
    counts between the candidates. Full width is always included.

    :param graph: the unpruned model's group graph
    :param specs: the layers at full width (:func:`layer_specs`)
    :param keeps: ``{group: candidate kept units}`` (:func:`ratio_keeps`); other groups stay whole
    """
    units = {g.name: int(g.units) for g in graph.prunable}
    gran = {g.name: int(g.granularity) for g in graph.prunable}
    cand = {g: sorted({int(k) for k in ks} | {units[g]}) for g, ks in keeps.items() if g in units}
    roles = _roles(graph)

    def products(groups: list[str]) -> set[Fraction]:
        acc = {Fraction(1)}
        for g in groups:
            if g in cand:
                acc = {a * Fraction(k, units[g]) for a in acc for k in cand[g]}
        return acc

    out: dict[str, set[tuple[int, int]]] = {}
    for name, s in specs.items():
        r = roles.get(name, _Roles())
        removed = {0}
        for g in r.in_parts:
            if g in cand:
                removed = {a + (units[g] - k) * gran[g] for a in removed for k in cand[g]}
        outs = {_width(s.out_channels, [p], 0) for p in products(r.out_scale)}
        ins = {_width(s.in_channels, [p], rm) for p in products(r.in_scale) for rm in removed}
        pairs = {(o, o) for o in outs} if s.depthwise else {(i, o) for i in ins for o in outs}
        if s.groups > 1 and not s.depthwise:
            pairs = {(i, o) for i, o in pairs if i % s.groups == 0 and o % s.groups == 0}
        out[name] = pairs | {(s.in_channels, s.out_channels)}
    return out


def plan_latency(table: LatencyTable, graph: Any, keep: Mapping[str, int]) -> float:
    """Predicted milliseconds of the model pruned to ``keep`` (kept units per group).

    :param table: the unpruned model's latency table
    :param graph: its group graph (:func:`autodfp.analysis.graph.find_groups`)
    :param keep: kept units per group, as :meth:`autodfp.search.budget.MacsModel.macs` takes them
    """
    return table.predict(layer_widths(graph, keep, table.specs))


def _keep_of(plan: Any, graph: Any) -> dict[str, int]:
    if isinstance(plan, Mapping):
        return {str(g): int(k) for g, k in plan.items()}
    from autodfp.compress.plan import n_keep

    units = {g.name: int(g.units) for g in graph.prunable}
    return {g: max(1, n_keep(units[g], float(r))) for g, r in plan.ratios.items() if g in units}


def _pruned_copy(model: nn.Module, graph: Any, keep: Mapping[str, int], shape: tuple[int, ...]) -> nn.Module:
    """A copy of ``model`` with the last channels of each conv group's block removed (widths only)."""
    from autodfp.compress.surgery import prune_channels

    pruned: dict[str, list[int]] = {}
    for gname, k in keep.items():
        g = graph.get(gname)
        block = int(g.channels) // int(g.granularity)
        pruned[gname] = [b * block + j for b in range(int(g.granularity)) for j in range(int(k), block)]
    return prune_channels(copy.deepcopy(model).eval(), graph, pruned, shape)


def prediction_error(
    table: LatencyTable,
    model: nn.Module,
    graph: Any,
    plans: Sequence[Mapping[str, int] | Any],
    warmup: int = 5,
    repeats: int = MIN_REPEATS,
    timer: Timer | None = None,
) -> list[dict[str, Any]]:
    """How far the table's prediction is from the measured latency of each pruned plan, in %.

    The unpruned model and every plan's pruned copy are measured in one alternated run
    (:func:`measure_latency`) under the table's runtime, batch, device and threads.

    :param table: the unpruned model's table
    :param model: the unpruned model (copied and pruned by width, with no compensation: timing
        needs only the shapes)
    :param graph: its group graph
    :param plans: kept units per group (``{group: k}``) or :class:`~autodfp.compress.plan.Plan` s
    :param warmup: untimed passes per model
    :param repeats: timed passes per model (at least :data:`MIN_REPEATS`)
    :param timer: injected ``timer(name, run) -> ms`` (tests)
    :returns: one row per plan, the unpruned model first (``plan`` is ``"full"``):
        ``{"plan", "predicted_ms", "measured_ms", "error_pct"}``, with error
        ``100 · (predicted − measured) / measured``
    """
    keeps = [_keep_of(p, graph) for p in plans]
    models: dict[str, nn.Module] = {"full": model}
    for n, k in enumerate(keeps):
        models[f"plan{n}"] = _pruned_copy(model, graph, k, table.input_shape)
    rep = measure_latency(
        models, table.input_shape, table.runtime, (table.batch,), table.device, warmup, repeats, table.threads, timer
    )
    rows = []
    for name, k in zip(models, [{}, *keeps]):
        predicted = plan_latency(table, graph, k)
        measured = rep.median(name, table.batch)
        rows.append(
            {
                "plan": name,
                "predicted_ms": predicted,
                "measured_ms": measured,
                "error_pct": 100.0 * (predicted - measured) / measured if measured > 0 else math.nan,
            }
        )
    return rows


# -- the report section -------------------------------------------------------------------------
def latency_section(
    original: nn.Module | None,
    pruned: nn.Module,
    input_shape: Sequence[int],
    runtimes: Sequence[str] = ("torch",),
    batch_sizes: Sequence[int] = (1, 8, 32),
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = MIN_REPEATS,
    threads: int | None = None,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """The ``"latency"`` section of ``report.json`` (schema in the module docstring).

    The two models are measured together and alternated, per runtime (:func:`measure_latency`).

    :param original: the unpruned model (``before``); None measures ``pruned`` alone
    :param pruned: the pruned model (``after``)
    :param input_shape: one input without the batch
    :param runtimes: runtimes to measure, each of :data:`RUNTIMES`
    :param batch_sizes: batch sizes to measure
    :param device: where the models run
    :param warmup: untimed passes per model and batch size
    :param repeats: timed passes per model and batch size (at least :data:`MIN_REPEATS`)
    :param threads: intra-op threads (default: PyTorch's current count)
    :param timer: injected ``timer(name, run) -> ms`` (tests)
    """
    names = [check_runtime(r) for r in runtimes]
    if not names:
        raise PlanError("no runtime to measure; give at least one of " + ", ".join(RUNTIMES))
    if len(set(names)) != len(names):
        raise PlanError("a runtime is listed twice")
    sizes = check_batch_sizes(batch_sizes)
    shape = _check_shape(input_shape)
    _check_counts(warmup, repeats, threads)
    dev = _resolve_device(device)
    models = {"after": pruned} if original is None else {"before": original, "after": pruned}
    section: dict[str, Any] = {
        "format": FORMAT,
        "device": str(dev),
        "device_name": _device_name(dev),
        "torch_version": str(torch.__version__),
        "onnxruntime_version": _ort_version(),
        "input_shape": list(shape),
        "batch_sizes": list(sizes),
        "warmup": warmup,
        "repeats": repeats,
        "runtimes": {},
    }
    for rt in names:
        rep = measure_latency(models, shape, rt, sizes, dev, warmup, repeats, threads, timer)
        rows = []
        for b in sizes:
            before = rep.timings["before"][b] if "before" in rep.timings else None
            after = rep.timings["after"][b]
            rows.append(
                {
                    "batch": b,
                    "before": None if before is None else before.to_dict(),
                    "after": after.to_dict(),
                    "speedup": None if before is None else before.median_ms / max(after.median_ms, 1e-12),
                }
            )
        section["runtimes"][rt] = {"threads": rep.threads, "provider": rep.provider, "batches": rows}
    return section


_TIMING_KEYS = {"median_ms": float, "p10_ms": float, "p90_ms": float, "iqr_ms": float, "runs": int}


def _is(v: Any, t: type) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, float)) if t is float else isinstance(v, t)


def check_section(section: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``section`` that breaks the schema (module doc).

    :param section: a :func:`latency_section` object, or one read back from ``report.json``
    """

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(f"latency section: {what}")

    need(isinstance(section, dict), "not an object")
    top = {
        "format": str,
        "device": str,
        "device_name": str,
        "torch_version": str,
        "input_shape": list,
        "batch_sizes": list,
        "warmup": int,
        "repeats": int,
        "runtimes": dict,
    }
    for k, t in top.items():
        need(k in section and _is(section[k], t), f"'{k}' must be a {t.__name__}")
    need(section["format"] == FORMAT, f"'format' must be '{FORMAT}'")
    need(
        "onnxruntime_version" in section
        and (section["onnxruntime_version"] is None or _is(section["onnxruntime_version"], str)),
        "'onnxruntime_version' must be a str or null",
    )
    need(all(_is(d, int) for d in section["input_shape"]), "'input_shape' must hold integers")
    sizes = section["batch_sizes"]
    need(all(_is(b, int) for b in sizes), "'batch_sizes' must hold integers")
    need(bool(section["runtimes"]), "'runtimes' is empty")
    for rt, entry in section["runtimes"].items():
        where = f"runtimes.{rt}"
        need(rt in RUNTIMES, f"unknown runtime '{rt}'")
        need(isinstance(entry, dict), f"'{where}' must be an object")
        need(_is(entry.get("threads"), int), f"'{where}.threads' must be an int")
        need("provider" in entry and (entry["provider"] is None or _is(entry["provider"], str)), f"'{where}.provider'")
        rows = entry.get("batches")
        need(
            isinstance(rows, list)
            and all(isinstance(r, dict) for r in rows)
            and [r.get("batch") for r in rows] == sizes,
            f"'{where}.batches' must follow batch_sizes",
        )
        for row in rows:
            for side in ("before", "after"):
                t = row.get(side, "missing")
                if side == "before" and t is None:
                    continue
                need(isinstance(t, dict), f"'{where}.batches[].{side}' must be a timing")
                for k, typ in _TIMING_KEYS.items():
                    need(_is(t.get(k), typ), f"'{where}.batches[].{side}.{k}' must be a {typ.__name__}")
            sp = row.get("speedup", "missing")
            need(sp is None if row["before"] is None else _is(sp, float), f"'{where}.batches[].speedup'")


def plot_latency(section: Mapping[str, Any], title: str = "") -> bytes:
    """A PNG of latency against batch size: one colour per runtime, before dashed, after solid,
    with bars from the 10th to the 90th percentile (log-log axes: latency spans decades).

    :param section: a :func:`latency_section` object
    :param title: the plot's title (the model's name)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for n, (rt, entry) in enumerate(section["runtimes"].items()):
            colour = colours[n % len(colours)]
            for side, style in (("before", "--"), ("after", "-")):
                rows = [r for r in entry["batches"] if r.get(side) is not None]
                if not rows:
                    continue
                xs = [r["batch"] for r in rows]
                med = [r[side]["median_ms"] for r in rows]
                err = [
                    [m - r[side]["p10_ms"] for m, r in zip(med, rows)],
                    [r[side]["p90_ms"] - m for m, r in zip(med, rows)],
                ]
                label = f"{rt} {'original' if side == 'before' else 'pruned'} ({entry['threads']} threads)"
                ax.errorbar(xs, med, yerr=err, fmt=style + "o", color=colour, label=label, capsize=3, markersize=4)
        ax.set_xscale("log", base=2)
        sizes = section.get("batch_sizes") or []
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch (ms, median; bars p10-p90)")
        ax.set_title(title or f"latency on {section.get('device_name') or section.get('device')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()
