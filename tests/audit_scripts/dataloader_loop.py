"""A training loop fed by torch.utils.data.DataLoader with shuffling and two
worker processes, seeded through an explicit generator; Adam, 3 epochs.
`python dataloader_loop.py spawn` starts the workers with spawn, not fork."""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(512, 16), torch.randint(0, 4, (512,)))
    loader = DataLoader(data, batch_size=64, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(1),
                        multiprocessing_context=sys.argv[1] if len(sys.argv) > 1 else None)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(3):
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch} loss {loss.item():.6f}")


if __name__ == "__main__":  # spawn-safe: workers import this file
    main()
