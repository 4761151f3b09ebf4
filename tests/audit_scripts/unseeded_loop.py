"""The plain loop without torch.manual_seed: its data and initial weights come
from torch's unseeded global generator, so two runs differ (run-to-run) until
`pipeline exec` seeds it."""

import torch
from torch import nn

x = torch.randn(128, 16)
y = torch.randint(0, 4, (128,))
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(10):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
