"""Microsoft's Swin-S ImageNet checkpoint as a torchvision ``swin_s`` state dict, which ``model.pretrained`` (the
``SwinTrunk``) loads:

    python scripts/convert_swin_weights.py swin_small_patch4_window7_224.pth swin_s-microsoft.pth

Only the key names and two buffers change (``ssltm.model.backbone.swin_from_microsoft``); the output is checked
against torchvision's ``swin_s`` (every key and shape) before it is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision import models

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ssltm.checkpoint import state_dict_mismatches  # noqa: E402
from ssltm.model.backbone import swin_from_microsoft  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Microsoft's checkpoint (swin_small_patch4_window7_224.pth)")
    parser.add_argument("out", type=Path, help="the torchvision state dict to write")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"source: no file at {args.source}")
    state = swin_from_microsoft(torch.load(args.source, map_location="cpu", weights_only=True))
    with torch.device("meta"):
        expected = models.swin_s(weights=None).state_dict()
    mismatches = state_dict_mismatches(expected, state)
    if mismatches:
        parser.error(f"source: {args.source} is not Microsoft's Swin-S: {mismatches[0]}")
    torch.save(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors of torchvision's swin_s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
