"""Two changes to what the mask-sc student reads, measured against the `cpu` preset as shipped
(the ``masksc`` row of Table 1, same seed):

- ``gene-scale``: each grid gene divided by its standard deviation over the cells and clipped
  at 10 (scanpy's ``scale`` without centring, so the data stays sparse). Log values let highly
  expressed genes dominate a patch, and the shared patch embedding cannot re-weigh one gene
  against another. The teacher standardises its own input, so it sees the same cells either
  way (up to the clip).
- ``per-patch-embed``: one patch-embedding weight per patch ([patches, P*P, D]) instead of
  ViT's single weight shared by every patch, so the first layer knows which genes it reads.
- ``med+values``: each masked patch regresses onto its teacher feature and, beside it, its own
  ``P*P`` values standardised within the patch (the MED-off target), through one head of
  ``target_dim + P*P`` outputs. The teacher's whole-cell feature is the same for every patch of
  a cell, so the student learns nothing about a cell that its teacher does not summarise; the
  values add what each patch holds (16 of the 76 elements each masked patch's error averages).
- ``med+views``: beside the MED loss on one masked view, NT-Xent (temperature 0.5, weight
  ``VIEW_WEIGHT``) between the mean-pooled encodings of two independently masked views of each
  cell, through a 2-layer projection head (SimCLR's recipe). The read-out is that mean pool;
  the contrastive term asks it to be the same whichever half of the cell the encoder sees, the
  invariance that makes the teacher's own embedding cluster well. ``med+views-0.01`` is the
  same at a tenth of the weight.
- ``gene-dropout-0.5`` / ``-0.2``: during training each detected value of the cell is dropped
  with that probability (inverted dropout, as the teacher's input dropout) before the patches
  are embedded, while the targets still come from the whole cell. Masking hides whole patches;
  this also hides genes inside the visible ones, asking the student for the teacher's feature
  from a sparser draw of the same cell, the augmentation contrastive-sc itself is built on.
  Embedding reads the cell undropped.

For each (dataset, seed, variant): fit's recipe (seurat_v3 HVG among genes detected in >= 3
cells, HVG-order grid, the default whole-cell teacher, the preset's training), then k-means
(k = number of labels) on the mean-pooled embedding. Each finished run is appended, under a
lock, to benchmarks/results/student_variants.json (with the device), so runs may go side by side:

    python benchmarks/student_variants.py --dataset pbmc --seeds 0 --variant gene-scale
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, seed_list  # noqa: E402
from benchmarks.reproduce import DATASETS, _cluster_and_score, _labels, append_run, seeded_runs  # noqa: E402
from masksc import ops  # noqa: E402
from masksc.models.contrastive import nt_xent  # noqa: E402
from masksc.models.masksc_model import MaskSC, csr_to_dense  # noqa: E402

RESULT = RESULTS / "student_variants.json"
CLIP = 10.0


class PerPatchEmbedMaskSC(MaskSC):
    """MaskSC whose patch embedding has its own weight per patch: token t of a cell is
    ``x[genes(t)] @ weight[t] + bias + position[t]`` with weight [patches, P*P, D]."""

    def __init__(self, cfg):
        super().__init__(cfg)
        weight = torch.empty(cfg.n_patches, cfg.patch * cfg.patch, cfg.embed_dim)
        for w in weight:
            torch.nn.init.xavier_uniform_(w.T)
        self.per_patch_weight = torch.nn.Parameter(weight)

    def tokenize(self, batch) -> torch.Tensor:
        dense = csr_to_dense(batch.crow_indices, batch.col_indices, batch.values.float(), self.cfg.n_genes)
        tokens = torch.einsum("bgk,gkd->bgd", dense[:, self.token_cols], self.per_patch_weight)
        return tokens + self.patch_bias + self.pos_embed


class MedPlusValuesMaskSC(MaskSC):
    """MaskSC whose target for each patch is [teacher feature (target_dim), the patch's P*P values
    standardised within the patch]: float32 [B, G, target_dim + P*P]."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = torch.nn.Linear(cfg.decoder_dim, cfg.out_dim + cfg.patch * cfg.patch)
        torch.nn.init.xavier_uniform_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def compute_targets(self, batch) -> torch.Tensor:
        dense = csr_to_dense(batch.crow_indices, batch.col_indices, batch.values, self.cfg.n_genes)
        return torch.cat([self.teacher_targets(dense), self.patch_values(dense, standardise=True)], dim=-1)


