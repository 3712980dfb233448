"""``import_timm``: timm without ``torch._dynamo`` at start-up, and nothing else changed (fresh interpreters)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.compiler
    original = torch.compiler.disable
    from wsi_mil.features.timm_import import import_timm
    from wsi_mil.features.encoders import create_encoder  # noqa: F401  (the extract path imports it)
    timm = import_timm()
    report = {"dynamo_after_import": "torch._dynamo" in sys.modules,
              "stand_in_left": "torch._dynamo.utils" in sys.modules,
              "disable_restored": torch.compiler.disable is original}
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        report["features"] = model(x)[:, :4].tolist()
    report["dynamo_after_forward"] = "torch._dynamo" in sys.modules
    # timm's own compiler.disable-decorated function still works, and applies the real one when called
    from timm.layers import disable_compiler
    calls = []
    @disable_compiler
    def f(a):
        calls.append(a)
        return a + 1
    report["decorated"] = [f(1), calls]
    report["dynamo_after_decorated_call"] = "torch._dynamo" in sys.modules
    # torchvision.ops works; the real torch._dynamo and torch.compile are intact afterwards
    import torchvision.ops
    from torch._dynamo.utils import is_compile_supported
    report["compile_supported_cpu"] = bool(is_compile_supported("cpu"))
    report["roi_align"] = list(torchvision.ops.roi_align(torch.ones(1, 1, 8, 8), torch.tensor([[0, 0., 0., 4., 4.]]), (2, 2)).shape)
    compiled = torch.compile(lambda t: t * 2 + 1, backend="eager")
    report["compiled"] = compiled(torch.ones(3)).tolist()
    print(json.dumps(report))
    """
)


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_timm_leaves_torch_dynamo_out_until_it_is_used_and_changes_nothing_else():
    got = _run(CHECK)
    assert got["dynamo_after_import"] is False and got["dynamo_after_forward"] is False
    assert got["stand_in_left"] is False and got["disable_restored"] is True
    assert got["decorated"] == [2, [1]] and got["dynamo_after_decorated_call"] is True
    assert got["compile_supported_cpu"] is True and got["roi_align"] == [1, 1, 2, 2]
    assert got["compiled"] == [3.0, 3.0, 3.0]
    # the same model, imported the plain way (torch._dynamo and all), gives the same features
    plain = _run(
        "import json, torch, timm\n"
        "torch.manual_seed(0)\n"
        "m = timm.create_model('resnet18', pretrained=False, num_classes=0).eval()\n"
        "x = torch.rand(2, 3, 64, 64)\n"
        "with torch.no_grad():\n"
        "    print(json.dumps({'features': m(x)[:, :4].tolist(), 'dynamo': 'torch._dynamo' in __import__('sys').modules}))\n"
    )
    assert plain["dynamo"] is True  # what import_timm avoids
    assert plain["features"] == got["features"]


def test_import_timm_when_torch_dynamo_is_already_imported_is_plain_import():
    got = _run(
        "import json, sys, torch, torch._dynamo\n"
        "real = sys.modules['torch._dynamo.utils']\n"
        "from wsi_mil.features.timm_import import import_timm\n"
        "timm = import_timm()\n"
        "print(json.dumps({'same': sys.modules['torch._dynamo.utils'] is real, 'timm': timm.__name__}))\n"
    )
    assert got == {"same": True, "timm": "timm"}


def test_building_the_default_encoder_imports_no_torch_dynamo_and_leaves_nn_init_as_it_was():
    got = _run(
        "import json, sys, torch\n"
        "from torch import nn\n"
        "before = {n: getattr(nn.init, n) for n in dir(nn.init)}\n"
        "from wsi_mil.features.encoders import create_encoder\n"
        "enc = create_encoder('tf_efficientnet_lite0')\n"
        "with torch.no_grad():\n"
        "    f = enc.model(torch.rand(1, 3, 224, 224))\n"
        "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules, 'dim': f.shape[-1],\n"
        "                  'init_same': all(getattr(nn.init, n) is v for n, v in before.items()),\n"
        "                  'meta': any(p.is_meta for p in enc.model.parameters())}))\n"
    )
    assert got == {"dynamo": False, "dim": 1280, "init_same": True, "meta": False}


def test_fusing_a_resnet_for_the_cpu_imports_neither_torch_dynamo_nor_sympy():
    """The CPU fusion runs at every ``extract`` start-up: torch.fx's ShapeProp would import sympy (0.3 s)."""
    got = _run(
        "import json, sys, torch\n"
        "from wsi_mil.features.encoders import create_encoder\n"
        "enc = create_encoder('resnet18', random_init=True)\n"
        "model = enc.inference_model('fp32', 4)\n"
        "with torch.inference_mode():\n"
        "    f = model(torch.rand(2, 3, 224, 224))\n"
        "print(json.dumps({'fused': type(model).__name__, 'dim': f.shape[-1],\n"
        "                  'dynamo': 'torch._dynamo' in sys.modules, 'sympy': 'sympy' in sys.modules}))\n"
    )
    assert got == {"fused": "CpuFusedModel", "dim": 512, "dynamo": False, "sympy": False}
