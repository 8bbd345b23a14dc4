"""A trained mask-sc encoder bundled with the preprocessing and gene grid it was trained on.

``fit`` runs the whole recipe on an AnnData (preprocess -> grid layout -> teacher -> masked
expression training) and returns a ``MaskSCModel``; ``MaskSCModel.load(dir)`` restores one
from its checkpoint directory and embeds new data with the saved transform, refusing data
whose genes do not match.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from masksc import checkpoint as ckpt
from masksc.data import GridLayout, Preprocessor
from masksc.embed import embed_matrix
from masksc.models import MaskSC
from masksc.models.presets import get_preset

log = logging.getLogger(__name__)


class MaskSCModel:
    """A mask-sc network (``network``, a MaskSC) with its fitted ``preprocessor`` and ``grid``."""

    def __init__(self, network: MaskSC, preprocessor: Preprocessor, grid: GridLayout, path: str | None = None):
        self.network = network
        self.preprocessor = preprocessor
        self.grid = grid
        self.path = path

    @property
    def config(self):
        """The MaskSCConfig the network was built with."""
        return self.network.cfg

    @property
    def genes(self) -> list[str]:
        """Input genes the model needs (those placed on the grid)."""
        return [g for g in self.grid.genes if g]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "MaskSCModel":
        """Load the model saved in ``path`` (a checkpoint directory or a training run directory,
        whose ``last`` checkpoint is used). Raises CheckpointError when it is missing or broken."""
        network, config = ckpt.load_model(path, device=device)
        meta = config.get("meta") or {}
        if "preprocessor" not in meta or "grid" not in meta:
            from masksc.errors import CheckpointError
            raise CheckpointError(f"{config['path']} has no saved preprocessing/grid, so it cannot embed new data; "
                                  "save it with masksc.tl.fit / `masksc fit`.")
        return cls(network, Preprocessor.from_dict(meta["preprocessor"]), GridLayout.from_dict(meta["grid"]),
                   path=config["path"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as a checkpoint directory (config.json + model.safetensors), atomically."""
        return ckpt.save_checkpoint(path, self.network, extra=self.meta())

    def meta(self) -> dict:
        """The JSON-able transform saved beside the weights."""
        return {"preprocessor": self.preprocessor.to_dict(), "grid": self.grid.to_dict()}

    def to_grid(self, adata):
        """Preprocess ``adata`` with the saved transform and lay it on the grid: CSR float32
        [n_cells, g*s]. Raises CheckpointError when ``adata`` lacks genes the model needs."""
        ckpt.check_genes(self.grid.to_dict(), adata.var_names)
        return self.grid.to_grid(self.preprocessor.transform(adata))

    def embed(self, adata, batch_size: int = 1024, device: str | torch.device | None = None,
              progress: bool = True) -> np.ndarray:
        """Embeddings of the cells of ``adata``: float32 [n_cells, embed_dim], in row order."""
        return embed_matrix(self.network, self.to_grid(adata), batch_size=batch_size, device=device,
                            progress=progress)


def fit(adata, preset: str = "cpu", *, model_dir: str | os.PathLike | None = None, epochs: int | None = None,
        seed: int = 0, device: str | None = None, resume: bool = False, checkpoint_every: int | None = None,
        progress: bool = True, **overrides):
    """Train mask-sc on ``adata`` (raw counts or log-normalised, cells x genes).

    ``preset`` names a recipe in ``masksc.models.PRESETS``; ``overrides`` replace its fields
    (e.g. ``grid_shape=(32, 32)``, ``mask_ratio=0.5``, ``layout="correlation"``, ``ime=False``).
    ``model_dir``: where checkpoints go (every ``checkpoint_every`` epochs, atomically);
    ``resume=True`` continues the run there. Returns (MaskSCModel, TrainResult).
    """
    from masksc.train import TrainConfig, fit_masksc

    cfg = get_preset(preset)
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = cfg.replace(**overrides)
    preprocessor = Preprocessor(n_top_genes=cfg.n_genes).fit(adata)
    X = preprocessor.transform(adata).X
    grid = GridLayout.fit(X, preprocessor.genes_, shape=cfg.grid_shape, patch=cfg.patch, order=cfg.layout,
                          seed=seed)
    X_grid = grid.to_grid(X)
    train_kw = dict(seed=seed, checkpoint_dir=str(model_dir) if model_dir else None, resume=resume,
                    device=device, progress=progress)
    if checkpoint_every is not None:
        train_kw["checkpoint_every"] = checkpoint_every
    train_cfg = TrainConfig.from_model_config(cfg, **train_kw)
    bundle_meta = {"preprocessor": preprocessor.to_dict(), "grid": grid.to_dict()}
    network, result = fit_masksc(X_grid, cfg, train_cfg, is_padding=grid.is_padding, extra_state=bundle_meta,
                                 progress=progress)
    path = result.checkpoint
    log.info("trained %s preset for %d epochs in %.1fs (final loss %.4f)", preset, result.epochs, result.wall_s,
             result.losses[-1] if result.losses else float("nan"))
    return MaskSCModel(network, preprocessor, grid, path=path), result
