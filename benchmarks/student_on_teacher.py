"""Does a better teacher make a better mask-sc student? The `cpu` preset as shipped, trained on
a teacher whose contrastive-sc settings differ from the authors' (NT-Xent temperature here),
against the same student on the default teacher (the ``masksc`` row of Table 1, same seed).

For each (dataset, seed, temperature): ``masksc.pipeline.fit`` as shipped with only the teacher's
temperature overridden (``teacher_overrides``), then k-means (k = number of labels) on the
student's mean-pooled embedding and on the teacher's own feature. Each finished run is appended, under a lock, to
benchmarks/results/student_on_teacher.json (with the device), so runs may go side by side:

    python benchmarks/student_on_teacher.py --dataset pbmc --seeds 0 --temperature 0.5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, seed_list, teacher_embedding  # noqa: E402
from benchmarks.reproduce import DATASETS, _cluster_and_score, _labels, append_run, seeded_runs  # noqa: E402

RESULT = RESULTS / "student_on_teacher.json"


def run(adata, seed: int, temperature: float) -> dict:
    from masksc.pipeline import fit

    t0 = time.time()
    model, result = fit(adata, "cpu", seed=seed, device="cpu", progress=False,
                        teacher_overrides={"temperature": temperature})
    student = model.embed(adata, batch_size=512, progress=False)
    teacher = teacher_embedding(model.network.teacher, model.to_grid(adata))
    truth, k = _labels(adata), int(adata.obs["label"].nunique())
    s, t = _cluster_and_score(student, truth, k, seed), _cluster_and_score(teacher, truth, k, seed)
    return {"seed": seed, "temperature": temperature, "student_ari": s["ari"], "student_nmi": s["nmi"],
            "teacher_ari": t["ari"], "teacher_nmi": t["nmi"], "final_loss": result.losses[-1],
            "wall_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="pbmc", choices=sorted(DATASETS))
    p.add_argument("--seeds", default=[0], type=seed_list, help="comma-separated")
    p.add_argument("--temperature", type=float, default=0.5, help="the teacher's NT-Xent temperature")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the README's figures: 1)")
    args = p.parse_args(argv)
    for adata, seed in seeded_runs(args.dataset, args.seeds, args.threads):
        row = {"dataset": args.dataset, **run(adata, seed, args.temperature), "torch_threads": args.threads}
        print(f"{args.dataset} seed {seed} teacher temperature {args.temperature}: student ARI "
              f"{row['student_ari']:.4f} NMI {row['student_nmi']:.4f}; its teacher ARI {row['teacher_ari']:.4f} "
              f"NMI {row['teacher_nmi']:.4f} ({row['wall_s']:.0f} s)", flush=True)
        append_run(RESULT, row, ("dataset", "seed", "temperature"))
    print(RESULT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
