"""Lets the CUDA-only torchvision wheel import on CPU-only machines (development / CI venv only).

The only torchvision wheel that pins torch 2.13 here is a CUDA build whose `_C.so` needs libtorch_cuda, so
`import torchvision` fails with "operator torchvision::nms does not exist" — and that breaks transformers'
processor imports too. Installed as a `.pth` hook by `make setup`, this defines the missing op schemas just
before torchvision is first imported, and does nothing where the real ops load (GPU machines). The `swim`
package itself never imports torchvision; this is only for the official-processor comparison test and the
qwen-vl-utils throughput baseline.
"""

import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None


def _define_missing_ops() -> None:
    global _LIBRARY
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    package_dir = list(spec.submodule_search_locations)[0]
    for name in os.listdir(package_dir):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(package_dir, name))
                return  # real ops available
            except (OSError, RuntimeError):
                break
    if hasattr(torch.ops.torchvision, "nms"):
        return
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_missing_ops()
        return None


if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionImportHook())
