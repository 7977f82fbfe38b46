"""False refusal: an RNN module's client refuses after a second capture of the same module (newuser16)."""
import torch
from torch import nn

from ue_client import CoinferClient


class Gru(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        y, _h = self.gru(self.emb(ids))
        return self.out(y)


torch.manual_seed(0)
m = Gru().eval()
a, b = torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (4, 9))
for case in ("one client, new batch", "second client on the same module"):
    c = CoinferClient(m, (a,))
    c(a)
    try:
        if case.startswith("one"):
            c(b)            # a new signature: captured once more from the same module
            c(a)
        else:
            CoinferClient(m, (a,))
            c(a)
        print(case, ": ok")
    except Exception as e:
        print(case, ":", type(e).__name__, str(e)[:200])
