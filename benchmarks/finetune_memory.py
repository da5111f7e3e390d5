"""What fine-tuning a DINO ViT costs in GPU memory, computed (not measured): the table in docs/training.md.

For ViT-S/B/L/g (DINOv2 /14 with registers, 224 px: 256 patches + CLS + 4 registers = 261 tokens) at
batch 8, with LeRobot's default ACT head on one camera, bf16 autocast as ``dinocache finetune`` runs
on CUDA. Per configuration:

* weights: float32, 4 bytes per parameter (backbone and head);
* gradients and AdamW's two moments: 4 + 8 bytes per *trained* parameter;
* backbone activations kept for the backward pass, per trained block, by Korthikanti et al.'s count
  for a transformer layer in half precision, ``s * b * h * 34`` bytes with fused (flash / SDPA)
  attention, which keeps no ``s x s`` score matrix; with gradient checkpointing each trained block
  keeps only its input (``2 * s * b * h``) and one block is recomputed at a time. Frozen blocks in
  front of the trained ones run without autograd and keep nothing.

It leaves out the CUDA context and allocator slack (about 0.5-1 GiB) and the head's activations
(under 0.1 GiB at batch 8). Run it to print the markdown table:

    python benchmarks/finetune_memory.py
"""

from __future__ import annotations

import argparse

GiB = 2**30
#: name -> (parameters, width h, depth)
#: (timm's counts for ``vit_{small,base,large,giant}_patch14_reg4_dinov2`` at 224 px, without classifier)
VITS = {"ViT-S/14": (21.6e6, 384, 12), "ViT-B/14": (85.7e6, 768, 12), "ViT-L/14": (303.2e6, 1024, 24),
        "ViT-g/14": (1134.8e6, 1536, 40)}
TOKENS = 256 + 1 + 4
ACT_HEAD = 40.6e6  # LeRobot's ACT defaults (dim_model 512), one camera, CVAE encoder included


def costs(params: float, width: int, depth: int, batch: int, last: int | None, checkpointing: bool) -> dict[str, float]:
    """Bytes of weights, gradients + AdamW moments, and activations for one configuration."""
    trained_blocks = depth if last is None else last
    per_block = 12 * width * width + 13 * width  # attention + MLP (4x) weights and biases, two norms
    trained = params if last is None else trained_blocks * per_block
    block_activations = TOKENS * batch * width * 34
    if checkpointing:
        activations = trained_blocks * 2 * TOKENS * batch * width + block_activations
    else:
        activations = trained_blocks * block_activations
    return {"weights": 4 * (params + ACT_HEAD), "optimizer": 12 * (trained + ACT_HEAD), "activations": activations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print("| backbone | trained | weights | grads + AdamW | activations | total | 24 GB | 80 GB |")
    print("|---|---|---:|---:|---:|---:|:---:|:---:|")
    for name, (params, width, depth) in VITS.items():
        for label, last, checkpointing in (("all blocks", None, False), ("all, checkpointed", None, True),
                                          ("last 4 blocks", 4, False)):
            c = costs(params, width, depth, args.batch_size, last, checkpointing)
            total = sum(c.values()) + 1.0 * GiB  # CUDA context and allocator slack
            fits = ["yes" if total < limit * 1e9 else "no" for limit in (24, 80)]
            print(f"| {name} | {label} | {c['weights'] / GiB:.2f} | {c['optimizer'] / GiB:.2f} | "
                  f"{c['activations'] / GiB:.2f} | {total / GiB:.1f} | {fits[0]} | {fits[1]} |")


if __name__ == "__main__":
    main()
