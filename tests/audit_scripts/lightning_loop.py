"""The same kind of model written with PyTorch Lightning (the bench extra):
a LightningModule, a DataLoader, Trainer.fit; Lightning calls
optimizer.step through a closure."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    L.seed_everything(0, workers=True)
    data = TensorDataset(torch.randn(512, 16), torch.randint(0, 4, (512,)))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Classifier(), DataLoader(data, batch_size=32, shuffle=True))


if __name__ == "__main__":
    main()
