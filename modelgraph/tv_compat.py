"""The one place that knows about the CPU-torch / CUDA-torchvision mismatch (DESIGN §9).

The PyPI torchvision 0.28.0 wheel is a CUDA build; on the CPU torch its import fails with
"operator torchvision::nms does not exist". Defining the two ops it registers fake kernels for
makes the classification models importable (detection ops stay unavailable). Applied only when the
plain import fails.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

log = logging.getLogger(__name__)
_LIBRARY = None  # keep the torch.library object alive: the op definitions die with it


def import_torchvision() -> ModuleType:
    global _LIBRARY
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        log.debug("torchvision import failed (%s); defining torchvision::nms/qnms stubs", e)
    import torch

    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    if _LIBRARY is None:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY = lib
    return importlib.import_module("torchvision")
