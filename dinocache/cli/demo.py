"""`dinocache demo`: the three stages, end to end, on the sample dataset shipped with dinocache."""

from __future__ import annotations

from pathlib import Path

import click

from dinocache.demo import DemoConfig


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", type=click.Path(path_type=Path), default=DemoConfig.out, show_default=True,
              help="Folder for every artefact (a folder from an earlier demo is replaced).")
@click.option("--backbone", default=DemoConfig.backbone, show_default=True, help="Registry name of the backbone.")
@click.option("--weights", default=None,
              help="Checkpoint file/folder or 'random' (default: $DINOCACHE_WEIGHTS, then the Hugging Face cache, "
                   "then random weights with a warning).")
@click.option("--image-size", default=DemoConfig.image_size, show_default=True, help="Backbone input size, H or HxW.")
@click.option("--steps", default=DemoConfig.steps, type=click.IntRange(min=1), show_default=True, help="Training steps.")
@click.option("--batch-size", default=DemoConfig.batch_size, type=click.IntRange(min=1), show_default=True,
              help="Training batch size.")
@click.option("--control-steps", type=click.IntRange(min=1), default=None,
              help="Live select_action steps per held-out episode [default: every step].")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(out: Path, backbone: str, weights: str | None, image_size: str, steps: int, batch_size: int,
         control_steps: int | None, device: str | None, no_progress: bool) -> None:
    """Run all three stages on the sample dataset shipped with dinocache: extract -> train -> export -> act.

    \b
    Examples:
      dinocache demo
      dinocache demo --weights ~/weights/dinov2_vits14_reg4_pretrain.pth --image-size 224
    """
    from dinocache.demo import format_result, run_demo

    cfg = DemoConfig(out=out, backbone=backbone, weights=weights, image_size=image_size, steps=steps,
                     batch_size=batch_size, control_steps=control_steps, device=device, progress=not no_progress)
    click.echo(format_result(run_demo(cfg, echo=click.echo)))
