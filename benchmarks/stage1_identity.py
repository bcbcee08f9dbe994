"""Does a briefly trained Body-ID encoder separate identities on photos it never saw? (CPU, a few minutes)

    python benchmarks/stage1_identity.py [--identities 12] [--steps 300] [--views 8] [--heldout 6] [--seed 0]

Data: the tests' synthetic stick figures (tests/test_stage1_training.py): each identity has fixed bone lengths,
limb width and colour, each photo a random pose, position and scale. The encoder (32 px crops, 16-d c_body, the
tests' tiny model) trains with stage 1 (``train_stage1``, CPU) on ``--views`` photos per identity; then
``--heldout`` NEW photos per identity (same bodies, fresh poses, never trained on) are split into two halves and
each half is encoded (product of Gaussians over its views). Printed: the mean distance between the two halves of
one identity vs between halves of different identities, and nearest-neighbour identification (half A of each
identity against the B halves of all identities; chance = 1 / identities).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def make_split(root: Path, runner, bodies: dict, views: int, rng) -> None:
    from test_stage1_training import write_views

    for name, body in bodies.items():
        write_views(root / name, body, views, rng, runner)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=12)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--views", type=int, default=8, help="training photos per identity")
    parser.add_argument("--heldout", type=int, default=6, help="new photos per identity for the evaluation (even)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the stage-1 progress bar would bury the result

    import numpy as np
    import torch
    from safetensors import safe_open
    from test_stage1_training import FakePoseRunner, identity_params, stage1_raw

    from bolid.body_encoder_io import load_body_encoder
    from bolid.dataset import dataset_config_from_dict
    from bolid.dataset_prepare import prepare_dataset
    from bolid.identity_cache import load_identity_caches
    from training.stage1 import Stage1Config, train_stage1

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bolid-stage1-identity-"))
    runner = FakePoseRunner()
    bodies = {f"person_{i:02d}": identity_params(rng) for i in range(args.identities)}
    make_split(work / "train", runner, bodies, args.views, rng)
    make_split(work / "heldout", runner, bodies, args.heldout, rng)
    heldout = dataset_config_from_dict({"cache_dir": str(work / "heldout_cache"), "min_resolution": 64,
                                        "crop_size": 32, "subsets": [{"root": str(work / "heldout")}]})
    prepare_dataset(heldout, runner, crop_margin=1.15)

    raw = stage1_raw(work, work / "train", work / "train_cache", max_steps=args.steps, batch_size=12,
                     checkpointing_steps=10 ** 9, checkpoints_total_limit=1)
    config = Stage1Config.from_dict(raw)
    start = time.perf_counter()
    result = train_stage1(config, pose_runner=runner)
    seconds = time.perf_counter() - start
    encoder, _ = load_body_encoder(result["export"])

    half = args.heldout // 2
    means: dict[str, list[torch.Tensor]] = {}
    for cache in load_identity_caches(heldout.cache_dir):
        with safe_open(str(cache.path), framework="pt") as f:
            crops = f.get_tensor("crops").permute(0, 3, 1, 2).float() / 255
        for part in (slice(0, half), slice(half, 2 * half)):
            with torch.no_grad():
                mu, _ = encoder.encode(crops[None, part], cache.keypoints[None, part], cache.weights[None, part])
            means.setdefault(cache.identity, []).append(mu[0])
    names = sorted(means)
    a = torch.stack([means[n][0] for n in names])
    b = torch.stack([means[n][1] for n in names])
    dist = torch.cdist(a, b)  # [identity's half A, identity's half B]
    same = dist.diagonal().mean().item()
    off = ~torch.eye(len(names), dtype=torch.bool)
    other = dist[off].mean().item()
    hits = ((dist.argmin(1) == torch.arange(len(names))).float().mean().item()
            + (dist.argmin(0) == torch.arange(len(names))).float().mean().item()) / 2
    losses = result["losses"]
    print(f"{args.identities} identities, {args.views} training photos each, {args.steps} steps in {seconds:.0f} s "
          f"(loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f})")
    print(f"held-out photos: {args.heldout} per identity, two halves of {half}")
    print(f"mean distance between the halves of one identity: {same:.2f}")
    print(f"mean distance between halves of different identities: {other:.2f}")
    print(f"nearest-neighbour identification: {100 * hits:.0f}% (chance {100 / len(names):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
