# session 18 (newuser18) probe, run from the repository root (commands in results.md)
import sys

import torch

sys.path.insert(0, ".")
from tests import user_models18 as um
from ue_client import CoinferClient

m, a, k = um.det_dict_of_lists()
c = CoinferClient(m, a)
for what in ("inplace", "replace", "setattr"):
    m, a, k = um.det_dict_of_lists()
    c = CoinferClient(m, a)
    if what == "inplace":
        m.anchors.add_(1)
    elif what == "replace":
        m.register_buffer("anchors", torch.zeros(3, 4))
    else:
        m.anchors = torch.ones(3, 4)
    try:
        y = c(*a)
        print(what, torch.equal(y["anchors"], m(*a)["anchors"]))
    except Exception as e:
        print(what, "RAISED", str(e)[:150])
