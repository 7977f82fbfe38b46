"""nn.MultiheadAttention's fused path depends on whether grad is enabled AND whether any parameter or input requires
grad. The grad layout is recorded for the requires_grad flags at capture; a user who freezes the model afterwards
(model.requires_grad_(False), common for inference), or passes an input that requires grad, changes eager's path."""

import torch
from common import client, compare
from torch import nn

torch.manual_seed(0)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y, _ = self.m(x, x, x, need_weights=False)
        return y


x = torch.randn(2, 5, 8)
for freeze_at in ("after", "before"):
    m = Attn().eval()
    if freeze_at == "before":
        m.requires_grad_(False)
    with client(m, (x,), k=2) as c:
        if freeze_at == "after":
            m.requires_grad_(False)
        else:
            m.requires_grad_(True)
        for xin, tag in ((x, "x"), (x.clone().requires_grad_(True), "x.requires_grad")):
            for mode in ("grad", "no_grad"):
                ctx = torch.enable_grad() if mode == "grad" else torch.no_grad()
                with ctx:
                    try:
                        got = c(xin)
                    except Exception as e:
                        print(f"FAIL freeze {freeze_at} {tag} {mode}: raised {type(e).__name__}: {str(e)[:100]}")
                        continue
                    want = m(xin)
                p = compare(
                    f"requires_grad_ changed {freeze_at} capture, {tag}, {mode}, srv={c.last_report.server_ops}",
                    got,
                    want,
                )
                try:
                    want.view(10, 8)
                    ok_e = "ok"
                except RuntimeError:
                    ok_e = "raises"
                try:
                    got.view(10, 8)
                    ok_c = "ok"
                except RuntimeError:
                    ok_c = "raises"
                if ok_e != ok_c:
                    print(f"     y.view(10, 8): eager {ok_e}, client {ok_c}")
