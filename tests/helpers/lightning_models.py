"""Shared small models and data for the FlatnessCallback tests (no tests here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset


def make_data(n: int, dim: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


class Classifier(LightningModule):
    def __init__(self, dim: int = 8, hidden: int = 16, classes: int = 3, lr: float = 0.1, dropout: float = 0.1,
                 batchnorm: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(dim, hidden), norm, nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class DataModule(LightningDataModule):
    def __init__(self, n_train: int = 256, n_val: int = 128, batch_size: int = 32, shuffle: bool = True,
                 val: bool = True) -> None:
        super().__init__()
        self.n_train, self.n_val, self.batch_size, self.shuffle, self.val = n_train, n_val, batch_size, shuffle, val
        self.train_set = make_data(n_train, seed=0)
        self.val_set = make_data(n_val, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        if not self.val:
            return []
        return DataLoader(self.val_set, batch_size=64)


class Stream(IterableDataset):
    """An iterable-style dataset (cannot be indexed)."""

    def __init__(self, n: int = 256) -> None:
        self.data = make_data(n)

    def __iter__(self):
        return iter(zip(self.data.tensors[0], self.data.tensors[1]))


def trainer(tmp_path, callbacks=(), logger=False, **kwargs) -> Trainer:
    defaults = dict(max_epochs=2, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, logger=logger, default_root_dir=str(tmp_path), deterministic=True)
    defaults.update(kwargs)
    return Trainer(callbacks=list(callbacks), **defaults)


def full_and_resumed(tmp_path, make_callback, epochs: int = 3):
    """The callbacks of two fits of ``epochs`` epochs from the same seed: one straight through, one resumed
    from the checkpoint a one-epoch fit saved. ``make_callback()`` builds a fresh callback for each fit."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, max_epochs, ckpt=None):
        cb = make_callback()
        seed_everything(0)
        checkpoints = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        fitter = trainer(root, [cb, checkpoints], max_epochs=max_epochs, enable_checkpointing=True)
        fitter.fit(Classifier(dropout=0.0), DataModule(shuffle=False), ckpt_path=ckpt)
        return cb

    full = run(tmp_path / "full", epochs)
    run(tmp_path / "part", 1)
    return full, run(tmp_path / "resumed", epochs, ckpt=str(tmp_path / "part" / "epoch=0.ckpt"))
