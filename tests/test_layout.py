"""The package's shape: file formats unchanged by moves, module sizes, no import cycles, one-way data flow,
and a README module map that matches the folders."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_mil.store.bag_file import BagWriter
from wsi_mil.store.coords_file import TileGrid, write_coords_h5
from wsi_mil.store.geojson import tile_detections_text, write_geojson
from wsi_mil.store.heatmap_file import read_heatmap_h5, write_heatmap_h5
from wsi_mil.store.score_file import load_scores, write_scores

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsi_mil"
DATA = Path(__file__).parent / "data"

#: Stages in the order data flows; a module of a stage never imports a later stage, a run, the CLI or the demo.
STAGES = ("slide", "tissue", "tiling", "features", "mil", "cohort", "heatmap")
ABOVE_STAGES = ("runs", "cli", "demo")


def _write_every_format(out: Path) -> dict[str, str]:
    """One file of each format from fixed inputs (the same inputs that wrote ``format_hashes.json``)."""
    attrs = json.loads((DATA / "bag_attrs.json").read_text())  # the attributes of a sample-cohort bag
    rng = np.random.default_rng(20261207)
    n, d = 40, 24
    feats = rng.standard_normal((n, d)).astype(np.float32)
    coords = (rng.integers(0, 200, (n, 2)) * 512).astype(np.int64)
    att = rng.random(n)
    att /= att.sum()
    inst = rng.random((n, 2)).astype(np.float32)
    with BagWriter(out / "bag.h5", d, attrs, expected_rows=n) as writer:
        for i in range(0, n, 8):  # appended in batches, as extract streams them
            writer.append(feats[i : i + 8], coords[i : i + 8])
    write_scores(
        out / "scores.h5", slide_id="case001_A", coords=coords, attention=att.astype(np.float32),
        instance_probabilities=inst, class_names=["normal", "tumor"], bag_probabilities=np.array([0.25, 0.75]),
        predicted_class="tumor", label="tumor", model="loss_attention", n_checkpoints=5, tile_px=256, mpp=0.5,
        footprint_px=512, slide_mpp=0.25, encoder_name="tf_efficientnet_lite0",
        source_feature_file="/data/features/case001_A.h5",
    )
    grid = TileGrid(
        coords=coords, tile_px=256, mpp=0.5, slide_mpp=0.25, footprint_px=512, footprint_px_exact=512.0, stride_px=256,
        slide_dimensions=(102400, 102400), tissue_fraction=rng.random(n).astype(np.float32), level=0,
        min_tissue_fraction=0.5, slide_id="case001_A",
    )
    write_coords_h5(out / "coords.h5", grid, "case001_A", extra_attrs={"source_file": "case001_A.svs", "none": None})
    heat = rng.random((30, 40)).astype(np.float32)
    heat[0, :5] = np.nan
    write_heatmap_h5(
        out / "heatmap.h5", heatmap=heat, count=(heat > 0.5).astype(np.int32), tissue=heat > 0.2, coords=coords,
        scores=att, attention=att, instance_probabilities=inst,
        attrs={"slide_id": "case001_A", "slide_dimensions": [102400, 102400], "vmin": 0.0, "vmax": 1.0},
    )
    write_geojson(out / "tiles.geojson", tile_detections_text(coords, 512.0, {"attention": att, "P(tumor)": inst[:, 1]}))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


def test_every_file_format_is_byte_identical_to_the_files_written_before_the_layout_move(tmp_path):
    golden = json.loads((DATA / "format_hashes.json").read_text())
    if (h5py.version.version, h5py.version.hdf5_version) != (golden["h5py"], golden["hdf5"]):
        pytest.skip(f"hashes were recorded with h5py {golden['h5py']} / HDF5 {golden['hdf5']} (constraints.txt pins them)")
    assert _write_every_format(tmp_path) == golden["sha256"]
    # and each file reads back through its one validating reader
    scores = load_scores(tmp_path / "scores.h5")
    assert scores.n_tiles == 40 and scores.predicted_class == "tumor" and scores.footprint_px == 512
    assert read_heatmap_h5(tmp_path / "heatmap.h5").attrs["slide_dimensions"] == [102400, 102400]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every ``wsi_mil`` module that ``path`` imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("wsi_mil"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsi_mil"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # importing a module always runs its parent packages first: an edge to one's own ancestor package
        # (``from wsi_mil.cli import common`` inside ``wsi_mil.cli.heatmap``) is no cycle
        graph[name] = {
            m for m in _imports(path, name) if m in modules and m != name and not name.startswith(m + ".") and m != "wsi_mil"
        }
    return graph


def test_no_module_is_over_600_lines_and_those_over_400_say_why():
    too_long, unexplained = [], []
    for name, path in _modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > 600:
            too_long.append(f"{name} ({n})")
        elif n > 400:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            if "one module" not in doc.lower():
                unexplained.append(f"{name} ({n})")
    assert not too_long, f"modules over 600 lines: {too_long}"
    assert not unexplained, f"modules over 400 lines without 'one module because ...' in the docstring: {unexplained}"


def test_there_is_no_import_cycle_even_through_imports_inside_functions():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_data_flows_one_way_and_the_library_never_imports_the_cli():
    graph = _graph()
    wrong = []
    for module, deps in graph.items():
        room = _room(module)
        for dep in deps:
            target = _room(dep)
            if room != "cli" and target == "cli" and module != "wsi_mil.__main__":
                wrong.append(f"{module} imports the CLI ({dep})")
            if room in STAGES and (target in ABOVE_STAGES or (target in STAGES and STAGES.index(target) > STAGES.index(room))):
                wrong.append(f"stage {module} reaches up to {dep}")
            # a checkpoint is a model's weights: reading one rebuilds the model from the registry
            allowed = ("store", "errors", "") + (("mil",) if module == "wsi_mil.store.checkpoint" else ())
            if room == "store" and target not in allowed:
                wrong.append(f"the store imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_readme_module_map_names_every_package_folder_and_only_folders_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(wsi_mil/[\w/]*?/?(?:[\w]+\.py)?)`", section))
    assert named, "the README has no module map"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the module map names paths that do not exist: {missing}"
    folders = {f"wsi_mil/{p.parent.relative_to(PACKAGE)}/" for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    unnamed = sorted(folders - named)
    assert not unnamed, f"package folders missing from the README's module map: {unnamed}"
