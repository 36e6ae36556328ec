"""`retinanet bench`: ours against torchvision's RetinaNet, alternating in one process on the
same weights and inputs, with the physical floor (the network's FLOPs over the machine's peak
measured in the same run) beside each figure."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from .. import __version__
from ..analysis.plots import save_figure
from ..outputs import write_text
from .precision import cpu_flags


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the process's peak resident set size (VmHWM), Linux >= 4.0
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: the most memory tensors held since the last reset; CPU: the process's peak
    resident set (VmHWM) since the last reset, everything in the process included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def alternate(fns: dict, repeat: int, device: torch.device,
              peak_memory_mb: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds of each function, run A B A B ... after one warm-up each; fills
    `peak_memory_mb` (if given) with each function's peak memory over its timed runs."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _reset_peak_memory(device)
            times[name].append(timed(fn, device))
            peak = _peak_memory_mb(device)
            if peak_memory_mb is not None and peak is not None:
                peak_memory_mb[name] = round(max(peak, peak_memory_mb.get(name, 0.0)), 1)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_gflops(device: torch.device) -> dict:
    """Sustained GFLOP/s of a large matmul and of a 3x3 convolution in channels-last: fp32 on
    the CPU; bf16 on a GPU, the precision its cases run in."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds = min(timed(lambda: a @ b, device) for _ in range(3))
    matmul = 2 * n**3 / seconds / 1e9
    batch = 1 if device.type == "cpu" else 16
    x = torch.randn(batch, 256, 100, 152, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(x)
        seconds = min(timed(lambda: conv(x), device) for _ in range(3))
    conv_flops = 2 * 256 * 256 * 9 * 100 * 152 * batch
    return {"matmul": round(matmul, 1), "conv3x3": round(conv_flops / seconds / 1e9, 1), "dtype": str(dtype)[6:]}


def network_gflop(model, batch: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.run_network(batch)
    return counter.get_total_flops() / 1e9


def torchvision_as_released():
    """torchvision's RetinaNet R-50-FPN as `retinanet_resnet50_fpn(weights=...)` builds it for
    its users (FrozenBatchNorm, stem and res2 frozen: `trainable_backbone_layers=3`), from the
    same parts, with random weights: nothing can be downloaded, and built with `weights=None`
    it would use trainable BatchNorm and train all five stages, a different training step
    (more backward work, batch statistics) from ours and from its own released recipe."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.retinanet import RetinaNet as TorchvisionRetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    trunk = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(trunk, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return TorchvisionRetinaNet(backbone, num_classes=91)


def _models(device: torch.device):
    from ..convert.torchvision import convert_torchvision
    from ..model.build import build_retinanet

    torch.manual_seed(0)
    tv = torchvision_as_released()
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.fill_(-2.0)  # detections, as a trained model has
    config, state = convert_torchvision(tv.state_dict())
    ours = build_retinanet(config)
    ours.load_state_dict(state)
    return tv.to(device), ours.to(device), config, state


def optimized_copy(config, state: dict, device: torch.device, compile: bool = False):
    """Ours from `config` and `state`, optimized as `predict`/`eval`/`serve` run it
    (BatchNorm folded, channels-last; with `compile`, as `predict --compile` runs it)."""
    from ..model.build import build_retinanet

    model = build_retinanet(config)
    model.load_state_dict(state)
    return model.to(device).optimize_for_inference(compile=compile)


def training_step(model, images: list[torch.Tensor], targets: list[dict], optimizer, amp: bool = False):
    """One optimiser step of `model` on fixed inputs, as a function to time."""
    def run():
        with torch.autocast(images[0].device.type, dtype=torch.bfloat16, enabled=amp):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return run


def _photos(count: int, height: int, width: int) -> list[torch.Tensor]:
    """`count` uint8 images `(3, height, width)`: one generated scene of textured background,
    clutter and a dozen shapes (the demo's generator, seeded, so every run times the same
    pixels), resized and shifted sideways differently for each image."""
    import numpy as np

    from ..data.synthetic import render_image

    scene, _ = render_image(np.random.default_rng(0), 512, 12, 12, 40, 220)
    photo = torch.from_numpy(np.array(scene)).permute(2, 0, 1)
    resized = torch.nn.functional.interpolate(photo[None].float(), size=(height, width), mode="bilinear")[0]
    return [resized.roll(shifts=17 * i, dims=-1).clamp(0, 255).to(torch.uint8) for i in range(count)]


def bench_inference(batch: int, size: tuple[int, int], repeat: int, device: torch.device, amp: bool = False,
                    compile: bool = False) -> dict:
    """End to end from decoded uint8 images to final detections, both libraries at the same
    input size (with `amp`, both in bf16 autocast; with `compile`, both networks through
    torch.compile, and on a GPU our NMS kernels: `PostProcessor.compile`, as torchvision's
    per-image post-processing has no such part); ours also split into its stages."""
    from ..model.detector import cpu_freezing  # for every model compiled inside: both libraries get it

    tv, ours, config, state = _models(device)
    fast = optimized_copy(config, state, device, compile=compile)
    ours.eval(), tv.eval()
    if compile:
        _compile_networks(tv, ours)
        ours.postprocessor.compile()  # our NMS kernels (used on a GPU only)
    short, long = min(size), max(size)
    tv.transform.min_size, tv.transform.max_size = (short,), long
    for model in (ours, fast):
        model.preprocessor.test_min_size, model.preprocessor.max_size = short, long
    images = [im.to(device) for im in _photos(batch, *size)]
    floats = [im.float() / 255 for im in images]  # torchvision takes [0, 1] floats
    peaks: dict[str, float] = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), cpu_freezing(device, compile):
        times = alternate({"torchvision": lambda: tv(floats), "ours": lambda: ours(images),
                           "ours_optimized": lambda: fast(images)}, repeat, device, peaks)
        batch_tensor, _ = fast.preprocessor(images)
        features = None

        def backbone():
            nonlocal features
            features = fast.backbone(batch_tensor.tensor.contiguous(memory_format=torch.channels_last))

        stages = {"preprocess": lambda: fast.preprocessor(images), "backbone": backbone}
        split = {name: statistics.median(timed(fn, device) for _ in range(2)) for name, fn in stages.items()}
        pyramid = fast.fpn(features)
        split["fpn"] = statistics.median(timed(lambda: fast.fpn(features), device) for _ in range(2))
        split["head"] = statistics.median(timed(lambda: fast.head(pyramid), device) for _ in range(2))
        logits, deltas = fast.head(pyramid)
        anchors = fast.anchor_generator([tuple(f.shape[-2:]) for f in pyramid], tuple(batch_tensor.tensor.shape[-2:]),
                                        device)
        split["postprocess"] = statistics.median(
            timed(lambda: fast.forward_inference(logits, deltas, anchors, batch_tensor), device) for _ in range(2))
    gflop = None if compile else network_gflop(ours, batch_tensor.tensor)  # (the counter and compiled code do not mix)
    return {"case": f"inference batch {batch} at {size[0]}x{size[1]}{_variant(amp, compile)}", "seconds": times,
            "images_per_second": {k: round(batch / v, 3) for k, v in times.items()},
            "ratio_vs_torchvision": round(times["torchvision"] / times["ours_optimized"], 3),
            "peak_memory_mb": peaks, "ours_stages_seconds": {k: round(v, 4) for k, v in split.items()},
            **({"network_gflop": round(gflop, 1)} if gflop is not None else {})}


def random_targets(batch: int, size: tuple[int, int], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """3-20 boxes of 20-220 px per image of `size (h, w)`, COCO labels 1-90; seeded."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 21, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([size[1] * 0.7, size[0] * 0.7])
        wh = 20 + torch.rand(n, 2, generator=generator) * 200
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 91, (n,), generator=generator).to(device)})
    return targets


