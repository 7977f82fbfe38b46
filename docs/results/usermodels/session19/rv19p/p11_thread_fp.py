"""A model that names np.random only in a training branch (eval never draws: the session's own TrainOnlyNoise test
model), built while another thread of the application draws from NumPy's global generator (an augmentation /
data-loading thread, as albumentations-style pipelines do): the capture is refused at random, as a forward that
'draws random numbers in Python', though the forward never draws."""

import threading
import time

import numpy as np
import torch
from torch import nn

from ue_client import CoinferClient


class TrainOnlyNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(6)])

    def forward(self, x):
        if self.training:
            x = x + torch.from_numpy(np.random.randn(*x.shape).astype("float32")) * 0.1
        return self.body(x)


stop = False


def loader():  # the application's augmentation thread
    while not stop:
        np.random.rand(64, 64)
        time.sleep(0.001)


t = threading.Thread(target=loader, daemon=True)
t.start()
x = torch.randn(1, 16, 64, 64)
refused = 0
for i in range(5):
    torch.manual_seed(i)
    try:
        c = CoinferClient(TrainOnlyNoise().eval(), (x,))
        c.close()
    except Exception as e:
        refused += 1
        msg = str(e)
print(f"refused {refused} of 5 builds" + (f": {msg[:200]}" if refused else ""))
stop = True
t.join()
