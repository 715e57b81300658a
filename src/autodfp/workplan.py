"""The plan of work of a :func:`autodfp.prune` call, and how long it will take here, in its first seconds.

A prune can take twenty seconds or two hours, depending on the model, the input size, the effort
preset, the device and on what the synthetic-input cache already holds. A user who starts one
should learn which it is before the minutes are spent, not from a progress bar an hour later. So
:func:`plan_work` lists the stages the call will run, in order, each with its sizes:

- **synthesis**: every synthetic batch (purpose, inputs, steps, the share at reduced size) and
  whether its chunks are already in the on-disk cache (the very files the synthesis would read,
  named by :func:`autodfp.synth.distill.cache_entry_paths`) or made earlier in the same run;
- **search**: method, episodes, reward calls;
- **pruning**: the correlations on the calibration batch and the final plan's decisions;
- **refinement**: the fitting units and the dims ridges scored;
- **final choice**: the candidates and their reward calls;
- **distillation**: steps and the pool they draw from.

A stage that will not run is absent. Each gets an estimate in seconds for this machine and device,
extrapolated from a few timed steps of the real primitives (:class:`_Probe`): a synthesis step at
each resolution, a forward pass at the batch the reward and refinement use, one refinement, one
decision of every group, a few distillation steps, a SAC gradient step. A primitive is timed only
where the work that depends on it is at least :data:`PROBE_WORTH` times the probe's own cost;
elsewhere a rough multiple of one forward pass stands in. So the estimate never costs more than a
few percent of the run it estimates (a test's two-step run is not slowed by a long probe), and a
long run gets measured figures. The probe runs on noise inputs under a forked RNG, on copies
where it trains, so the run that follows computes exactly what it would have without it.

The figures are estimates: a run shares its CPU with whatever else runs (a second process can
double every step), the search's decisions are memoised at a rate that depends on the agent, and
the distillation's student is smaller than the probe's. ``benchmarks/estimate.py`` measures the
error against real runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from autodfp.config import MICRO_BATCH_PIXELS

if TYPE_CHECKING:  # pragma: no cover
    from autodfp.analysis.graph import GroupGraph
    from autodfp.api import Pipeline
    from autodfp.compress.plan import Plan
    from autodfp.search.budget import MacsModel

#: Steps each timed synthesis or distillation probe runs; only the last is timed (the first
#: allocates the optimiser's state and warms the allocator up).
PROBE_STEPS = 2
#: A primitive is timed only where the seconds that depend on it are at least this many times the
#: probe's own: the probe then costs at most 1/PROBE_WORTH of what it measures.
PROBE_WORTH = 20.0
#: No further probe starts once the probes have spent this many seconds (a safety net: on a CPU
#: that is far busier than usual the remaining stages keep their rough figures).
PROBE_BUDGET_SECONDS = 30.0
#: Input pixels per probe batch on a CPU, as many as one micro-batch of a step holds
#: (:data:`autodfp.config.MICRO_BATCH_PIXELS`): a 224-px step runs in parts of that size, so timing
#: one part and multiplying by the parts is what the step costs.
PROBE_PIXELS = MICRO_BATCH_PIXELS
#: Largest probe batch (a chunk of synthetic inputs holds 64).
PROBE_MAX_BATCH = 64

# Rough multiples of one no-grad forward pass of the same inputs, for primitives not timed. Measured
# on a 2-core CPU (ResNet-20, ResNet-56 at 32 px, MobileNet-V1 at 224 px in parts of eight): a
# synthesis step cost 3.5-5.8 forward passes, a distillation step with the unpruned model as student
# 4-4.9, a refinement's fits 1-2 forward passes of the search's 64 inputs, the calibration's
# correlations about 3.
SYNTH_STEP_FORWARDS = 4.0
DISTILL_STEP_FORWARDS = 4.5
REFINE_FIT_FORWARDS = 1.5
CALIBRATION_FORWARDS = 3.0
#: forward passes a synthesised chunk costs beyond its steps (its objective before and after)
REPORT_FORWARDS = 2
#: seconds per group of a decision (selection and lsq reconstruction) when not timed: 0.005-0.03 s
#: for ResNet-56's 16-64 channels, up to 0.6 s for MobileNet-V1's 768
DECIDE_GROUP_SECONDS = 0.03
#: Share of an episode's group decisions that are computed rather than found in the search's memo
#: (:meth:`autodfp.search.env.PruningEnv.decide`): the agent keeps revisiting the same counts.
DECIDE_MISS = 0.25
#: A SAC gradient step (two critics, their targets, the actor, the entropy coefficient) in passes
#: of one 256-256 MLP forward, backward and Adam step at batch 256: 33 ms against 7.7 ms measured
#: side by side.
SAC_STEP_MLPS = 4.5
#: SAC's gradient step when not timed, and the agent's one-off set-up (importing SB3, its networks)
SAC_STEP_SECONDS = 0.01
SAC_SETUP_SECONDS = 2.5
#: MLP passes the SAC probe runs (the first two warm up; the median of the rest counts)
SAC_PROBE_PASSES = 12
#: a critic's inputs: the observation (28 features, :data:`autodfp.search.env.OBS_NAMES`) and the action
SAC_INPUTS = 30

STAGES = ("synthesis", "search", "pruning", "refinement", "final choice", "distillation")


# ---------------------------------------------------------------------------------------------
# What the plan says
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """One chunk of a synthetic batch: a cache file of its own (:data:`autodfp.synth.distill.CHUNK`).

    :param inputs: inputs in the chunk
    :param seed: the chunk's seed
    :param path: its cache file, as :func:`autodfp.synth.distill.cache_entry_paths` names it
    :param cached: the file exists now, so the chunk is read, not distilled
    :param reused: an earlier batch of the same run makes it (a prefix shared by two purposes)
    """

    inputs: int
    seed: int
    path: str
    cached: bool
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "seed": self.seed,
            "path": self.path,
            "cached": self.cached,
            "reused": self.reused,
        }


@dataclass
class SynthBatch:
    """A synthetic batch the run asks for, in the order it asks.

    :param purpose: what it is for (``calibration``, ``refinement``, ``reward``, ``reward (final
        choice)``, ``distillation pool`` and the pool's share of the earlier batches)
    :param inputs: inputs in the batch
    :param seed: the batch's seed (chunk ``i`` adds ``i`` × :data:`~autodfp.synth.distill.CHUNK_SEED_STRIDE`)
    :param method: the resolved synthesis method
    :param steps: optimisation steps of each chunk
    :param low_res: share of the steps run at reduced size (0 where no reduced size is used)
    :param low_res_sizes: those sizes, ``(H, W)``, smallest first
    :param chunks: its chunks, each with its cache file
    :param seconds: estimated seconds to distil the chunks that are neither cached nor reused
    """

    purpose: str
    inputs: int
    seed: int
    method: str
    steps: int
    low_res: float
    low_res_sizes: list[tuple[int, int]]
    chunks: list[Chunk]
    seconds: float = 0.0

    @property
    def cached(self) -> bool:
        """Every chunk is on disk already."""
        return all(c.cached for c in self.chunks)

    @property
    def reused(self) -> bool:
        """Every chunk is made by an earlier batch of the run (and none was on disk)."""
        return not self.cached and all(c.cached or c.reused for c in self.chunks)

    @property
    def to_make(self) -> int:
        """Chunks this batch distils itself."""
        return sum(not (c.cached or c.reused) for c in self.chunks)

    def describe(self) -> str:
        text = f"{self.purpose} {self.inputs} × {self.steps} steps"
        if self.low_res and self.low_res_sizes:
            text += f" ({self.low_res:.0%} at {', '.join(f'{h}x{w}' for h, w in self.low_res_sizes)})"
        if self.cached:
            text += " (cached)"
        elif self.reused:
            text += " (made above)"
        elif self.to_make < len(self.chunks):
            text += f" ({len(self.chunks) - self.to_make} of {len(self.chunks)} chunks ready)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose,
            "inputs": self.inputs,
            "seed": self.seed,
            "method": self.method,
            "steps": self.steps,
            "low_res": self.low_res,
            "low_res_sizes": [list(s) for s in self.low_res_sizes],
            "cached": self.cached,
            "reused": self.reused,
            "seconds": round(self.seconds, 2),
            "chunks": [c.to_dict() for c in self.chunks],
        }


@dataclass
class Stage:
    """One stage of the run.

    :param name: one of :data:`STAGES`
    :param summary: its sizes, in words (``sac, 100 episodes, 100 reward calls on 256 inputs``)
    :param sizes: the same as numbers, for scripts
    :param seconds: estimated seconds on this machine and device
    :param measured: the estimate rests on primitives timed here, not only on rough multiples of a
        forward pass
    """

    name: str
    summary: str
    sizes: dict[str, Any]
    seconds: float
    measured: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "sizes": dict(self.sizes),
            "seconds": round(self.seconds, 2),
            "measured": self.measured,
        }


@dataclass
class WorkPlan:
    """What a :func:`autodfp.prune` call will do, in order, and how long each stage should take.

    ``str(plan)`` (:meth:`render`) is a short text block, one line per stage and the total; the
    report of a run holds :meth:`to_dict` as ``work_plan``, beside the real ``seconds``.

    :param model: the model's name
    :param input_shape: (C, H, W) of one input
    :param device: where the forward passes run
    :param threads: torch's CPU threads
    :param stages: the stages that will run, in order
    :param batches: the synthetic batches, in the order the run asks for them
    :param probe_seconds: what making this plan cost (the timed probes included)
    :param notes: what the estimate leaves out (a user reward callable, a failed probe)
    :param probes: seconds of each timed probe, by what it timed
    """

    model: str
    input_shape: tuple[int, ...]
    device: str
    threads: int
    stages: list[Stage]
    batches: list[SynthBatch] = field(default_factory=list)
    probe_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    probes: dict[str, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        """The estimate of the whole run: the sum of its stages."""
        return float(sum(s.seconds for s in self.stages))

    @property
    def names(self) -> list[str]:
        """The stages' names, in order."""
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Stage | None:
        """The stage called ``name``, or ``None`` where the run has none."""
        return next((s for s in self.stages if s.name == name), None)

    def render(self) -> str:
        """The plan as a few lines: the device, one line per stage with its estimate, the total."""
        where = f"{self.device}, {self.threads} threads" if self.device == "cpu" else self.device
        lines = [f"plan of work (estimated on {where}, in {self.probe_seconds:.1f} s):"]
        width = max([len(s.name) for s in self.stages] + [5])
        for s in self.stages:
            lines.append(f"  {s.name:<{width}}  {format_duration(s.seconds):>9}  {s.summary}")
        lines.append(f"  {'total':<{width}}  {format_duration(self.total_seconds):>9}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = render

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every figure rounded, every stage and batch with its sizes."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "device": self.device,
            "threads": self.threads,
            "probe_seconds": round(self.probe_seconds, 2),
            "total_seconds": round(self.total_seconds, 2),
            "stages": [s.to_dict() for s in self.stages],
            "batches": [b.to_dict() for b in self.batches],
            "notes": list(self.notes),
            "probes": {k: round(v, 3) for k, v in self.probes.items()},
        }


def format_duration(seconds: float) -> str:
    """``~12 s``, ``~4.1 min``, ``~19 min`` or ``~2.3 h``: as precise as an estimate deserves."""
    if seconds < 60:
        return f"~{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 10:
        return f"~{minutes:.1f} min"
    if minutes < 120:
        return f"~{minutes:.0f} min"
    return f"~{minutes / 60:.1f} h"


# ---------------------------------------------------------------------------------------------
# Timing the primitives
# ---------------------------------------------------------------------------------------------
def _pixels(shape: Sequence[int]) -> int:
    return max(1, math.prod(int(s) for s in shape[1:]))


class _Probe:
    """Times the primitives of a run on its device, on noise inputs, and remembers what it spent.

    Every figure is seconds per input (per step, where there are steps), so that a probe on a
    batch of a few 224-px inputs (one micro-batch of a real step) scales to a chunk of 64. Nothing
    it runs touches the caller's RNG streams or trains the model: training runs on a copy.
    """

    def __init__(self, model: nn.Module, device: torch.device, shape: tuple[int, ...], enabled: bool) -> None:
        self.model = model
        self.device = device
        self.shape = shape
        self.enabled = enabled
        self.spent = 0.0
        #: seconds each probe took, by what it timed
        self.timings: dict[str, float] = {}
        self.failures: list[str] = []
        self._gen = torch.Generator().manual_seed(0)

    def batch_size(self, shape: Sequence[int], cap: int = PROBE_MAX_BATCH) -> int:
        """Inputs of one probe at ``shape``: one micro-batch's pixels on a CPU, ``cap`` elsewhere."""
        if self.device.type != "cpu":
            return cap
        return max(2, min(cap, PROBE_PIXELS // _pixels(shape)))

    def noise(self, n: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        return torch.randn((n, *(shape or self.shape)), generator=self._gen)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def affordable(self, worth: float) -> bool:
        """Whether a probe whose work is worth ``worth`` probes' cost may run now."""
        return self.enabled and worth >= PROBE_WORTH and self.spent < PROBE_BUDGET_SECONDS

    @contextlib.contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Count the block's seconds as probing; a failure is noted and leaves the rough figure."""
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
                yield
        except Exception as exc:  # an estimate must never stop a run: the rough figure stays
            self.failures.append(f"{what} not timed ({type(exc).__name__}: {str(exc)[:80]})")
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0
            self.spent += time.perf_counter() - t0

    def forward(self, n: int) -> float:
        """Seconds per input of a no-grad forward pass of ``n`` inputs (after one of two, to warm up)."""
        from autodfp._modes import eval_mode

        x = self.noise(n).to(self.device)
        with eval_mode(self.model), torch.no_grad():
            self.model(x[:2])
            self._sync()
            t0 = time.perf_counter()
            self.model(x)
            self._sync()
        return (time.perf_counter() - t0) / n

    def synthesis_step(self, shape: Sequence[int], method: str, label_offset: int) -> float:
        """Seconds per input and step of a synthesis at ``shape`` (the real objective and code path)."""
        from autodfp.synth.distill import distill

        m = self.batch_size(shape)
        stamps: list[float] = []

        def stamp(_step: int, _loss: float) -> None:
            stamps.append(time.perf_counter())

        distill(
            self.model,
            tuple(shape),
            n=m,
            steps=PROBE_STEPS,
            seed=0,
            method=method,
            label_offset=label_offset,
            callback=stamp,
        )
        return (stamps[-1] - stamps[-2]) / m

    def distillation_step(self, temperature: float, student: nn.Module | None = None) -> float:
        """Seconds per input and step of a distillation: the teacher's pass, the student's pass and
        gradient, and the optimiser's step.

        :param student: the student to time (a copy is trained); the unpruned model by default
        """
        from autodfp._modes import eval_mode
        from autodfp.compress.kd import _backward

        m = self.batch_size(self.shape)
        student = copy.deepcopy(self.model if student is None else student).to(self.device).eval()
        params = [p for p in student.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-4)
        x = self.noise(m).to(self.device)
        times = []
        with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad():
            for _ in range(PROBE_STEPS):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                _backward(student, self.model, x, temperature, m)
                opt.step()
                self._sync()
                times.append(time.perf_counter() - t0)
        return times[-1] / m


def _sac_step_seconds() -> float:
    """One SAC gradient step, timed as :data:`SAC_STEP_MLPS` passes of a 256-256 MLP at batch 256
    (median of ten after a warm-up): the agent's networks, without importing SB3 or the environment
    for it (seconds of imports the search pays anyway)."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(SAC_INPUTS, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
        opt = torch.optim.Adam(net.parameters(), lr=3e-4)
        x = torch.randn((256, SAC_INPUTS), generator=gen)
        times = []
        for _ in range(SAC_PROBE_PASSES):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            net(x).pow(2).mean().backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return SAC_STEP_MLPS * sorted(times[2:])[len(times[2:]) // 2]


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclass
class _Rates:
    """Seconds of the run's primitives, rough (multiples of one forward pass) until a probe times them."""

    #: per input, a no-grad forward pass at the probe's batch size
    forward: float
    #: per input, a forward pass at the batch the reward and the refinement run whole
    batch_forward: float
    #: per input, a distillation step with the unpruned model as its own student
    distillation: float
    #: a refinement call beyond its forward pass (its fits; nearly independent of the inputs, whose
    #: positions per layer are capped)
    refine_fits: float
    #: deciding every group of a plan (selection and reconstruction)
    decide: float
    #: one SAC gradient step
    sac_step: float
    #: per input and step, a synthesis step at each stage's input shape
    synthesis: dict[tuple[int, ...], float] = field(default_factory=dict)
    #: per input, a distillation step with a student of the pruned model's size (a uniformly pruned
    #: copy), when a probe timed one: narrow layers run below their MACs' share of the time on a
    #: CPU, so scaling the unpruned model's step by the MACs underestimates the stage
    pruned_distillation: float | None = None
    #: the primitives a probe timed
    measured: set[str] = field(default_factory=set)

    def fwd(self, n: int) -> float:
        return n * self.batch_forward

    def synth(self, shape: tuple[int, ...], full: tuple[int, ...]) -> float:
        """A synthesis step's seconds per input at ``shape``; roughly, forward passes scaled by pixels."""
        if shape not in self.synthesis:
            self.synthesis[shape] = SYNTH_STEP_FORWARDS * self.forward * _pixels(shape) / _pixels(full)
        return self.synthesis[shape]


#: a synthesised chunk's stages, ``(input shape, steps)``, smallest first (:func:`autodfp.synth.distill._stages`)
_Schedule = list[tuple[tuple[int, ...], int]]


class _Schedules:
    """The stage schedule of a chunk by its step count, computed once per count (it probes whether
    the model runs at each reduced size, as the synthesis does)."""

    def __init__(self, pipe: Pipeline) -> None:
        from autodfp.synth.distill import resolve_method

        self.pipe = pipe
        self.settings = pipe.synth_settings()
        self.method = resolve_method(pipe.model, self.settings["method"])
        self._memo: dict[int, _Schedule] = {}

    def default_steps(self) -> int:
        from autodfp.synth.distill import default_settings

        steps = self.settings["steps"]
        return int(steps) if steps is not None else default_settings(self.method, self.pipe.shape)[0]

    def __call__(self, steps: int) -> _Schedule:
        from autodfp.synth.distill import _stages

        if steps not in self._memo:
            shape = tuple(int(s) for s in self.pipe.shape)
            if self.method == "noise":
                self._memo[steps] = [(shape, 0)]
            else:
                self._memo[steps] = _stages(
                    self.pipe.device_model,
                    shape,
                    self.method,
                    steps,
                    float(self.settings["low_res"]),
                    int(self.settings["low_res_levels"]),
                    self.pipe.device,
                )
        return self._memo[steps]


def _chunk_seconds(rates: _Rates, full: tuple[int, ...], n: int, schedule: _Schedule) -> float:
    """Seconds to distil one chunk of ``n`` inputs: its steps at each size, and its objective
    measured before and after (two forward passes)."""
    steps = sum(count * n * rates.synth(shape, full) for shape, count in schedule)
    return steps + REPORT_FORWARDS * n * rates.forward


def _batches(
    pipe: Pipeline,
    schedules: _Schedules,
    calibrating: bool,
    searching: bool,
    selecting: bool,
    synthetic_reward: bool,
    distill_steps: int,
    cache_dir: str | Path | None,
) -> list[SynthBatch]:
    """The synthetic batches :func:`autodfp.prune` asks the pipeline for, in its order, each chunk
    with its cache file and whether it is on disk or made by an earlier batch of the run.

    The order and the seeds follow ``prune``: the calibration batch (a prefix of the refinement's),
    the refinement's, the reward's, then the distillation's pool (the reward batch at ranking steps,
    the refinement batch and the pool's own extra inputs, seed + 2).
    """
    from autodfp.api import DISTILL_SEED_OFFSET
    from autodfp.synth.distill import _chunks, _low_res_shapes, cache_entry_paths

    cfg = pipe.config
    shape = tuple(int(s) for s in pipe.shape)
    settings, method = schedules.settings, schedules.method
    fit_steps = schedules.default_steps()
    ranking = cfg.reward_steps_for(method, shape, False)
    n_rw, n_ref = cfg.reward_inputs_for(shape), cfg.refine_inputs_for(shape)
    synthetic_fit = cfg.refine_data is None  # otherwise the fits read real images
    seed, fit_seed = pipe.seed, pipe.seed + cfg.refine_seed_offset
    wanted: list[tuple[str, int, int, int]] = []
    if calibrating and synthetic_fit:
        wanted.append(("calibration", cfg.calibration_inputs, fit_seed, fit_steps))
    if cfg.refine and synthetic_fit:
        wanted.append(("refinement", n_ref, fit_seed, fit_steps))
    if synthetic_reward and searching:
        wanted.append(("reward", n_rw, seed, ranking))
    elif synthetic_reward and selecting:
        select = cfg.reward_steps_for(method, shape, True)
        wanted.append(("reward (final choice)", min(cfg.select_inputs, n_rw), seed, select))
    if distill_steps:
        wanted.append(("distillation pool: reward batch", n_rw, seed, ranking))
        if synthetic_fit:
            wanted.append(("distillation pool: refinement batch", n_ref, fit_seed, fit_steps))
        extra = cfg.distill_inputs_for(shape, pipe.device)
        if extra:
            wanted.append(("distillation pool", extra, seed + DISTILL_SEED_OFFSET, fit_steps))
    low_res = float(settings["low_res"])
    levels = int(settings["low_res_levels"])
    reduced = [(s[1], s[2]) for s in _low_res_shapes(shape, method, levels)] if low_res else []
    seen: set[str] = set()
    batches = []
    for purpose, n, batch_seed, steps in wanted:
        paths = cache_entry_paths(
            pipe.model,
            pipe.cache_key,
            shape,
            n,
            batch_seed,
            method,
            steps,
            None,
            int(settings["label_offset"]),
            low_res,
            levels,
            cache_dir,
        )
        chunks = []
        for (size, chunk_seed), path in zip(_chunks(n, batch_seed, shape), paths, strict=True):
            cached = path.is_file()
            chunks.append(Chunk(size, chunk_seed, str(path), cached, not cached and str(path) in seen))
            seen.add(str(path))
        batches.append(SynthBatch(purpose, n, batch_seed, method, steps, low_res if reduced else 0.0, reduced, chunks))
    return batches


def _time_synthesis(probe: _Probe, rates: _Rates, schedules: _Schedules, batches: list[SynthBatch]) -> None:
    """Time a synthesis step at each input size where the chunks to distil spend enough steps
    (most first, while the probes' budget lasts)."""
    work: dict[tuple[int, ...], int] = {}  # input-steps at each size
    for b in batches:
        for c in b.chunks:
            if not (c.cached or c.reused):
                for shape, count in schedules(b.steps):
                    work[shape] = work.get(shape, 0) + count * c.inputs
    for shape, input_steps in sorted(work.items(), key=lambda kv: -kv[1]):
        probe_cost = (PROBE_STEPS + 1) * probe.batch_size(shape)  # in input-steps
        if not probe.affordable(input_steps / probe_cost):
            continue
        with probe.timing(f"synthesis at {shape[1]}x{shape[2]}" if len(shape) == 3 else "synthesis"):
            label_offset = int(schedules.settings["label_offset"])
            rates.synthesis[shape] = probe.synthesis_step(shape, schedules.method, label_offset)
            rates.measured.add("synthesis")


def _uniform_student(pruner: Any, graph: GroupGraph, share: float, macs_model: MacsModel | None) -> nn.Module | None:
    """A copy of the model pruned uniformly to ``share`` of its MACs (by filter norm, nothing
    reconstructed): a student of the pruned model's size to time a distillation step on. None where
    it cannot be built (the estimate then scales the unpruned model's step by the MACs)."""
    from autodfp.compress.plan import Plan
    from autodfp.search.budget import MacsModel

    try:
        mm = macs_model if macs_model is not None else MacsModel(pruner.model, graph, pruner.input_shape)
        ratio = mm.fit_uniform(share * mm.total_macs)
    except Exception:  # an infeasible share for a uniform plan: a ratio whose square is the share
        ratio = max(0.05, math.sqrt(share))
    try:
        return pruner.apply(Plan.uniform(graph, ratio, criterion="l1", strategy="none")).model
    except Exception:  # an estimate never stops a run
        return None


def _probe_pruner(pipe: Pipeline, graph: GroupGraph, probe: _Probe) -> Any:
    """A pruner of the model for timing decisions and a refinement: filter geometry, and a noise
    calibration batch only where the model needs one for its statistics (no BN, coupled or SE groups)."""
    from autodfp.compress.surgery import Pruner

    calibration = None
    if pipe.needs_calibration("geometry", graph):
        calibration = probe.noise(min(pipe.config.calibration_inputs, PROBE_MAX_BATCH))
    return Pruner(
        pipe.model,
        pipe.shape,
        graph=graph,
        calibration=calibration,
        corr_source="geometry",
        coupled=pipe.config.coupled,
    )


def _time_refinement(probe: _Probe, rates: _Rates, pipe: Pipeline, pruner: Any, graph: GroupGraph, n: int) -> None:
    """One refinement of a uniform plan on ``n`` noise inputs: its targets' pass gives the forward
    pass at the batch the search runs whole, and the call beyond it the fits."""
    from autodfp.compress.plan import Plan
    from autodfp.compress.refine import Refiner

    cfg = pipe.config
    decisions = pruner.decide(Plan.uniform(graph, 0.5, criterion="l1", strategy="none"))
    refiner = Refiner(
        pruner,
        probe.noise(n),
        ridge=cfg.refine_ridge,
        dims_ridge=cfg.search_dims_ridge,
        max_positions=cfg.refine_max_positions,
        device=pipe.device,
    )
    refiner._work_model()  # the copy on the device is made once per run, not per call: left out
    t0 = time.perf_counter()
    refiner.targets()
    t1 = time.perf_counter()
    refiner(decisions)
    t2 = time.perf_counter()
    rates.batch_forward = (t1 - t0) / n
    rates.refine_fits = max(0.1 * (t2 - t1), (t2 - t1) - (t1 - t0))
    rates.measured |= {"forward", "refine"}


def _time_decide(pruner: Any, graph: GroupGraph, strategy: str, criterion: str) -> float:
    """Seconds to decide every group of a uniform plan with the run's strategy and criterion."""
    from autodfp.compress.plan import Plan

    plan = Plan.uniform(graph, 0.5, criterion=criterion, strategy=strategy)
    t0 = time.perf_counter()
    pruner.decide(plan)
    return time.perf_counter() - t0


def _student_macs(
    pipe: Pipeline,
    graph: GroupGraph,
    macs_ratio: float | None,
    uniform: float | None,
    plan: Plan | None,
    macs_model: MacsModel | None,
) -> float:
    """The pruned model's share of the MACs: what a distillation step's student costs against the
    original's. The budget when searching; else counted for the plan (1 where it cannot be)."""
    if macs_ratio is not None:
        return float(macs_ratio)
    try:
        from autodfp.compress.plan import Plan
        from autodfp.search.budget import MacsModel

        mm = macs_model if macs_model is not None else MacsModel(pipe.model, graph, pipe.shape)
        the_plan = plan if plan is not None else Plan.uniform(graph, float(uniform or 1.0))
        return min(1.0, mm.macs_for_plan(the_plan) / max(1, mm.total_macs))
    except Exception:  # an estimate: the unpruned size is an upper bound
        return 1.0


def _guessed_forward(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Seconds per input of a forward pass, guessed from the MACs when nothing may be timed: a CPU
    thread at about 2 GMAC/s (ResNet-56 at 32 px, 2 threads: ~1.6 ms an input), an accelerator 500x that."""
    from autodfp.eval.metrics import profile

    try:
        macs = float(profile(model, shape).total_macs)
    except Exception:
        macs = 1e8
    rate = 2e9 * torch.get_num_threads() if device.type == "cpu" else 1e12
    return macs / rate


def _reward_text(reward: Any, n: int, calls: int) -> str:
    if callable(reward):
        return f"{calls} calls of your reward"
    return f"{calls} reward calls on {n} inputs"


def plan_work(
    pipe: Pipeline,
    graph: GroupGraph,
    *,
    macs_ratio: float | None = None,
    uniform: float | None = None,
    plan: Plan | None = None,
    search: str = "sac",
    reward: Any = "synthetic",
    macs_model: MacsModel | None = None,
    probe: bool = True,
    cache_dir: str | Path | None = None,
) -> WorkPlan:
    """The stages :func:`autodfp.prune` will run for this pipeline and budget, with an estimate.

    Give one of ``macs_ratio`` (a search), ``uniform`` or ``plan``, as to ``prune``. What shapes the
    run (the batches and their seeds, the correlation source, whether a reward is needed, the final
    choice) is read from the same :class:`~autodfp.api.Pipeline` methods and config fields that
    ``prune`` reads, so the plan names what the run will do. Nothing is synthesised or written.

    :param pipe: the run's pipeline (its config resolved for the input size and device)
    :param graph: the model's channel groups
    :param macs_ratio: the search's budget
    :param uniform: the uniform ratio
    :param plan: the given plan (its strategy and criterion are the run's)
    :param search: the search method
    :param reward: the reward spec or callable
    :param macs_model: the budget's MACs model, if built already (for the student's size)
    :param probe: time the primitives here; without, every figure is a multiple of a forward pass
        guessed from the MACs, and nothing runs on the model but that count
    :param cache_dir: the synthetic-input cache (default: the one
        :func:`autodfp.synth.distill.synthetic_batch` uses)
    """
    t_start = time.perf_counter()
    cfg = pipe.config
    shape = tuple(int(s) for s in pipe.shape)
    searching = macs_ratio is not None
    strategy = plan.strategy if plan is not None else cfg.strategy
    criterion = plan.criterion if plan is not None else cfg.criterion
    synthetic_reward = isinstance(reward, str) and reward == "synthetic"
    corr = pipe.corr_source(cfg.refine or (searching and synthetic_reward), graph)
    calibrating = pipe.needs_calibration(corr, graph)
    selecting = cfg.refine and (cfg.refine_dims_ridge is None or cfg.final_choice)
    distill_steps = cfg.distill_steps_for(shape, pipe.device)
    groups = len(graph.prunable)
    prober = _Probe(pipe.device_model, pipe.device, shape, probe)

    # the sizes of the stages
    n_rw, n_ref = cfg.reward_inputs_for(shape), cfg.refine_inputs_for(shape)
    n_sr = min(cfg.search_refine_inputs, n_ref)  # the search refines on a prefix of the refinement batch
    if synthetic_reward:
        reward_n = n_rw if searching else min(cfg.select_inputs, n_rw)
    elif isinstance(reward, str) and reward.startswith("unlabeled:"):
        reward_n = cfg.unlabeled_reward_inputs
    elif isinstance(reward, str):
        reward_n = cfg.labeled_reward_inputs
    else:
        reward_n = 0  # a callable: its cost is the caller's
    episodes = (1 if search == "uniform" else cfg.episodes_for()) if searching else 0  # uniform: one plan
    warmup = cfg.warmup_for(episodes) if searching and search in ("sac", "evolution") else 0
    grid = len(cfg.dims_ridge_grid) if cfg.refine_dims_ridge is None else 1
    units = sum(len(g.consumers) if g.coupled else 1 for g in graph.prunable)
    final_choice = cfg.final_choice and (searching or selecting) and strategy != "none"
    pool = n_rw + n_ref + cfg.distill_inputs_for(shape, pipe.device)
    batch = min(cfg.distill_batch_size, 4 * pool)

    # one forward pass at the probe's batch size: the unit of every rough figure
    fwd = 0.0
    if probe:
        with prober.timing("forward pass"):
            fwd = prober.forward(prober.batch_size(shape))
    if fwd <= 0:
        fwd = _guessed_forward(pipe.model, shape, pipe.device)
    rates = _Rates(
        forward=fwd,
        batch_forward=fwd,
        distillation=DISTILL_STEP_FORWARDS * fwd,
        refine_fits=REFINE_FIT_FORWARDS * fwd * n_sr,
        decide=DECIDE_GROUP_SECONDS * groups,
        sac_step=SAC_STEP_SECONDS,
    )
    schedules = _Schedules(pipe)
    batches = _batches(pipe, schedules, calibrating, searching, selecting, synthetic_reward, distill_steps, cache_dir)
    _time_synthesis(prober, rates, schedules, batches)
    for b in batches:
        b.seconds = sum(
            _chunk_seconds(rates, shape, c.inputs, schedules(b.steps)) for c in b.chunks if not (c.cached or c.reused)
        )

    # the other primitives worth timing: the work that rests on each against the probe's own cost
    pruner = None
    refine_calls = (episodes + grid) if cfg.refine else 0
    if cfg.refine and prober.affordable(refine_calls / 2.5):  # the probe: a call and its targets' pass
        with prober.timing("refinement"):
            pruner = _probe_pruner(pipe, graph, prober)
            _time_refinement(prober, rates, pipe, pruner, graph, n_sr if searching else n_ref)
    # a 224-px probe batch holds a few inputs, and a pass over 64 runs slower per input (its activations
    # leave the cache); past a probe batch of PROBE_MAX_BATCH small inputs the rate no longer moves
    big = max(reward_n, n_sr if cfg.refine else 0)
    limited = prober.batch_size(shape) < min(big, PROBE_MAX_BATCH)
    if "forward" not in rates.measured and limited:
        if prober.affordable(episodes * big / min(big, 256)):
            with prober.timing("forward pass at the reward's batch"):
                rates.batch_forward = prober.forward(min(big, 256))
                rates.measured.add("forward")
    if prober.affordable(episodes * DECIDE_MISS + 2):
        with prober.timing("decisions"):
            pruner = pruner if pruner is not None else _probe_pruner(pipe, graph, prober)
            rates.decide = _time_decide(pruner, graph, strategy, criterion)
            rates.measured.add("decide")
    if distill_steps and prober.affordable(distill_steps * batch / (PROBE_STEPS * prober.batch_size(shape))):
        with prober.timing("distillation"):
            share = _student_macs(pipe, graph, macs_ratio, uniform, plan, macs_model)
            pruner = pruner if pruner is not None else _probe_pruner(pipe, graph, prober)
            small = _uniform_student(pruner, graph, share, macs_model) if share < 1.0 else None
            if small is not None:
                rates.pruned_distillation = prober.distillation_step(cfg.distill_temperature, small)
            else:
                rates.distillation = prober.distillation_step(cfg.distill_temperature)
            rates.measured.add("distillation")
    sac_steps = max(0, episodes - warmup) * groups if searching and search == "sac" else 0
    if sac_steps and prober.affordable(sac_steps * SAC_STEP_MLPS / SAC_PROBE_PASSES):
        with prober.timing("SAC step"):
            rates.sac_step = _sac_step_seconds()
            rates.measured.add("sac")

    stages: list[Stage] = []
    if batches:
        todo = sum(b.to_make for b in batches)
        cached = sum(b.cached for b in batches)
        if not todo:
            counts = f"{len(batches)} batches, all ready"
        else:
            counts = f"{len(batches)} batches ({cached} cached), {todo} chunks of up to 64 inputs to distil"
        stages.append(
            Stage(
                "synthesis",
                f"{counts}: " + ", ".join(b.describe() for b in batches),
                {"batches": len(batches), "cached": cached, "chunks_to_make": todo},
                sum(b.seconds for b in batches),
                "synthesis" in rates.measured,
            )
        )
    reference = rates.fwd(reward_n)  # the reward's reference outputs, computed once per run
    calibration = 0.0  # the moments of the calibration batch, measured at the first decision
    if calibrating:
        calibration = (CALIBRATION_FORWARDS if corr == "calibration" else 1.0) * rates.fwd(cfg.calibration_inputs)
    if searching:
        per_episode = DECIDE_MISS * rates.decide + rates.fwd(reward_n)
        seconds = reference + calibration + rates.decide + rates.fwd(reward_n)  # and the uniform plan (plots)
        reference = calibration = 0.0
        if cfg.refine:
            per_episode += rates.fwd(n_sr) + rates.refine_fits
            seconds += rates.fwd(n_sr)  # the refiner's targets
        if search == "sac":
            seconds += SAC_SETUP_SECONDS + sac_steps * rates.sac_step
        seconds += episodes * per_episode
        refined = f", each plan refined on {n_sr} inputs" if cfg.refine else ""
        stages.append(
            Stage(
                "search",
                f"{search}, {episodes} episodes: {_reward_text(reward, reward_n, episodes)}{refined}",
                {
                    "method": search,
                    "episodes": episodes,
                    "warmup": warmup,
                    "reward_calls": episodes,
                    "inputs": reward_n,
                },
                seconds,
                bool(rates.measured & {"forward", "refine", "decide"}),
            )
        )
    corr_text = f", correlations on {cfg.calibration_inputs} inputs" if corr == "calibration" else ""
    stages.append(
        Stage(
            "pruning",
            f"{strategy} + {criterion} on {groups} groups{corr_text}",
            {"strategy": strategy, "criterion": criterion, "groups": groups, "corr": corr},
            calibration + rates.decide,
            "decide" in rates.measured,
        )
    )
    if cfg.refine:
        seconds = grid * (rates.fwd(n_ref) + rates.refine_fits)
        if not (searching and n_ref <= n_sr):  # else the search's refiner holds the targets already
            seconds += rates.fwd(n_ref)
        scored = ""
        if cfg.refine_dims_ridge is None:
            seconds += reference + grid * rates.fwd(reward_n)
            reference = 0.0
            scored = f", {grid} dims ridges scored"
        stages.append(
            Stage(
                "refinement",
                f"{units} layers on {n_ref} inputs{scored}",
                {"layers": units, "inputs": n_ref, "dims_ridges": grid},
                seconds,
                "refine" in rates.measured,
            )
        )
    if final_choice:
        candidates = 3 if cfg.refine else 2
        calls = candidates - (1 if cfg.refine and cfg.refine_dims_ridge is None else 0)  # the refined one is scored
        # the per-group pass: at most the other candidates of each group, one reward call each
        per_group = (candidates - 1) * groups if cfg.final_choice_per_group else 0
        calls += per_group
        where = f", then up to {candidates - 1} per group" if per_group else ""
        stages.append(
            Stage(
                "final choice",
                f"{candidates} candidates{where}: {_reward_text(reward, reward_n, calls)}",
                {"candidates": candidates, "reward_calls": calls, "inputs": reward_n, "per_group": bool(per_group)},
                reference + calls * rates.fwd(reward_n),
                "forward" in rates.measured,
            )
        )
    if distill_steps:
        student = _student_macs(pipe, graph, macs_ratio, uniform, plan, macs_model)
        if rates.pruned_distillation is not None:
            per_input = rates.pruned_distillation
        else:
            per_input = rates.forward + student * max(0.0, rates.distillation - rates.forward)
        seconds = distill_steps * batch * per_input
        seconds += (min(10, distill_steps) + 1) * student * rates.fwd(min(batch, pool))  # the probe-loss checks
        seconds += (1 + 2 * student) * rates.fwd(pool)  # the loss over the pool before and after
        fresh = cfg.distill_fresh
        if fresh:
            chunk = _chunk_seconds(rates, shape, 64, schedules(schedules.default_steps()))
            seconds += fresh * (1 + student) * chunk
        extra = f", and {fresh} × 64 fresh inputs" if fresh else ""
        stages.append(
            Stage(
                "distillation",
                f"{distill_steps} steps of {batch} on a pool of {pool} inputs{extra}",
                {"steps": distill_steps, "batch": batch, "pool": pool, "fresh_batches": fresh, "student_macs": student},
                seconds,
                "distillation" in rates.measured,
            )
        )
    notes = list(prober.failures)
    if callable(reward):
        notes.append("your reward callable is not timed: its calls come on top of the search and the final choice")
    if not probe:
        notes.append("nothing was timed: every figure is guessed from the MACs")
    return WorkPlan(
        model=pipe.model_config.name,
        input_shape=shape,
        device=str(pipe.device),
        threads=torch.get_num_threads(),
        stages=stages,
        batches=batches,
        probe_seconds=time.perf_counter() - t_start,
        notes=notes,
        probes=dict(prober.timings),
    )


__all__ = ["Chunk", "STAGES", "Stage", "SynthBatch", "WorkPlan", "format_duration", "plan_work"]
