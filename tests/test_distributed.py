"""Scale-out on Ray (autodfp.distributed): the default path untouched, the same work on 2 workers.

Tests that need Ray skip cleanly without it (CI installs the ``distributed`` extra). One local Ray
instance of 2 CPUs serves the module (``ray_local``); the test of what is left behind starts its
own, in a subprocess, so that it can count that process's children.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autodfp.config import Config
from autodfp.errors import ConfigError
from conftest import make_tiny_cnn

try:
    import ray

    HAVE_RAY = True
except ImportError:  # the extra is optional for users; CI installs it
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'autodfp[distributed]')")
ROOT = Path(__file__).resolve().parents[1]
CIFAR = (3, 32, 32)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance with 2 CPUs for the module; executors use it and leave it running."""
    if not HAVE_RAY:
        pytest.skip("Ray is not installed")
    import ray.cloudpickle

    # the rewards below live in this test module, which Ray's workers cannot import by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


def _python(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


# -- configuration and the default path -------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"workers": 0}, "workers must be an integer"),
        ({"workers": 1.5}, "workers must be an integer"),
        ({"ray_address": "localhost"}, "ray_address must be 'auto' or HOST:PORT"),
        ({"ray_address": "head:70000"}, "ray_address must be 'auto' or HOST:PORT"),
    ],
)
def test_bad_workers_or_address_is_a_config_error(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config(**kw)


def test_cli_without_ray_says_how_to_install_it(tmp_path):
    """``import ray`` fails (blocked in the child): --workers 2 is one ``error:`` line and exit 2,
    before any model is loaded."""
    proc = _python(
        f"""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed: `import ray` raises ImportError
        from autodfp.cli import main
        sys.exit(main(["prune", "resnet20_cifar10", "--macs-ratio", "0.5", "--workers", "2",
                       "--out", {str(tmp_path / "out")!r}]))
        """
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --workers > 1 needs Ray"), proc.stderr
    assert "pip install 'autodfp[distributed]'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_ray_address():
    proc = _python(
        """
        import sys
        from autodfp.cli import main
        sys.exit(main(["prune", "resnet20_cifar10", "--macs-ratio", "0.5", "--ray-address", "nohost", "--dry-run"]))
        """
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: --ray-address must be 'auto' or HOST:PORT"), proc.stderr


def test_default_run_never_imports_ray(tmp_path):
    """workers=1 and no address: a search with synthesis runs in process and Ray is never loaded."""
    proc = _python(
        """
        import sys
        import autodfp
        from autodfp.config import Config
        cfg = Config(effort="fast", search="random", episodes=3, reward_inputs=70, synth_steps=2, refine=False)
        result = autodfp.prune("resnet20_cifar10", macs_ratio=0.6, config=cfg, progress=False)
        print("ray" in sys.modules, result.report["episodes"])
        """,
        env={"AUTODFP_HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["False", "3"], proc.stdout


# -- synthesis ------------------------------------------------------------------------------------------
@needs_ray
def test_parallel_synthesis_writes_the_serial_cache(ray_local, tmp_path):
    """Three chunks (64, 64, 2) on 2 workers: the same files, keys and tensors as 1 worker, and each
    path reads what the other wrote."""
    from autodfp.distributed import RayExecutor
    from autodfp.synth.distill import synthetic_batch

    net = make_tiny_cnn()
    kw = dict(n=130, seed=3, steps=4, method="bn")
    serial = synthetic_batch(net, "tiny", (3, 16, 16), cache_dir=tmp_path / "serial", **kw)
    with RayExecutor(2) as ex:
        assert ex.threads >= 1
        parallel = synthetic_batch(net, "tiny", (3, 16, 16), cache_dir=tmp_path / "ray", executor=ex, **kw)
        lines: list[str] = []
        again = synthetic_batch(
            net, "tiny", (3, 16, 16), cache_dir=tmp_path / "serial", executor=ex, log=lines.append, **kw
        )
    assert torch.equal(serial, parallel) and torch.equal(serial, again)
    assert len(lines) == 3 and all("read from the cache" in ln for ln in lines), lines
    names = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert len(names) == 3 and names == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in names:
        a = torch.load(tmp_path / "serial" / name, weights_only=True)
        b = torch.load(tmp_path / "ray" / name, weights_only=True)
        assert a.keys() == b.keys()
        assert torch.equal(a.pop("images"), b.pop("images"))
        assert a == b


# -- search ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet20():
    from autodfp.compress.surgery import Pruner
    from autodfp.models import load_model
    from autodfp.search.rewards import AgreementReward

    net, _ = load_model("resnet20_cifar10")
    x = torch.randn(8, *CIFAR, generator=torch.Generator().manual_seed(0))
    return Pruner(net, CIFAR), AgreementReward(net, x)


KW = dict(strategy="none", progress=False, checkpoint_every=6)


def _trace(result) -> list[tuple[float, int]]:
    return [(r.reward, r.macs) for r in result.history]


@needs_ray
def test_random_search_on_workers_plays_the_serial_plans(ray_local, resnet20):
    from autodfp.distributed import RayExecutor
    from autodfp.search.driver import search

    pruner, reward = resnet20
    serial = search(pruner, 0.5, method="random", episodes=9, reward=reward, seed=4, **KW)
    with RayExecutor(2) as ex:
        parallel = search(pruner, 0.5, method="random", episodes=9, reward=reward, seed=4, executor=ex, **KW)
    assert _trace(parallel) == _trace(serial) and parallel.best_plan.ratios == serial.best_plan.ratios


#: the evolution run the fault tests are compared with: 2 workers, generations of 2 children
EVO = dict(method="evolution", episodes=12, warmup=4, seed=5, **KW)


@pytest.fixture(scope="module")
def evolution_on_two(ray_local, resnet20):
    from autodfp.distributed import RayExecutor
    from autodfp.search.driver import search

    pruner, reward = resnet20
    with RayExecutor(2) as ex:
        return search(pruner, 0.5, reward=reward, executor=ex, **EVO)


@needs_ray
def test_evolution_on_two_workers_is_valid_on_budget_and_repeatable(ray_local, resnet20, evolution_on_two):
    from autodfp.distributed import RayExecutor
    from autodfp.search.driver import search

    pruner, reward = resnet20
    a = evolution_on_two
    with RayExecutor(2) as ex:
        b = search(pruner, 0.5, reward=reward, executor=ex, **EVO)
    assert _trace(a) == _trace(b) and a.best_plan.ratios == b.best_plan.ratios
    a.best_plan.validate(pruner.graph)
    assert abs(a.best_macs_ratio - 0.5) <= 0.01 + 1e-9
    assert all(abs(r.macs / a.total_macs - 0.5) <= 0.01 + 1e-9 for r in a.history)
    # the random start is the serial one; the generations of two children differ from steady state
    serial = search(pruner, 0.5, reward=reward, **EVO)
    assert _trace(a)[:4] == _trace(serial)[:4]
    assert _trace(a) != _trace(serial)


@needs_ray
def test_one_ray_worker_is_the_serial_steady_state_search(ray_local, resnet20):
    """Generations of one child on one worker: the serial evolution, episode for episode."""
    from autodfp.distributed import RayExecutor
    from autodfp.search.driver import search

    pruner, reward = resnet20
    kw = dict(method="evolution", episodes=10, warmup=3, reward=reward, seed=8, **KW)
    serial = search(pruner, 0.5, **kw)
    with RayExecutor(1) as ex:
        one = search(pruner, 0.5, executor=ex, **kw)
    assert _trace(one) == _trace(serial) and one.best_plan.ratios == serial.best_plan.ratios


# -- faults ---------------------------------------------------------------------------------------------
class _Square:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def score(self, x: int) -> int:
        import time

        time.sleep(0.2)
        return x * x + self.offset


@needs_ray
def test_a_killed_actor_is_replaced_and_its_item_scored_again(ray_local):
    from autodfp.distributed import RayExecutor

    with RayExecutor(2) as ex, ex.pool(_Square, 1) as pool:
        results = []
        for value in pool.imap("score", range(8)):
            if not results:  # mid-run: one actor gone for good (no restart by Ray)
                ray.kill(pool.actors[0], no_restart=True)
            results.append(value)
        assert pool.replaced >= 1
    assert results == [x * x + 1 for x in range(8)]


class CrashOnce:
    """The reward, except that the first call anywhere kills its worker's process outright."""

    def __init__(self, reward, marker: str) -> None:
        self.reward, self.marker = reward, marker

    def __call__(self, model) -> float:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)  # a worker dying mid-episode, not an exception Ray could report
        return self.reward(model)


@needs_ray
def test_a_worker_dying_mid_search_changes_nothing(ray_local, resnet20, evolution_on_two, tmp_path):
    from autodfp.distributed import RayExecutor
    from autodfp.search.driver import search

    pruner, reward = resnet20
    with RayExecutor(2) as ex:
        faulty = search(pruner, 0.5, reward=CrashOnce(reward, str(tmp_path / "crashed")), executor=ex, **EVO)
    assert (tmp_path / "crashed").exists()  # the fault did happen
    assert _trace(faulty) == _trace(evolution_on_two)
    assert faulty.best_plan.ratios == evolution_on_two.best_plan.ratios


# -- nothing left behind --------------------------------------------------------------------------------
LEFT_BEHIND = """
import json, os, signal, threading, time
from autodfp.distributed import executor_for

def children():
    me, out = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if rest[1] == me and rest[0] != "Z":
            out.append(name)
    return out

before = None
try:
    with executor_for(2) as ex:
        before = children()
        threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C mid-work
        list(ex.imap(time.sleep, [60, 60, 60]))
except KeyboardInterrupt:
    pass
for _ in range(100):  # shutdown signals its processes; give them a moment to exit
    after = [n for n in children() if n in ("raylet", "gcs_server")]
    if not after:
        break
    time.sleep(0.2)
print(json.dumps({"before": before, "after": children()}))
"""


@needs_ray
def test_ctrl_c_leaves_no_ray_process_behind():
    proc = _python(LEFT_BEHIND)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"raylet", "gcs_server"} <= set(seen["before"]), seen  # the instance was there
    assert not {"raylet", "gcs_server"} & set(seen["after"]), seen


class FailsAt:
    """The reward, raising a user error at a worker's ``at``-th call: the search stops with it."""

    def __init__(self, reward, at: int) -> None:
        self.reward, self.at, self.calls = reward, at, 0

    def __call__(self, model) -> float:
        from autodfp.errors import AutoDFPError

        self.calls += 1
        if self.calls == self.at:
            raise AutoDFPError("reward failed on purpose")
        return self.reward(model)


@needs_ray
def test_an_error_on_a_worker_is_itself_and_the_search_resumes_exactly(ray_local, resnet20, evolution_on_two, tmp_path):
    from autodfp.distributed import RayExecutor
    from autodfp.errors import AutoDFPError
    from autodfp.search.checkpoint import Checkpointer
    from autodfp.search.driver import search

    pruner, reward = resnet20
    with RayExecutor(2) as ex:
        with pytest.raises(AutoDFPError, match="reward failed on purpose"):
            search(pruner, 0.5, reward=FailsAt(reward, 5), executor=ex, checkpoint_dir=tmp_path, **EVO)
        assert Checkpointer(tmp_path, {}).latest() is not None  # it stopped past the first checkpoint
        resumed = search(pruner, 0.5, reward=reward, executor=ex, checkpoint_dir=tmp_path, resume=True, **EVO)
    assert _trace(resumed) == _trace(evolution_on_two)
    assert resumed.best_plan.ratios == evolution_on_two.best_plan.ratios