def bench_training(batch: int, size: tuple[int, int], repeat: int, device: torch.device, amp: bool = False,
                   compile: bool = False, channels_last: bool = False) -> dict:
    """One SGD step (forward, backward, update) at `batch`, frozen BN, 3-20 boxes per image;
    `amp` (bf16 autocast), `compile` and `channels_last` apply to both libraries alike."""
    tv, ours, _, _ = _models(device)
    tv.train(), ours.train()
    if channels_last:
        tv.to(memory_format=torch.channels_last)
        ours.to_channels_last()
    if compile:
        from .train import compile_for_training

        _compile_networks(tv)
        # ours as `train.compile` does it, matching and losses included: batched and free of host
        # syncs, they make one graph (torchvision's per-image loss loops would not)
        compile_for_training(ours)
    tv.transform.min_size, tv.transform.max_size = (min(size),), max(size)
    ours.preprocessor.train_min_sizes, ours.preprocessor.max_size = [min(size)], max(size)
    images = [im.to(device) for im in _photos(batch, *size)]
    floats = [im.float() / 255 for im in images]
    targets = random_targets(batch, size, device)
    steps = {name: training_step(model, inputs, targets, torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-6), amp)
        for name, model, inputs in (("torchvision", tv, floats), ("ours", ours, images))}
    peaks: dict[str, float] = {}
    times = alternate(steps, repeat, device, peaks)
    return {"case": f"training step batch {batch} at {size[0]}x{size[1]}{_variant(amp, compile, channels_last)}",
            "seconds": times,
            "images_per_second": {k: round(batch / v, 3) for k, v in times.items()},
            "ratio_vs_torchvision": round(times["torchvision"] / times["ours"], 3), "peak_memory_mb": peaks}