class MedPlusViewsMaskSC(MaskSC):
    """MaskSC trained on MED loss + VIEW_WEIGHT * NT-Xent between two masked views' pooled
    encodings (projected to PROJ_DIM, L2-normalised, temperature TEMPERATURE)."""

    VIEW_WEIGHT, TEMPERATURE, PROJ_DIM = 0.1, 0.5, 64

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.embed_dim
        self.projector = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, self.PROJ_DIM))

    def masked_view(self, tokens: torch.Tensor, seed: int):
        """One masked view: (latent [B, 1+U, D], ids_keep [B, U], mask [B, G], mean of the
        visible non-padding patch tokens [B, D])."""
        kept, ids_keep, _, mask = ops.random_masking(tokens, self.cfg.n_keep, int(seed))
        latent = self.encode(kept, self.pad_tokens[ids_keep])
        return latent, ids_keep, mask, self.mean_over_patches(latent[:, 1:], self.pad_tokens[ids_keep])

    def training_loss(self, batch, seed: int) -> torch.Tensor:
        tokens = self.tokenize(batch)
        latent, ids_keep, mask, pooled = self.masked_view(tokens, seed)
        *_, pooled_other = self.masked_view(tokens, int(seed) ^ (1 << 61))
        pred = self.decode(latent, ids_keep)
        with torch.no_grad(), torch.autocast(device_type=pred.device.type, enabled=False):
            target = self.compute_targets(batch)
        z = torch.nn.functional.normalize(self.projector(torch.cat([pooled, pooled_other])).float(), dim=-1)
        return self.masked_mse(pred, target, mask, self.pad_tokens) + \
            self.VIEW_WEIGHT * nt_xent(*z.chunk(2), temperature=self.TEMPERATURE)


class MedPlusWeakViewsMaskSC(MedPlusViewsMaskSC):
    """``med+views`` with a tenth of its contrastive weight (0.01)."""

    VIEW_WEIGHT = 0.01


class GeneDropoutMaskSC(MaskSC):
    """MaskSC whose training input drops each detected value with probability DROPOUT (values
    kept are scaled by 1 / (1 - DROPOUT)); targets and embedding read the whole cell."""

    DROPOUT = 0.5

    def tokenize(self, batch) -> torch.Tensor:
        if self.training:
            batch = dataclasses.replace(batch, values=torch.nn.functional.dropout(batch.values.float(), self.DROPOUT))
        return super().tokenize(batch)


class LightGeneDropoutMaskSC(GeneDropoutMaskSC):
    """``gene-dropout-0.5`` at a dropout of 0.2."""

    DROPOUT = 0.2


VARIANT_MODELS = {"gene-scale": MaskSC, "per-patch-embed": PerPatchEmbedMaskSC, "med+values": MedPlusValuesMaskSC,
                  "med+views": MedPlusViewsMaskSC, "med+views-0.01": MedPlusWeakViewsMaskSC,
                  "gene-dropout-0.5": GeneDropoutMaskSC, "gene-dropout-0.2": LightGeneDropoutMaskSC}


def scale_genes(X_grid, clip: float = CLIP):
    """X_grid [n, g*s] CSR -> the same with each column divided by its standard deviation over
    the rows (all-zero columns stay 0) and values clipped at ``clip``."""
    from masksc.models.targets import gene_mean_std
    _, sd = gene_mean_std(X_grid)
    X = (X_grid @ sp.diags(np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0))).tocsr().astype(np.float32)
    X.data = np.minimum(X.data, clip)
    return X


def run(adata, seed: int, variant: str) -> dict:
    from masksc.embed import embed_matrix
    from masksc.models.presets import get_preset
    from masksc.pipeline import preprocess_to_grid
    from masksc.train import TrainConfig, fit_masksc

    cfg = get_preset("cpu")
    _, grid, Xg = preprocess_to_grid(adata, cfg, seed=seed)
    if variant == "gene-scale":
        Xg = scale_genes(Xg)
    t0 = time.time()
    train_cfg = TrainConfig.from_model_config(cfg, seed=seed, device="cpu", progress=False)
    network, result = fit_masksc(Xg, cfg, train_cfg, is_padding=grid.is_padding, progress=False,
                                 model_class=VARIANT_MODELS[variant])
    Z = embed_matrix(network, Xg, batch_size=512, progress=False)
    scores = _cluster_and_score(Z, _labels(adata), int(adata.obs["label"].nunique()), seed)
    return {"seed": seed, "variant": variant, "ari": scores["ari"], "nmi": scores["nmi"],
            "final_loss": result.losses[-1], "wall_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="pbmc", choices=sorted(DATASETS))
    p.add_argument("--seeds", default=[0], type=seed_list, help="comma-separated")
    p.add_argument("--variant", required=True, choices=sorted(VARIANT_MODELS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (the README's figures: 1)")
    args = p.parse_args(argv)
    for adata, seed in seeded_runs(args.dataset, args.seeds, args.threads):
        row = {"dataset": args.dataset, **run(adata, seed, args.variant), "torch_threads": args.threads}
        print(f"{args.dataset} seed {seed} {args.variant}: ARI {row['ari']:.4f} NMI {row['nmi']:.4f} "
              f"(final loss {row['final_loss']:.4f}, {row['wall_s']:.0f} s)", flush=True)
        append_run(RESULT, row, ("dataset", "seed", "variant"))
    print(RESULT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
