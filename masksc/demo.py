"""``masksc demo``: the whole workflow on the 700-cell dataset bundled with scanpy."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def run_demo(out_dir: str | Path = "masksc-demo", epochs: int | None = None, seed: int = 0,
             device: str | None = None) -> dict:
    """Train the ``demo`` preset on pbmc68k_reduced, cluster with k = number of labels, print
    ARI / NMI / silhouette, and write into ``out_dir``: ``model/`` (checkpoint),
    ``pbmc68k_masksc.h5ad`` (embedding + clusters), ``embedding_umap.png`` (coloured by cluster
    and by label, paper Fig. 4), ``attention.png`` (paper Fig. 6), ``loss.png``, ``metrics.json``
    (the scores, ``train_s`` the mask-sc training loop's seconds and ``wall_s`` those from
    loading the data to the scores: teacher, training, embedding, clustering, PCA reference).
    A rerun into the same ``out_dir`` replaces the earlier demo's files. Returns the metrics."""
    from masksc import checkpoint
    from masksc.checks import is_map_seed
    from masksc.errors import CheckpointError, DataError, MaskscError
    from masksc.io_utils import check_output

    if not is_map_seed(seed):
        raise DataError(f"seed={seed!r}; fix: pass an integer in [0, 2**32 - 1], the seeds the PCA reference and "
                        "the UMAP take (checked before training).")
    out = check_output(out_dir, folder=True)
    replaced = [name for name in OUTPUTS if (out / name).exists()]
    if replaced and not _earlier_demo_run(out / "model"):
        raise MaskscError(f"{out} holds {', '.join(replaced)}, which the demo would replace, and no earlier demo's "
                          "model (no model/ of this release's demo preset trained on the demo's cells: another "
                          "fit's, or an earlier release's demo); fix: -o a new folder, or delete those yourself if "
                          "they are an earlier demo's.")
    with contextlib.ExitStack() as held:
        try:  # a demo still running there is not deleted under it
            held.enter_context(checkpoint.run_lock(out / "model"))
        except CheckpointError as exc:
            raise MaskscError(f"{out / 'model'} is in use: a demo (or a fit) is running there; fix: wait for it to "
                              "finish, or -o another folder.") from exc
        return _run_demo(out, epochs, seed, device)


def _run_demo(out: Path, epochs: int | None, seed: int, device: str | None) -> dict:
    """``run_demo``'s work, holding ``out / "model"``."""
    from masksc import checkpoint, pl
    from masksc.data import load_demo
    from masksc.errors import CheckpointError, counted
    from masksc.io_utils import anndata_bytes, atomic_write
    try:
        checkpoint.check_run_dir(out / "model")
    except CheckpointError:  # an earlier demo's model: the demo is rerun from scratch, not resumed
        print(f"[demo] replacing the earlier demo in {out}")
        for name in OUTPUTS[1:]:  # its outputs first, so that no output outlives its model (OUTPUTS[0])
            (out / name).unlink(missing_ok=True)
        for entry in (out / "model").iterdir():  # its contents: the folder itself is what the lock holds
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    t0 = time.time()
    adata = load_demo()
    print(f"[demo] pbmc68k_reduced: {adata.n_obs} cells x {adata.n_vars} genes, "
          f"{adata.obs['label'].nunique()} labelled types")
    model, scores, baseline = fit_and_score(adata, seed, device=device, model_dir=out / "model", epochs=epochs)
    wall, train = time.time() - t0, adata.uns["masksc"]["fit"]["wall_s"]
    print(f"[demo] mask-sc ({counted(model.config.epochs, 'epoch')}: {train:.0f}s of training, {wall:.0f}s from "
          f"loading the data to the scores): {_fmt(scores)}")
    print(f"[demo] baseline PCA(50) + k-means on the same log-normalised genes: {_fmt(baseline)}")

    pl.embedding(adata, {"mask-sc cluster": adata.obs["masksc_cluster"].to_numpy(),
                         "cell type (label)": adata.obs["label"].to_numpy()}, out / "embedding_umap.png",
                 method="umap", seed=seed)
    pl.loss_curve(adata.uns["masksc"]["fit"]["losses"], out / "loss.png")
    labels = adata.obs["label"].to_numpy()
    picks = pl.one_cell_per_label(labels, seed)  # all 10 types
    pl.attention_grid(model.attention_maps(adata[picks]), [str(x) for x in labels[picks]], out / "attention.png")

    with atomic_write(out / "pbmc68k_masksc.h5ad", suffix=".h5ad", min_bytes=anndata_bytes(adata)) as tmp:
        adata.write_h5ad(tmp)
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps({"masksc": scores, "pca_kmeans": baseline, "wall_s": wall, "train_s": train,
                                   "epochs": model.config.epochs}, indent=2) + "\n")
    print(f"[demo] wrote {out}/: pbmc68k_masksc.h5ad, embedding_umap.png, attention.png, loss.png, "
          "metrics.json, model/")
    return scores


