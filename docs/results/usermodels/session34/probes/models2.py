import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn

which = sys.argv[1:]


class RetTypes(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(6, 5)

    def forward(s, x):
        l = s.fc(x)  # noqa: E741
        return l.max(1), l.topk(2), l.sort(-1, descending=True), torch.std_mean(l, 1)


class ParamOut(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(6, 5)
        s.register_buffer("center", torch.randn(5))

    def forward(s, x):
        return s.fc(x), s.fc.weight, s.center, s.fc.bias.T


class Scalars(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(6, 5)

    def forward(s, x, temperature: float = 1.0, top_k: int = 2, mode: str = "soft", flag: bool = True):
        l = s.fc(x) / temperature  # noqa: E741
        if mode == "soft":
            l = l.softmax(-1)  # noqa: E741
        v = l.topk(top_k, -1).values
        return v if flag else -v


class DictIn(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)
        s.b = nn.Linear(3, 4)

    def forward(s, batch):
        out = s.a(batch["x"]) + s.b(batch["y"]).mean(1, keepdim=True)
        extra = [t.sum() for t in batch.get("extras", [])]
        return out, extra


class Batch0(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 4, 3)
        s.fc = nn.Linear(4, 2)

    def forward(s, x):
        return s.fc(s.c(x).mean((2, 3)))


class NoGradFwd(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(6, 5)

    @torch.no_grad()
    def forward(s, x):
        return s.fc(x).relu_()


MODELS = {
    "rettypes": (RetTypes(), (torch.randn(3, 6),), {}, None),
    "paramout": (ParamOut(), (torch.randn(3, 6),), {}, None),
    "scalars": (
        Scalars(),
        (torch.randn(3, 6),),
        {},
        [
            ((torch.randn(3, 6), 0.5), {}),
            ((torch.randn(3, 6),), {"temperature": 2.0, "top_k": 3}),
            ((torch.randn(3, 6),), {"mode": "hard", "flag": False}),
            ((torch.randn(3, 6), 0.7, 1, "soft", False), {}),
            ((torch.randn(3, 6), 3), {}),
        ],
    ),
    "dictin": (
        DictIn(),
        ({"x": torch.randn(2, 4), "y": torch.randn(2, 5, 3)},),
        {},
        [(({"x": torch.randn(2, 4), "y": torch.randn(2, 5, 3), "extras": [torch.randn(3), torch.randn(2, 2)]},), {})],
    ),
    "batch0": (
        Batch0(),
        (torch.randn(2, 3, 8, 8),),
        {},
        [((torch.randn(0, 3, 8, 8),), {}), ((torch.randn(1, 3, 8, 8),), {}), ((torch.randn(2, 3, 9, 7),), {})],
    ),
    "nogradfwd": (NoGradFwd(), (torch.randn(3, 6),), {}, None),
}
for name in which or MODELS:
    torch.manual_seed(1)
    m, a, k, calls = MODELS[name]
    calls = [(a, k)] + (calls or [])
    harness.check_all(name, m, a, k, calls=calls, modes=("grad", "inference"), cuts={1})
