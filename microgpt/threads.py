"""How many threads torch computes with on the CPU, chosen from a step's work and the cores this process may use.

torch's default is one intra-op thread per core, and its OpenMP threads spin about 300,000 times while they wait
for work. For microgpt's small models that is slower on a quiet machine and several times slower on a busy one: a
waiting thread keeps a core that another process, or the thread being waited for, needs. So, unless the user chose:

* ``before_torch()``, called before torch is imported (``python -m microgpt`` does it first), sets
  ``GOMP_SPINCOUNT=3000``: idle OpenMP threads spin briefly, then sleep. OpenMP reads it once, when torch loads it;
  later it changes nothing.
* ``use_threads()``, called once the model and the batch are known and before the first step, sets one thread
  when a step's largest tensor is too small for torch to split (torch hands a pointwise operation to several
  threads only from 32,768 values, ``at::internal::GRAIN_SIZE``), else one thread per core allowed that other work
  leaves idle at the start (or its share of the cores, when several processes of one run share the machine). It
  returns the one line that says what it chose.

The user's choice always wins: ``OMP_NUM_THREADS`` (then microgpt leaves OpenMP alone altogether), or
``torch.set_num_threads`` called before the run. A setting that cannot be honoured (not a whole number, below 1,
more than the cores allowed) is one sentence naming it. Nothing here imports torch at module level, so that
``before_torch`` can run first.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from microgpt.errors import UserError

GRAIN_SIZE = 32768  # torch's at::internal::GRAIN_SIZE: fewer values than this, and a pointwise operation is one thread's
WAITING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # OpenMP's waiting, as the user may have set it
# Spins before an idle OpenMP thread sleeps: enough to bridge the gaps between a step's parallel operations on a quiet
# machine (sleeping at once, OMP_WAIT_POLICY=PASSIVE, made names-batched slower than one thread), few enough
# that a thread does not hold a core for long once another process wants it (docs/speed.md)
SPIN_COUNT = 3000
SAMPLE_SECONDS = 0.1  # how long the cores are watched for other work before a choice of several threads


def allowed_cores() -> int:
    """The cores this process may run on (its affinity, which ``taskset`` and container limits narrow), not the
    machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def before_torch(environ: os._Environ | dict = os.environ) -> str | None:
    """Run before torch is imported, whose OpenMP reads its settings once, when it loads: idle OpenMP threads spin
    ``SPIN_COUNT`` times, not OpenMP's 300,000, before they sleep (``GOMP_SPINCOUNT``, torch's libgomp on Linux),
    unless the user set ``OMP_NUM_THREADS`` or any of OpenMP's waiting settings. Returns what is wrong with the
    user's ``OMP_NUM_THREADS`` (then nothing is set), or None."""
    if "OMP_NUM_THREADS" in environ:
        try:
            checked_omp_num_threads(environ["OMP_NUM_THREADS"], allowed_cores())
        except UserError as err:
            return str(err)
    elif "torch" not in sys.modules and not any(name in environ for name in WAITING):
        environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return None


@dataclass(frozen=True)
class Start:
    """What the user had set when the command started, before Lightning's launcher sets threads of its own."""

    omp_num_threads: int | None  # OMP_NUM_THREADS, checked
    torch_threads: int | None  # torch.get_num_threads() then, when torch was loaded

    @classmethod
    def now(cls) -> Start:
        """The settings now; a ``UserError`` naming ``OMP_NUM_THREADS`` when it cannot be honoured."""
        text = os.environ.get("OMP_NUM_THREADS")
        torch = sys.modules.get("torch")
        return cls(None if text is None else checked_omp_num_threads(text, allowed_cores()),
                   torch.get_num_threads() if torch is not None else None)


def checked_omp_num_threads(text: str, cores: int) -> int:
    """``OMP_NUM_THREADS`` as a thread count this process can honour, else a ``UserError`` naming it."""
    try:
        threads = int(text.strip())
    except ValueError:
        threads = 0
    if not 1 <= threads <= cores:
        raise UserError(f"OMP_NUM_THREADS={text}: the number of threads must be a whole number from 1 to {cores}, "
                        f"the cores this process may use.")
    return threads


def choose(values: int, cores: int, processes: int = 1, start: Start | None = None,
           busy: Callable[[], float | None] = lambda: busy_cores()) -> tuple[int | None, str]:
    """The thread count for steps whose largest tensor holds ``values`` numbers, run by ``processes`` processes
    sharing ``cores``: ``(threads, reason)``, threads None to leave torch's as the user set it. A single process
    that could use several threads uses those of its cores that other work leaves idle at the start
    (``busy()``: how many cores other work keeps busy, None where unknown)."""
    start = start or Start.now()
    allowed = f"{cores} core{'s' if cores != 1 else ''} allowed" + (f", {processes} processes" if processes > 1 else "")
    if start.omp_num_threads is not None:
        return start.omp_num_threads, "OMP_NUM_THREADS"
    if start.torch_threads is not None and start.torch_threads != cores:
        return None, "torch.set_num_threads before the run"
    if values < GRAIN_SIZE:
        return 1, f"a step's largest tensor has {values:,} values, too few for torch to split; {allowed}"
    share = max(1, cores // max(1, processes))
    if share > 1 and processes == 1 and (taken := busy()) is not None:
        share = max(1, min(share, math.floor(cores - taken + 0.5)))
        allowed += f", {taken:.1f} busy with other work"
    return share, f"a step's largest tensor has {values:,} values; {allowed}; {waiting()}"


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of the cores allowed other work kept busy over the next ``seconds`` (this thread sleeps
    meanwhile), from the kernel's per-core counters (``/proc/stat``); None where there are none."""
    def idle_and_total() -> dict[int, tuple[int, int]]:
        counts = {}
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    counts[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
        return counts

    try:
        cpus = os.sched_getaffinity(0)
        before = idle_and_total()
        time.sleep(seconds)
        after = idle_and_total()
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu, (idle, total) in after.items():
        if cpu in before and total > before[cpu][1]:
            busy += 1 - (idle - before[cpu][0]) / (total - before[cpu][1])
    return busy


def waiting() -> str:
    """How idle OpenMP threads wait, in a few words (as far as the environment tells)."""
    given = [f"{name}={os.environ[name]}" for name in WAITING if name in os.environ]
    return ", ".join(given) if given else "OpenMP's own waiting: it was loaded before microgpt could set it"


def use_threads(tokens: int, model, processes: int = 1, start: Start | None = None) -> str:
    """Choose and set torch's intra-op threads for steps over ``tokens`` positions of ``model`` (its largest
    tensor per position is its widest linear layer's output: the MLP's hidden layer, ``4 * n_embd``), in one of
    ``processes`` processes of a run on this machine; ``start`` is what the user had set (default: now). Returns
    the line that says what was chosen and why."""
    import torch

    widest = max((m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=1)
    threads, reason = choose(tokens * widest, allowed_cores(), processes, start)
    if threads is None:
        threads = torch.get_num_threads()
    elif torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return f"threads: {threads} ({reason})"
