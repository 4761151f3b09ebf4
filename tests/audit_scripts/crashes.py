"""Trains one step, then fails the way scripts fail."""

import torch

w = torch.nn.Parameter(torch.ones(3))
opt = torch.optim.SGD([w], lr=0.1)
w.sum().backward()
opt.step()
raise RuntimeError("the data file went away (audit crash test)")
