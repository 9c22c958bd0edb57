"""Pre-train the demo's tiny vision tower (self-supervised, procedural pictures) and save it
as a Hugging Face model directory with its model card.

    python tools/pretrain_tower.py OUT [key=value ...]

Keys: the fields of `elmm_ray.models.tower_pretrain.PretrainSettings` (seed, steps, batch,
image_size, patch_size, hidden, layers, heads, learning_rate, threads, ...).

The committed tower (`towers/elmm-tiny-clip`) was made with the defaults; its README.md
states the command, the time it took, its sha256 and its linear-probe figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from elmm_ray.models.tower_pretrain import PretrainSettings, pretrain_tower  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        settings = PretrainSettings.parse(argv[1:])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = pretrain_tower(argv[0], settings, log=lambda line: print(line, flush=True))
    print(f"saved {argv[0]} ({record['train_seconds']:.0f} s, sha256 {record['sha256']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
