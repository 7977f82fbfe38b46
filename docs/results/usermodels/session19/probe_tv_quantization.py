"""Session 19: torchvision's 12 quantization models in float (``quantize=False``, ``weights=None``): how many
``FloatFunctional`` modules each holds (session 18 refused every model holding one), capture, and the local answer
against eager (64x64; inception_v3 299x299). Seconds include the capture and one call; machine shared.

    PYTHONPATH=$PWD .venv/bin/python docs/results/usermodels/session19/probe_tv_quantization.py [NAME ...]
"""

import sys
import time

import torch

from modelgraph.tv_compat import import_torchvision
from ue_client import CoinferClient, InputError

tv = import_torchvision()
names = tv.models.list_models(module=tv.models.quantization)
print(len(names), names, flush=True)
for n in sys.argv[1:] or names:
    m = tv.models.get_model(n, weights=None, quantize=False).eval()
    ff = sum("functional_modules" in type(s).__module__ for s in m.modules())
    size = 299 if "inception" in n else 64
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    try:
        c = CoinferClient(m, (x,))
        with torch.no_grad():
            ok = torch.allclose(c(x), m(x), atol=1e-4)
        print(n, f"FloatFunctional x{ff}", "captured, equal:", ok, "%.1f s" % (time.perf_counter() - t0), flush=True)
    except InputError as e:
        print(n, f"FloatFunctional x{ff}", "REFUSED:", str(e)[:200], flush=True)
