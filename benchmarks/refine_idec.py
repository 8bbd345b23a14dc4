"""Does refining a trained mask-sc model toward its own clusters lift them? IDEC-style: the
student is fine-tuned on MED + gamma * KL(P || Q), with Q DEC's Student-t soft assignment of each
cell's embedding to k centroids (initialised by k-means, trained with the network) and P its
sharpened target, recomputed every epoch. After each epoch the whole embedding is re-clustered
(k-means, k = number of labels) and scored against the labels.

A prototype measured on one model (README, Results); not part of the library.

    python benchmarks/refine_idec.py MODEL_DIR ../shared/data/10X_PBMC_top2000.h5 --epochs 8 --gamma 0.1 --lr 1e-5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import device_info, print_table, write_result  # noqa: E402
from masksc.cluster import agreement, kmeans  # noqa: E402
from masksc.data import CellBatches, read  # noqa: E402
from masksc.pipeline import MaskSCModel  # noqa: E402


def soft_assignment(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """DEC's Q: Student-t (one degree of freedom) similarity of each row of z to each centroid, rows summing to 1."""
    q = 1.0 / (1.0 + torch.cdist(z, centroids) ** 2)
    return q / q.sum(1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a trained model directory")
    ap.add_argument("data", help="the labelled dataset it was trained on")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--gamma", type=float, default=0.1, help="weight of the clustering term")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = MaskSCModel.load(args.model)
    adata = read(args.data)
    truth = adata.obs["label"].to_numpy()
    k = len(np.unique(truth))
    X, net, n = model.to_grid(adata), model.network, adata.n_obs

    def batch_of(idx):
        return next(iter(CellBatches(X[idx], batch_size=len(idx), shuffle=False)))

    def embed_all() -> torch.Tensor:
        net.eval()
        with torch.no_grad():
            return torch.cat([net.embed(batch_of(np.arange(s, min(s + 512, n)))) for s in range(0, n, 512)])

    Z = embed_all()
    labels = kmeans(Z.numpy(), k, seed=0)
    rows = [{"epoch": 0, **{f"kmeans_{m}": v for m, v in agreement(truth, labels).items()}}]
    print_table(rows)
    centroids = torch.nn.Parameter(torch.stack([Z[labels == c].mean(0) for c in range(k)]))
    params = [p for name, p in net.named_parameters() if not name.startswith("teacher.") and p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.05},
                             {"params": [centroids], "weight_decay": 0.0}], lr=args.lr)
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        t0 = time.time()
        with torch.no_grad():
            q = soft_assignment(Z, centroids)
            p = q ** 2 / q.sum(0)
            p = p / p.sum(1, keepdim=True)
        net.train()
        order = rng.permutation(n)
        kls, meds = [], []
        for s in range(0, n, args.batch_size):
            idx = order[s:s + args.batch_size]
            batch = batch_of(idx)
            qb = soft_assignment(net.embed(batch), centroids)
            kl = (p[idx] * (torch.log(p[idx] + 1e-12) - torch.log(qb + 1e-12))).sum(1).mean()
            med = net.training_loss(batch, 10_000 + epoch * 1000 + s)
            opt.zero_grad()
            (med + args.gamma * kl).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            kls.append(kl.item())
            meds.append(med.item())
        Z = embed_all()
        scores = agreement(truth, kmeans(Z.numpy(), k, seed=0))
        rows.append({"epoch": epoch + 1, "kl": float(np.mean(kls)), "med": float(np.mean(meds)),
                     **{f"kmeans_{m}": v for m, v in scores.items()}, "wall_s": time.time() - t0})
        print_table(rows[-1:])
    name = f"refine_idec_{Path(args.model).name}_gamma{args.gamma}_lr{args.lr}"
    print(f"wrote {write_result(name, {**device_info('cpu'), **vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
