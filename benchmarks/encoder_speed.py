"""Encoder-alone throughput: precision x memory format x torch's huge-page allocator; and every preset.

Default mode: for each encoder, runs every setting in its own subprocess (``THP_MEM_ALLOC_ENABLE=1``
must be set before torch allocates anything), interleaved over several rounds, and prints images/s
(median over rounds), the ratio to plain fp32, and the cosine similarity of reduced-precision features
to fp32 features of the same real-tissue tiles (minimum over tiles).

``--presets all`` (or a comma list): each encoder preset's architecture with random weights, at fp32 and
at the precision ``--precision auto`` gives it on this device, timed interleaved, with the cosine
similarity between the two per tile (the default must keep >= 0.999 on every tile). Transformers are
cut to ``--cpu-depth`` blocks on the CPU unless ``--full`` (a full ViT-g takes minutes per batch on two
cores); the report says so per row, and the img/s is then that of the reduced model. LayerScale gains
are set to 1: timm initialises them to 1e-5, which would make every block nearly the identity and hide
the blocks' rounding from the comparison.

Timed work per batch: uint8 tiles [B, px, px, 3] -> ``encoder.transform`` -> model, under
``torch.inference_mode()`` (and autocast for bf16/fp16). ``resnet50_trunc`` uses random weights (speed
does not depend on them); ``tf_efficientnet_lite0`` its packaged ImageNet weights.

    HF_HUB_OFFLINE=1 python benchmarks/encoder_speed.py --out benchmarks/results/encoder_speed.txt
    python benchmarks/encoder_speed.py --device cuda --batch-size 256 --encoders resnet50_trunc
    HF_HUB_OFFLINE=1 python benchmarks/encoder_speed.py --presets all --batch-size 4 --out benchmarks/results/encoder_presets.txt
    python benchmarks/encoder_speed.py --presets all --device cuda --batch-size 64 --out encoder_presets_cuda.txt

One module because the preset mode reuses the tissue tiles, the cosine and the report writer of the
precision/memory-format mode; split, each half would import the other's helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CPU_SETTINGS = ["fp32", "fp32+cl", "fp32+cl+fused", "bf16", "bf16+cl", "bf16+cl+fused"]
CUDA_SETTINGS = ["fp32", "fp32+cl", "bf16", "bf16+cl", "fp16", "fp16+cl"]


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="resnet50_trunc,tf_efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=6, help="timed batches per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every setting")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("--presets", default="", help="'all' or a comma list: time each preset at fp32 and its default precision")
    p.add_argument("--cpu-depth", type=int, default=2, help="transformer blocks kept on the CPU (preset mode)")
    p.add_argument("--full", action="store_true", help="full-size transformers on the CPU too (preset mode)")
    # internal: one measurement
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--encoder", default="resnet50_trunc", help=argparse.SUPPRESS)
    p.add_argument("--features-out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cosine_tiles(n: int, px: int) -> Any:
    import numpy as np
    import skimage.data

    img = skimage.data.immunohistochemistry()  # real IHC colon tissue, 512 x 512
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - px + 1, size=2)
        out.append(img[y : y + px, x : x + px])
    return np.stack(out)


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from wsi_mil.features.encoders import create_encoder
    from wsi_mil.features.runtime import autocast_context

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision, *flags = args.setting.split("+")
    dev = torch.device(args.device)
    random_init = args.encoder != "tf_efficientnet_lite0"
    enc = create_encoder(args.encoder, random_init=random_init, device=dev)
    if "cl" in flags:
        enc.set_channels_last(True)
    # "fused": the model extraction runs on the CPU (Encoder.inference_model: conv + batch norm + ReLU + add fused)
    model = enc.inference_model(precision, args.batch_size, cpu_fusion="fused" in flags)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    tiles = torch.from_numpy(
        rng.integers(0, 256, size=(args.batch_size, args.tile_px, args.tile_px, 3), dtype=np.uint8)
    )
    if dev.type == "cuda":
        tiles = tiles.pin_memory()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step() -> None:
        with torch.inference_mode(), autocast_context(dev, precision):  # type: ignore[arg-type]
            model(enc.transform(tiles, device=dev))

    for _ in range(args.warmup):
        step()
    sync()
    batch_s: list[float] = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        tb = time.perf_counter()
        step()
        sync()
        batch_s.append(time.perf_counter() - tb)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0

    # preprocessing alone (uint8 -> normalised float on the device)
    sync()
    t1 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(args.batches):
            enc.transform(tiles, device=dev)
    sync()
    dt_tf = time.perf_counter() - t1

    if args.features_out:
        real = _cosine_tiles(args.batch_size, args.tile_px)
        feats = enc.encode(real, precision=precision).cpu().numpy()  # type: ignore[arg-type]
        np.save(args.features_out, feats)
    print(
        json.dumps(
            {
                "img_s": args.batches * args.batch_size / dt,
                "best_batch_img_s": args.batch_size / min(batch_s),
                "cpu_img_s": args.batches * args.batch_size / cpu * args.threads,
                "transform_img_s": args.batches * args.batch_size / dt_tf,
                "feature_dim": enc.feature_dim,
                "weights": enc.weights_source,
            }
        )
    )


def _run_child(
    args: argparse.Namespace, encoder: str, setting: str, thp: bool, features_out: str
) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--encoder",
        encoder,
        "--setting",
        setting,
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--batches",
        str(args.batches),
        "--warmup",
        str(args.warmup),
        "--tile-px",
        str(args.tile_px),
        "--device",
        args.device,
        "--features-out",
        features_out,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{encoder} {setting} thp={thp} failed:\n{res.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def _cosines(a_path: str, b_path: str) -> tuple[float, float]:
    """(min, mean) over tiles of the cosine similarity of two feature files."""
    import numpy as np

    a = np.load(a_path).astype(np.float64)
    b = np.load(b_path).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min()), float(cos.mean())


Runs = dict[tuple[str, bool], list[dict[str, Any]]]


def _med(runs: Runs, setting: str, thp: bool, key: str) -> float:
    return float(statistics.median(x[key] for x in runs[(setting, thp)]))


def _best(runs: Runs, setting: str, thp: bool, key: str) -> float:
    return float(max(x[key] for x in runs[(setting, thp)]))


def _preset_model(name: str, device: Any, depth: int | None) -> Any:
    import torch

    from wsi_mil.features.encoders import create_encoder

    torch.manual_seed(0)
    enc = create_encoder(name, random_init=name != "tf_efficientnet_lite0", device=device, depth=depth)
    with torch.no_grad():
        for module in enc.model.modules():  # LayerScale: trained gains, not timm's 1e-5 (see the docstring)
            if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):
                module.gamma.fill_(1.0)
    return enc


def _time_preset(enc: Any, tiles: Any, precision: str, batches: int, warmup: int) -> float:
    import torch

    from wsi_mil.features.runtime import autocast_context

    dev = enc.device

    def step() -> None:
        with torch.inference_mode(), autocast_context(dev, precision):  # type: ignore[arg-type]
            enc(enc.transform(tiles, device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * len(tiles) / (time.perf_counter() - t0)


def run_presets(args: argparse.Namespace, out: Any) -> None:
    """The preset mode (see the module docstring)."""
    import numpy as np
    import torch

    from wsi_mil.features.presets import get_preset, list_presets
    from wsi_mil.features.runtime import resolve_device, resolve_precision

    dev = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    names = [p.name for p in list_presets()] if args.presets == "all" else [n.strip() for n in args.presets.split(",")]
    out(f"{'preset':<22} {'blocks':>9} {'px':>4} {'fp32 img/s':>10} {'default':>7} {'img/s':>8} {'speed-up':>8} "
        f"{'cos min/mean':>17} ok")  # fmt: skip
    failures = []
    for name in names:
        preset = get_preset(name)
        vit = preset.arch.startswith("vit_")
        depth = args.cpu_depth if vit and dev.type == "cpu" and not args.full else None
        enc = _preset_model(name, dev, depth)
        full_depth = _full_depth(preset)
        blocks = f"{depth or full_depth}/{full_depth}" if vit else "full"
        default = resolve_precision("auto", dev, name)
        px = preset.tile_px
        rng = np.random.default_rng(1)
        timed = torch.from_numpy(rng.integers(0, 256, size=(args.batch_size, px, px, 3), dtype=np.uint8))
        speed: dict[str, list[float]] = {"fp32": [], default: []}
        for _ in range(args.rounds):  # interleaved
            for precision in dict.fromkeys(("fp32", default)):
                speed[precision].append(_time_preset(enc, timed, precision, args.batches, args.warmup))
        real = _cosine_tiles(32, px)
        feats = {p: np.concatenate([enc.encode(real[i : i + 8], precision=p).cpu().numpy() for i in range(0, 32, 8)])
                 for p in dict.fromkeys(("fp32", default))}  # fmt: skip
        a, b = feats["fp32"].astype(np.float64), feats[default].astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        ok = cos.min() >= 0.999
        failures += [] if ok else [name]
        f32, dflt = statistics.median(speed["fp32"]), statistics.median(speed[default])
        out(f"{name:<22} {blocks:>9} {px:>4} {f32:10.2f} {default:>7} {dflt:8.2f} {dflt / f32:7.2f}x "
            f"{cos.min():.6f}/{cos.mean():.6f} {'yes' if ok else 'NO'}")  # fmt: skip
        del enc
    out()
    out(
        "blocks: transformer blocks run / the preset's (reduced on the CPU: img/s is the reduced model's; "
        "CNNs and Swin run full); px: the preset's tile side, resized/cropped by its transform; default: "
        "the precision `--precision auto` gives this preset on this device; cos: cosine similarity of "
        "default-precision to fp32 features per tile, over 32 real-tissue tiles (IHC), random weights with "
        "LayerScale gains at 1."
    )
    out("all defaults keep cos >= 0.999 on every tile" if not failures else f"BELOW 0.999: {', '.join(failures)}")


def _full_depth(preset: Any) -> int:
    """Transformer blocks of the full-size architecture (built on the meta device: no memory)."""
    from wsi_mil.features.architectures import build_trunk

    return len(getattr(build_trunk(preset, device="meta"), "blocks", []))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        child(args)
        return 0
    if args.presets:
        return _main_presets(args)
    import torch

    cuda = args.device.startswith("cuda")
    settings = CUDA_SETTINGS if cuda else CPU_SETTINGS
    thp_modes = [False] if cuda else [False, True]
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    out("# Encoder-alone throughput (benchmarks/encoder_speed.py)")
    out(
        f"date {time.strftime('%Y-%m-%d %H:%M:%S')}; python {platform.python_version()}; "
        f"torch {torch.__version__}; device {args.device}"
        + (f" ({torch.cuda.get_device_name(0)})" if cuda and torch.cuda.is_available() else "")
    )
    cpu_flags = ""
    if Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0]
        cpu_flags = " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags.split())
    out(
        f"cpus {os.cpu_count()} (flags: {cpu_flags or '-'}); threads {args.threads}; batch {args.batch_size}; "
        f"tiles {args.tile_px}px uint8 -> transform -> model; {args.batches} timed + {args.warmup} warm-up "
        f"batches per run; {args.rounds} interleaved rounds, median reported"
    )
    out(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t_start = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        for encoder in encoders:
            runs: Runs = {}
            feats: dict[str, str] = {}
            for r in range(args.rounds):
                for setting in settings:
                    for thp in thp_modes:
                        fo = ""
                        if r == 0 and not thp:
                            fo = str(Path(tmp) / f"{encoder}_{setting}.npy")
                            feats[setting] = fo
                        runs.setdefault((setting, thp), []).append(
                            _run_child(args, encoder, setting, thp, fo)
                        )

            base_wall = _med(runs, "fp32", False, "img_s")
            base_best = _best(runs, "fp32", False, "best_batch_img_s")
            first = runs[("fp32", False)][0]
            out()
            out(f"## {encoder} ({first['feature_dim']}-d, weights: {first['weights']})")
            out(
                f"{'setting':<14} {'THP':<4} {'wall img/s':>10} {'ratio':>6} {'best-batch':>10} {'ratio':>6} "
                f"{'cpu-norm':>9} {'cos min/mean':>17} {'transform':>9}"
            )
            for setting in settings:
                cmin, cmean = _cosines(feats["fp32"], feats[setting])
                cos = "-" if setting == "fp32" else f"{cmin:.6f}/{cmean:.6f}"
                for thp in thp_modes:
                    wall = _med(runs, setting, thp, "img_s")
                    bb = _best(runs, setting, thp, "best_batch_img_s")
                    out(
                        f"{setting:<14} {'on' if thp else 'off':<4} {wall:10.1f} {wall / base_wall:5.2f}x "
                        f"{bb:10.1f} {bb / base_best:5.2f}x {_med(runs, setting, thp, 'cpu_img_s'):9.1f} {cos:>17} "
                        f"{_med(runs, setting, thp, 'transform_img_s'):9.0f}"
                    )
    out()
    out(
        "wall img/s: median over rounds of timed images / wall time; best-batch: the fastest single batch "
        "over all rounds (least disturbed by other processes); cpu-norm: images per process CPU-second x "
        "threads; ratios are vs fp32 without THP; cos min/mean: minimum and mean over 32 real-tissue tiles "
        "(IHC) of the cosine similarity to fp32 features; transform: uint8 -> normalised float alone, img/s."
    )
    out()
    out(
        f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; took {time.time() - t_start:.0f} s"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


def _main_presets(args: argparse.Namespace) -> int:
    import torch

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    out("# Encoder presets: throughput at fp32 and at the default precision (benchmarks/encoder_speed.py --presets)")
    cuda = args.device.startswith("cuda")
    out(
        f"date {time.strftime('%Y-%m-%d %H:%M:%S')}; python {platform.python_version()}; torch {torch.__version__}; "
        f"device {args.device}" + (f" ({torch.cuda.get_device_name(0)})" if cuda and torch.cuda.is_available() else "")
        + f"; threads {args.threads}; batch {args.batch_size}; {args.batches} timed + {args.warmup} warm-up batches, "
        f"{args.rounds} interleaved rounds, median"
    )
    out(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t0 = time.time()
    run_presets(args, out)
    out(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; took {time.time() - t0:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