def demo_training_step(cfg, images: list[torch.Tensor], targets: list[dict], device: torch.device,
                       channels_last: bool):
    """The demo's training step (its model and AdamW, as `retinanet demo` builds them from
    `cfg`, seeded) on fixed inputs, as a function to time."""
    from .optimization import build_optimizer
    from ..model.build import build_retinanet

    torch.manual_seed(0)
    model = build_retinanet(cfg.model).to(device).train()
    if channels_last:
        model.to_channels_last()
    return training_step(model, images, targets, build_optimizer(model, cfg.train, cfg.train.base_lr))


def bench_demo_step(repeat: int, device: torch.device) -> dict:
    """The embedded demo's training step as `retinanet demo` runs it (its config: ResNet-18,
    GroupNorm head, batch 8 at 128 px, AdamW, fp32): ours only, as torchvision has no such
    model; images per second."""
    from ..config import load_config

    cfg = load_config("demo")
    images = [im.to(device) for im in _photos(cfg.train.batch_size, 128, 128)]
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in images:
        n = int(torch.randint(1, 9, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 90
        wh = 12 + torch.rand(n, 2, generator=generator) * 30
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, cfg.model.num_classes, (n,), generator=generator).to(device)})

    peaks: dict[str, float] = {}
    step = demo_training_step(cfg, images, targets, device, cfg.train.channels_last)
    seconds = alternate({"ours": step}, repeat, device, peaks)["ours"]
    return {"case": f"demo training step batch {len(images)} at 128x128 (ours only)", "seconds": {"ours": seconds},
            "images_per_second": {"ours": round(len(images) / seconds, 3)}, "peak_memory_mb": peaks}


def _compile_networks(*models) -> None:
    """torch.compile on the network part of each model (backbone, FPN, head): the tensor
    work; pre- and post-processing stay eager in both libraries."""
    for model in models:
        for name in ("backbone", "fpn", "head"):
            if hasattr(model, name):
                setattr(model, name, torch.compile(getattr(model, name)))


def _variant(*flags) -> str:
    names = [n for n, on in zip(("bf16", "compiled", "channels-last"), flags) if on]
    return f" ({', '.join(names)})" if names else ""


