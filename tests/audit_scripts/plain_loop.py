"""A plain PyTorch training loop, as users write them: a small MLP on random
data from a seeded generator, SGD with momentum, cross-entropy, 20 steps.
`pipeline audit -- python tests/audit_scripts/plain_loop.py` audits it."""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(256, 32)
y = torch.randint(0, 10, (256,))
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for step in range(20):
    i = torch.arange(step * 32, step * 32 + 32) % 256
    loss = nn.functional.cross_entropy(model(x[i]), y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.6f}")
