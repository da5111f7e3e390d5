"""`dinocache finetune`: continue a cached run end to end, the backbone trainable (issue 19).

Also the backbone-training options `dinocache train --online` shares (:func:`backbone_options`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dinocache.policy.training.tracking import TRACKERS
from dinocache.policy.training.train_config import TrainConfig


def backbone_options(lr: bool = True) -> Callable[[click.Command], click.Command]:
    """The options that say how the backbone trains (``BackboneTraining``), for ``finetune`` and, without
    ``--optimizer-lr-backbone`` (there an ACT field like the others), ``train --online``."""
    options = [
        (("--optimizer-lr-backbone", "backbone_lr"),
         dict(type=click.FloatRange(min=0), default=None, help="Learning rate of the backbone [default: the head config's "
                                             "optimizer_lr_backbone, 1e-5; 1e-6 is usual for a DINO ViT].")),
        (("--unfreeze-last",), dict(type=click.IntRange(min=1), default=None,
                                    help="Train only the backbone's last K blocks (and its final norm); the rest stays "
                                         "frozen, with no gradients or optimiser moments [default: all].")),
        (("--layer-decay",), dict(type=click.FloatRange(min=0, max=1, min_open=True), default=None,
                                  help="Layer-wise learning-rate decay D: block l of L trains at lr * D^(L - l) "
                                       "[default: none, every block at lr].")),
        (("--gradient-checkpointing",), dict(is_flag=True,
                                             help="Recompute block activations in the backward pass (less memory, "
                                                  "about a third more compute).")),
    ][0 if lr else 1:]

    def decorate(command: click.Command) -> click.Command:
        for decl, kwargs in reversed(options):
            command = click.option(*decl, **kwargs)(command)
        return command

    return decorate


def backbone_training(backbone_lr: float | None, unfreeze_last: int | None, layer_decay: float | None,
                      gradient_checkpointing: bool) -> Any:
    """The ``BackboneTraining`` of these options (imported on use: ``--help`` imports no torch)."""
    from dinocache.policy.training.finetune import BackboneTraining

    return BackboneTraining(backbone_lr, unfreeze_last, layer_decay, gradient_checkpointing)


@click.command("finetune", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run folder to create (or continue with --resume).")
@click.option("--steps", default=2000, show_default=True, help="Fine-tuning steps (a total, also when resuming).")
@click.option("--checkpoint", default="last", show_default=True,
              help="RUN's checkpoint to start from: last, best or a step.")
@click.option("--batch-size", type=int, default=None, help="Samples per step and process [default: RUN's].")
@click.option("--dataset", default=None, type=click.Path(path_type=Path),
              help="The dataset to decode frames from [default: the store's recorded source; same fingerprint].")
@click.option("--store", default=None, type=click.Path(path_type=Path),
              help="RUN's feature store [default: the recorded path].")
@backbone_options()
@click.option("--eval-every", default=TrainConfig.eval_every, show_default=True, help="Steps between validations.")
@click.option("--save-every", default=1000, show_default=True,
              help="Steps between checkpoints (one is always written at the end).")
@click.option("--log-every", default=TrainConfig.log_every, show_default=True, help="Steps between metrics records.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--resume", is_flag=True, help="Continue the fine-tuning run in --out from its last checkpoint, exactly.")
@click.option("--log-to", type=click.Choice(list(TRACKERS)), multiple=True, help="Also log to TensorBoard or W&B.")
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
def finetune(run: Path, out: Path, steps: int, checkpoint: str, batch_size: int | None, dataset: Path | None,
             store: Path | None, backbone_lr: float | None, unfreeze_last: int | None, layer_decay: float | None,
             gradient_checkpointing: bool, eval_every: int, save_every: int, log_every: int, device: str | None,
             resume: bool, log_to: tuple[str, ...], no_progress: bool) -> None:
    """Fine-tune the backbone of the cached run RUN end to end, its head as the warm start.

    Frames are decoded from the dataset the store was extracted from; normalisation, split, seed and
    metrics are RUN's. Checkpoints hold the trained backbone (safetensors, with its sha256 and the
    base weights' hashes); `dinocache export RUN2` fuses it.

    \b
    Examples:
      dinocache finetune runs/act1 --out runs/act1-ft --steps 5000 --optimizer-lr-backbone 1e-6
      dinocache finetune runs/act1 --out runs/act1-ft --unfreeze-last 4 --layer-decay 0.75 --gradient-checkpointing
      dinocache finetune runs/act1 --out runs/act1-ft --resume --steps 10000
    """
    from dinocache.policy.training.finetune import finetune as run_finetune

    ctx = click.get_current_context()
    given = frozenset(name for name in ctx.params
                      if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT)
    cfg = TrainConfig(store=store, out=out, steps=steps, batch_size=batch_size or TrainConfig.batch_size,
                      eval_every=eval_every, save_every=save_every, log_every=log_every, device=device, resume=resume,
                      progress=not no_progress, log_to=log_to, given=given)
    result = run_finetune(run, cfg, backbone_training(backbone_lr, unfreeze_last, layer_decay, gradient_checkpointing),
                          checkpoint=checkpoint, dataset=dataset)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(result.format())