OUTPUTS = ("model", "pbmc68k_masksc.h5ad", "embedding_umap.png", "attention.png", "loss.png", "metrics.json")


def _earlier_demo_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a training run of the ``demo`` preset on the demo's cells and
    nothing else (its entries are checkpoints and what an interrupted save leaves; every
    checkpoint's model is the preset's, whatever its epochs, trained on pbmc68k_reduced's cells:
    a user's own fit of the preset on other data is not the demo's), so a rerun of the demo may
    delete it."""
    import re

    from masksc import checkpoint
    from masksc.data import load_demo
    from masksc.errors import CheckpointError
    from masksc.models.presets import get_preset
    from masksc.pipeline import cells_record
    if not run_dir.is_dir() or run_dir.is_symlink():
        return False
    demo = {**get_preset("demo").to_dict(), "epochs": None}
    demo_cells = cells_record(load_demo().obs_names)
    for entry in run_dir.iterdir():
        if entry.is_symlink() or re.fullmatch(r"\.(tmp|old)-.+", entry.name):
            continue  # last (and .last-*.tmp) links, what an interrupted save leaves
        if not re.fullmatch(r"epoch-\d{6}|last", entry.name):  # last: a folder where a copy made it one
            return False
        try:
            config = checkpoint.read_config(entry)
        except CheckpointError:  # unreadable: not known to be the demo's
            return False
        meta, model_config = config.get("meta"), config.get("model_config")
        cells = meta.get("cells") if isinstance(meta, dict) else None  # a damaged record is not the demo's
        if not isinstance(model_config, dict) or not isinstance(cells, dict) or \
                {**model_config, "epochs": None} != demo or \
                (cells.get("n"), cells.get("digest")) != (demo_cells["n"], demo_cells["digest"]):
            return False
    return True


def fit_and_score(adata, seed: int, *, device: str | None = None, progress: bool = True, **fit_kwargs):
    """The demo's steps on ``adata`` (labels in ``obs["label"]``, k = their number): fit the
    ``demo`` preset (``fit_kwargs``: ``model_dir``, ``epochs``, config overrides), embed, cluster,
    score, and score its PCA(50) + k-means reference. Stores the embedding and clusters on
    ``adata``; returns (model, mask-sc scores, reference scores)."""
    from masksc import tl

    k = adata.obs["label"].nunique()
    with warnings.catch_warnings():
        if set(fit_kwargs) <= {"model_dir", "epochs"}:  # the preset's grid, sized for the demo: its padding is no news
            warnings.filterwarnings("ignore", r"\d+ genes for a \d+x\d+ grid .*: padding the last", UserWarning)
        model = tl.fit(adata, "demo", seed=seed, device=device, progress=progress, **fit_kwargs)
    tl.embed(adata, model, device=device, progress=progress)
    tl.cluster(adata, k=k, seed=seed)
    return model, tl.evaluate(adata, label_key="label"), _pca_kmeans(adata, k, seed)


def _fmt(scores: dict) -> str:
    return "  ".join(f"{k.upper()} {v:.4f}" for k, v in scores.items() if k in ("ari", "nmi", "silhouette"))


def _pca_kmeans(adata, k: int, seed: int) -> dict:
    """The reference point the demo prints beside mask-sc: PCA(50) of the log-normalised input + k-means."""
    from sklearn.decomposition import PCA

    from masksc.cluster import evaluate, kmeans
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    Z = PCA(n_components=min(50, *X.shape), random_state=seed).fit_transform(X).astype(np.float32)
    return evaluate(Z, kmeans(Z, k, seed=seed), adata.obs["label"].to_numpy())

