import contextlib
import sys

sys.path.insert(0, "docs/results/usermodels/session34")

import harness
import torch
import torch.nn.functional as F
from torch import nn

from ue_client import CoinferClient


class Enc(nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True), 2, enable_nested_tensor=False
        )

    def forward(s, x, pad=None):
        return s.enc(x, src_key_padding_mask=pad)


class Full(nn.Module):
    def __init__(s):
        super().__init__()
        s.t = nn.Transformer(16, 2, 1, 1, 32, batch_first=True)

    def forward(s, src, tgt):
        m = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return s.t(src, tgt, tgt_mask=m, tgt_is_causal=True)


class MHA2(nn.Module):
    def __init__(s):
        super().__init__()
        s.mha = nn.MultiheadAttention(16, 4)  # seq-first

    def forward(s, x, mask=None):
        y, w = s.mha(x, x, x, key_padding_mask=mask)
        return y.transpose(0, 1), w


class SDPA(nn.Module):
    def __init__(s):
        super().__init__()
        s.qkv = nn.Linear(16, 48)
        s.o = nn.Linear(16, 16)

    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.qkv(x).split(16, -1)
        q, k, v = (t.view(B, T, 4, 4).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return s.o(y.transpose(1, 2).reshape(B, T, C)), y


models = {
    "enc": (Enc, lambda: ((torch.randn(2, 5, 16),), {"pad": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])})),
    "full": (Full, lambda: ((torch.randn(2, 6, 16), torch.randn(2, 4, 16)), {})),
    "mha2": (MHA2, lambda: ((torch.randn(5, 2, 16),), {"mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])})),
    "sdpa": (SDPA, lambda: ((torch.randn(2, 5, 16),), {})),
}
which = sys.argv[1:] or list(models)
srv = harness.server()
try:
    for name in which:
        cls, mk = models[name]
        for frozen in (False, True):
            torch.manual_seed(3)
            m = cls().eval().requires_grad_(not frozen)
            a, k = mk()
            cs = [("local", CoinferClient(m, a, example_kwargs=k))]
            n = len(cs[0][1].graph.ops)
            cs += [(f"split{j}/{n}", harness.remote(srv, m, a, j, k, fallback=False)) for j in (n // 4, n // 2)]
            cs += [("all-server", harness.remote(srv, m, a, None, k, fallback=False))]
            bad = 0
            for path, c in cs:
                with c:
                    for rep in range(2):
                        for rg in (False, True):
                            for mode in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
                                if rg and mode is torch.inference_mode:
                                    continue
                                a2 = tuple(t.clone().requires_grad_(rg) for t in a)
                                with mode():
                                    try:
                                        got = c(*a2, **k)
                                    except Exception as e:
                                        print("ERR", name, path, rg, mode.__name__, e)
                                        bad += 1
                                        continue
                                    want = m(*a2, **k)
                                p = harness.diff(got, want)
                                if p:
                                    bad += 1
                                    if bad < 6:
                                        print(
                                            "MISMATCH",
                                            name,
                                            "frozen" if frozen else "trainable",
                                            path,
                                            rep,
                                            "rg" if rg else "",
                                            mode.__name__,
                                            p[:3],
                                        )
            print(name, "frozen" if frozen else "trainable", "OK" if not bad else f"{bad} mismatches")
finally:
    srv.stop()