def machine() -> dict:
    model_name = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                       if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    # what the kernels use may be less than the CPU has: ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap
    # it (the latter also for the oneDNN inside OpenVINO, whose own kernels OV_CPU_MAX_ISA caps)
    kernels = {"aten": torch.backends.cpu.get_cpu_capability(), "onednn_max": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
               "openvino_max": os.environ.get("OV_CPU_MAX_ISA", "")}
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"})
    return {"cpu": model_name, "cpu_flags": flags, "kernels": kernels,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(device: str = "cpu", quick: bool = False, output_dir: str | Path = "bench_output",
              only: str = "", cudnn_benchmark: bool = False, cuda_graphs: bool = False) -> dict:
    """`cuda_graphs`: the compiled cases' networks (both libraries) replay as CUDA graphs
    (inductor's `triton.cudagraphs`, what torch.compile's mode "reduce-overhead" sets)."""
    from .bench_runtimes import bench_runtimes  # (it builds on this module's pieces)

    dev = torch.device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if cuda_graphs:
        from torch._inductor import config as inductor_config

        inductor_config.triton.cudagraphs = True
    repeat = 2 if quick else 3
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    peaks = peak_gflops(dev)
    results = {"date": datetime.date.today().isoformat(), "version": __version__, "machine": machine(),
               "device": device, "peaks": peaks, "cases": []}
    if dev.type == "cuda":  # the GPU targets of the project: 800x1333, bf16, large batches
        inference_batch, training_batch = (4, 2) if quick else (32, 16)
        cases = {"inference, bf16": lambda: bench_inference(inference_batch, (800, 1333), repeat, dev, amp=True),
                 "training, bf16 channels-last": lambda: bench_training(training_batch, (800, 1333), repeat, dev,
                                                                        amp=True, channels_last=True)}
        if not quick:
            cases["training, bf16 channels-last compiled"] = lambda: bench_training(
                training_batch, (800, 1333), repeat, dev, amp=True, compile=True, channels_last=True)
            cases["inference, bf16 compiled"] = lambda: bench_inference(inference_batch, (800, 1333), repeat, dev,
                                                                        amp=True, compile=True)
    else:
        cases = {"inference batch 1": lambda: bench_inference(1, (800, 1216), repeat, dev)}
        if not quick:
            cases.update({"inference batch 8": lambda: bench_inference(8, (512, 512), repeat, dev),
                          # 3 alternating repeats like the other cases: with 2, the median is the mean
                          # and one disturbed step moved the ratio by 0.15 on a shared VM
                          "training": lambda: bench_training(2, (800, 1216), repeat, dev),
                          "demo training step": lambda: bench_demo_step(5, dev),
                          # every runtime a CPU user deploys on, exported in the run (a few minutes each)
                          "deployed runtimes batch 1": lambda: bench_runtimes(1, (800, 1216), repeat, work=output_dir),
                          "deployed runtimes batch 8": lambda: bench_runtimes(8, (512, 512), repeat, work=output_dir),
                          # last: what the compiler leaves in the process (its caches, ~1 GB more
                          # resident memory) must not run under the eager cases' timings
                          "inference batch 1, compiled": lambda: bench_inference(1, (800, 1216), repeat, dev,
                                                                                 compile=True)})
    for name, case in cases.items():
        if only and only not in name:
            continue
        try:
            result = case()
        except Exception as error:  # one failed case (e.g. a compiler error) keeps the others
            if dev.type != "cuda":
                raise
            result = {"case": name, "error": f"{type(error).__name__}: {error}"[:2000]}
            results.setdefault("errors", []).append(result)
            print(json.dumps(result), flush=True)
            continue
        if "network_gflop" in result and "floor_seconds" not in result:
            floor = result["network_gflop"] / peaks["conv3x3"]
            result["floor_seconds"] = round(floor, 3)
        print(json.dumps(result), flush=True)
        results["cases"].append(result)
    write_text(output_dir / "bench.json", json.dumps(results, indent=2))
    try:
        _chart(results, output_dir / "bench.png")
    except ImportError:
        pass
    return results


def _kernels(machine: dict) -> str:
    """`; kernels capped: ...` where the run's kernels used less than the CPU has (the
    ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA variables), else nothing."""
    kernels = machine.get("kernels") or {}
    aten_capped = kernels.get("aten", "").lower() == "avx2" and "avx512f" in machine.get("cpu_flags", [])
    if not (aten_capped or kernels.get("onednn_max")):
        return ""
    parts = [f"ATen {kernels.get('aten')}"] + ([f"oneDNN at most {kernels['onednn_max']}"]
                                              if kernels.get("onednn_max") else []) + (
        [f"OpenVINO at most {kernels['openvino_max']}"] if kernels.get("openvino_max") else [])
    return "; kernels capped: " + ", ".join(parts)


def markdown_table(results: dict, command: str) -> str:
    """The run as markdown: a heading with the date, the command and the package version
    (`results["version"]`), the machine, then one row per case."""
    from .bench_runtimes import runtimes_table

    m = results["machine"]
    lines = [f"### {results['date']}: `{command}` (retinanet {results.get('version', 'unknown')})", "",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX flags read'}{_kernels(m)}), {m['threads']} threads, "
             f"torch {m['torch']}, device {results['device']}; peaks in the same run ({results['peaks'].get('dtype', 'float32')}): matmul "
             f"{results['peaks']['matmul']} GFLOP/s, 3x3 conv (channels-last) {results['peaks']['conv3x3']} GFLOP/s."]
    runtimes = [c for c in results["cases"] if isinstance(c.get("ratio_vs_torchvision"), dict)]
    others = [c for c in results["cases"] if c not in runtimes]
    if others or not runtimes:
        lines += ["", "| case | torchvision (s) | ours (s) | ours optimized (s) | speed-up vs torchvision | floor (s) "
                      "| peak memory (MB) |", "|---|---|---|---|---|---|---|"]
    for c in others:
        s = c["seconds"]
        cells = [f"{s[k]:.3f}" if k in s else "—" for k in ("torchvision", "ours", "ours_optimized")]
        ratio = f"{c['ratio_vs_torchvision']:.2f}x" if "ratio_vs_torchvision" in c else \
            f"{c['images_per_second']['ours']:.1f} images/s"
        memory = " / ".join(f"{k} {v:.0f}" for k, v in c.get("peak_memory_mb", {}).items())
        lines.append(f"| {c['case']} | {' | '.join(cells)} | {ratio} | {c.get('floor_seconds', '')} | {memory} |")
    stages = [c for c in results["cases"] if "ours_stages_seconds" in c]
    for c in stages:
        lines.append("")
        flops = f"; network {c['network_gflop']} GFLOP" if "network_gflop" in c else ""
        lines.append(f"Ours (optimized), {c['case']}, by stage: " + ", ".join(
            f"{k} {v:.3f} s" for k, v in c["ours_stages_seconds"].items()) + flops + ".")
    for c in runtimes:
        lines += ["", runtimes_table(c).rstrip()]
    for failed in results.get("errors", []):
        lines.append("")
        lines.append(f"Case \"{failed['case']}\" failed: {failed['error']}")
    memory = ("peak memory: the most GPU memory that tensors held during the call" if results["device"].startswith("cuda")
              else "peak memory: the process's peak resident set during the call (both models' weights included)")
    lines += ["", f"Times are medians of alternating runs; {memory}."]
    return "\n".join(lines) + "\n"


def _chart(results: dict, path: Path) -> None:
    from ..analysis.plots import _pyplot

    plt = _pyplot()
    cases = results["cases"]
    fig, ax = plt.subplots(figsize=(8, 3 + 0.4 * len(cases)))
    names = [c["case"] for c in cases]
    for offset, key in enumerate(("torchvision", "ours", "ours_optimized")):
        values = [c["images_per_second"].get(key, 0) for c in cases]
        ax.barh([i + offset * 0.27 for i in range(len(cases))], values, height=0.25, label=key)
    ax.set_yticks([i + 0.27 for i in range(len(cases))], names, fontsize=8)
    ax.set_xlabel("images per second")
    where = results["machine"].get("cuda") if results["device"].startswith("cuda") else results["machine"]["cpu"]
    ax.set_title(f"retinanet vs torchvision ({where or results['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
