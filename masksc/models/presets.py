"""Named model + training recipes (``MaskSCConfig``); every checkpoint stores the one it used.

- ``paper``: the mask-sc paper's setting (64 x 64 grid = 4096 genes, P = 4, ViT-B-sized
  encoder, depth-8 decoder, 75% masking, AdamW lr 1e-4, betas (0.9, 0.95), batch 256,
  1600 epochs). Needs a GPU.
- ``cpu``: meant to train a ~4k-cell dataset on 2 CPU cores in under 30 minutes (see the
  README's results for measured times and scores): 48 x 48 grid (2304 genes; the PBMC
  top-2000 file keeps 1989 genes detected in >= 3 cells (fit's ``min_cells``), leaving the
  last 315 positions as padding, 12 all-padding patches), P = 4 -> 144
  tokens, D = 128, depth 4 / 4 heads, decoder 64 x 1, whole-cell teacher targets (``cell``
  beat ``row`` and ``patch``), batch 64 (4x the optimiser steps of batch 256 for the same
  compute: PBMC ARI 0.74 after 5 epochs vs 0.67 after 10 epochs at batch 256), 40 epochs
  (3 seeds, IME off: worm NMI 0.732 vs 0.697 at 20 epochs, ARI 0.560 +- 0.086 vs
  0.576 +- 0.033; PBMC 0.785 / 0.782 vs 0.783 / 0.779; ~24 min per PBMC run on 2 cores),
  mask ratio 0.5 rather than the paper's 0.75: scRNA-seq grids are 90-99% zeros, and at 0.75
  a worm-neuron cell shows the encoder only ~6 of its ~25 detected grid genes. Seed 0, 20
  epochs: worm (all genes) ARI 0.568 vs 0.503, PBMC 0.782 vs 0.766 (3-seed mean at 0.75);
  a run costs 1.3x (PBMC, 461 vs 367 s) to 1.6x (worm, 460 vs 287 s) as much (twice the
  visible tokens). 4 x 4 grid patches (IME on, the
  paper's tokens) rather than 1-D tokens of 16 consecutive HVG-ranked genes: 3 seeds at this
  preset's 40 epochs and lr 5e-4, PBMC ARI / NMI 0.789 / 0.783 vs 0.783 / 0.781, worm
  0.628 +- 0.015 / 0.731 vs 0.586 +- 0.075 / 0.727 (1-D tokens had led at 20 epochs and
  lr 1e-3: worm 0.576 vs 0.535, PBMC level). AdamW lr 5e-4 rather than 1e-3: 3 seeds with
  1-D tokens, worm ARI 0.586 +- 0.075 vs 0.560 +- 0.086 (10 k-means draws per model: 0.584
  vs 0.556, higher for each seed), PBMC 0.783 / 0.781 vs 0.785 / 0.782.
- ``demo``: for the 700-cell pbmc68k_reduced demo (765 genes): a 28 x 28 grid, P = 4 ->
  49 tokens, D = 64, depth 2, decoder 32 x 1, batch 32, 80 epochs, mask 0.5 (as ``cpu``):
  52-60 s of training on 2 CPU cores, ARI 0.53 / NMI 0.66 on the 10 bulk labels against
  0.48 / 0.66 for PCA(50) + k-means on the same input (mask 0.75: 0.46 / 0.62; 30 epochs at
  batch 64 gave only 0.27).
"""
from __future__ import annotations

from masksc.models.masksc_model import MaskSCConfig

PRESETS: dict[str, MaskSCConfig] = {
    "paper": MaskSCConfig(grid_shape=(64, 64), patch=4, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                          decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75,
                          epochs=1600, batch_size=256, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95),
                          warmup_epochs=40),
    "cpu": MaskSCConfig(grid_shape=(48, 48), patch=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0,
                        decoder_dim=64, decoder_depth=1, decoder_heads=4, mask_ratio=0.5, target_fragment="cell",
                        ime=True, epochs=40, batch_size=64, lr=5e-4, weight_decay=0.05, betas=(0.9, 0.95),
                        warmup_epochs=1),
    "demo": MaskSCConfig(grid_shape=(28, 28), patch=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                         decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=0.5, target_fragment="cell",
                         epochs=80, batch_size=32, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95),
                         warmup_epochs=2),
}


def get_preset(name: str) -> MaskSCConfig:
    """The preset called ``name`` (``paper``, ``cpu`` or ``demo``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
