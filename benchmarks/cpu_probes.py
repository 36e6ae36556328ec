"""Two CPU questions `retinanet bench` does not answer, on the bench's own models and photos.

`--probe compile`: does `predict --compile` pay on this CPU? Ours optimized (BatchNorm folded,
channels-last), eager and compiled, batch 1 at 800x1216, alternating; prints each time and the
medians. `--probe faults`: seconds and minor page faults of one inference (batch 1) and of
training steps (batch 2, 800x1216). Allocator settings are read when a process starts, so
compare them one process each (`--keep-freed-memory`: what the command line sets,
`retinanet.allocator.keep_freed_memory`), e.g.

    python benchmarks/cpu_probes.py --probe compile --repeat 6
    for i in 1 2 3; do
      python benchmarks/cpu_probes.py --probe faults
      python benchmarks/cpu_probes.py --probe faults --keep-freed-memory
    done
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from retinanet.allocator import keep_freed_memory
from retinanet.engine.bench import _models, _photos, optimized_copy, random_targets, timed, training_step
from retinanet.model.detector import cpu_freezing

CPU = torch.device("cpu")
SIZE = (800, 1216)


def _test_size(*models) -> None:
    for model in models:
        model.preprocessor.test_min_size, model.preprocessor.max_size = SIZE


def probe_compile(repeat: int) -> None:
    _, _, config, state = _models(CPU)
    eager, compiled = optimized_copy(config, state, CPU), optimized_copy(config, state, CPU, compile=True)
    _test_size(eager, compiled)
    images = _photos(1, *SIZE)
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    with torch.no_grad(), cpu_freezing(CPU, True):
        start = time.perf_counter()
        compiled(images)
        print(f"first compiled call (compiling): {time.perf_counter() - start:.1f} s", flush=True)
        eager(images)
        for _ in range(repeat):
            seconds["eager"].append(timed(lambda: eager(images), CPU))
            seconds["compiled"].append(timed(lambda: compiled(images), CPU))
    print({name: [round(s, 3) for s in values] for name, values in seconds.items()})
    print("medians:", {name: round(statistics.median(values), 3) for name, values in seconds.items()},
          "kernels:", torch.backends.cpu.get_cpu_capability())


def _timed_with_faults(fn) -> tuple[float, int]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 3), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def probe_faults(steps: int) -> None:
    _, ours, config, state = _models(CPU)
    fast = optimized_copy(config, state, CPU)
    _test_size(fast)
    images = _photos(2, *SIZE)
    with torch.no_grad():
        fast(images[:1])
        print("inference (seconds, minor faults):", [_timed_with_faults(lambda: fast(images[:1])) for _ in range(3)])
    ours.train()
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    step = training_step(ours, images, random_targets(2, SIZE, CPU), optimizer)
    step()
    print("training step (seconds, minor faults):", [_timed_with_faults(step) for _ in range(steps)], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", choices=["compile", "faults"], required=True)
    parser.add_argument("--repeat", type=int, default=3, help="alternations (compile) or training steps (faults)")
    parser.add_argument("--keep-freed-memory", action="store_true", help="first call keep_freed_memory()")
    args = parser.parse_args()
    if args.keep_freed_memory:
        print("keep_freed_memory applied:", keep_freed_memory())
    (probe_compile if args.probe == "compile" else probe_faults)(args.repeat)


if __name__ == "__main__":
    main()
