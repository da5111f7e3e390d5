"""Stage two's command: `dinocache train` (also under `torchrun -m dinocache.cli train ...`).

Its options are the run's (``TrainConfig``) and, under their LeRobot names, every ``ACTConfig`` field;
``--help`` shows the two groups apart.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, get_args, get_type_hints

import click

from dinocache.cli.finetune import backbone_options, backbone_training
from dinocache.policy.model.config import FEEDFORWARD_ACTIVATIONS, ACTConfig
from dinocache.policy.model.presets import PRESETS
from dinocache.policy.training.tracking import TRACKERS
from dinocache.policy.training.train_config import TrainConfig

_ACT_FIELDS = frozenset(f.name for f in dataclasses.fields(ACTConfig))


class _SectionedCommand(click.Command):
    """``--help`` with the run's options and the ACT head's fields under two headings."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Run options": [], "ACT fields (LeRobot's names; unset: the "
                                                                          "preset's value, else LeRobot's default)": []}
        run, act = sections
        for param in self.get_params(ctx):
            record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
            if record is not None:
                sections[act if param.name in _ACT_FIELDS else run].append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


def _act_options(command: click.Command) -> click.Command:
    """One option per :class:`ACTConfig` field, LeRobot's name in kebab-case, its help the field's own;
    unset means preset/default."""
    hints, defaults = get_type_hints(ACTConfig), ACTConfig()
    aliases = {"optimizer_lr": ["--lr"]}
    for f in reversed(dataclasses.fields(ACTConfig)):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if type(None) in get_args(kind):  # Optional[X] -> X
            kind = next(a for a in get_args(kind) if a is not type(None))
        help_text = f"{f.metadata['help']} [default: {getattr(defaults, f.name)!r}, or the preset's]"
        if kind is bool:
            decl = [f"{flag}/--no-{flag[2:]}", f.name]
            command = click.option(*decl, default=None, help=help_text)(command)
        else:
            choice = click.Choice(FEEDFORWARD_ACTIVATIONS) if f.name == "feedforward_activation" else kind
            decl = [flag, *aliases.get(f.name, []), f.name]
            command = click.option(*decl, type=choice, default=None, help=help_text)(command)
    return command


@click.command("train", cls=_SectionedCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to create (or continue with --resume).")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Head hyperparameters for a backbone; refuses a store built with another backbone.")
@click.option("--steps", default=TrainConfig.steps, show_default=True, help="Total optimiser steps (also when resuming).")
@click.option("--batch-size", default=TrainConfig.batch_size, show_default=True, help="Samples per step and per process.")
@click.option("--val-episodes", default=TrainConfig.val_episodes, show_default=True,
              help="Held-out episodes: a fraction (0.1), a comma list of episode indices (3,17), or none.")
@click.option("--val-frames", default=TrainConfig.val_frames, show_default=True,
              help="Validate on at most this many frames of the held-out episodes (a fixed, evenly spread subset).")
@click.option("--eval-every", default=TrainConfig.eval_every, show_default=True, help="Steps between validations.")
@click.option("--save-every", default=TrainConfig.save_every, show_default=True, help="Steps between checkpoints (one is always written at the end).")
@click.option("--log-every", default=TrainConfig.log_every, show_default=True, help="Steps between metrics records.")
@click.option("--seed", default=TrainConfig.seed, show_default=True, help="Seed of initialisation, sampling, dropout and CVAE noise.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available; torchrun picks cuda:LOCAL_RANK).")
@click.option("--memory-budget", default=None,
              help="RAM the features may take to be held in memory, e.g. 24GiB or 60% (default: 50% of MemAvailable, "
                   "shared by the processes of a machine). Larger stores are streamed.")
@click.option("--window-frames", type=int, default=None, help="Frames per shuffle window when streaming (default: from the budget, at most 8192).")
@click.option("--device-memory-budget", default=None,
              help="GPU memory the features may take to be held there and batches gathered on the GPU, e.g. 20GiB "
                   "or 60% (default: 50% of the free device memory); loaded straight there, they need no RAM. "
                   "Otherwise they are copied from RAM, ahead of the step.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the head: Inductor's fused kernels (on CUDA inside the step's CUDA graph).")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="On CUDA, capture the whole step (and validation) once as a CUDA graph and replay it. Not under DDP.")
@click.option("--view-sampling", type=click.Choice(["uniform", "clean"]), default=TrainConfig.view_sampling,
              show_default=True, help="With a store of augmented views (extract --views K): each sample draws one of "
                                      "its frame's K views (uniform), or only the clean view 0 (clean, for comparison). "
                                      "Validation always uses view 0.")
@click.option("--grid-shift", default=TrainConfig.grid_shift, type=click.IntRange(min=0), show_default=True,
              help="Shift each camera's patch grid by up to N whole patches in each direction, edge patches "
                   "replicated (DrQ's random shift on the cache).")
@click.option("--patch-dropout", default=TrainConfig.patch_dropout, type=click.FloatRange(0.0, 1.0, max_open=True),
              show_default=True, help="Zero each patch of the grid with this probability while training.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint, exactly where it stopped.")
@click.option("--log-to", type=click.Choice(list(TRACKERS)), multiple=True,
              help="Also log to TensorBoard (<out>/tensorboard) or Weights & Biases ($WANDB_PROJECT, default "
                   "dinocache); repeat for both. metrics.jsonl and loss.png are always written.")
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
@click.option("--online", is_flag=True,
              help="STORE is a dataset (a folder or a Hub id): train the head with --backbone in every step, on "
                   "decoded frames (ACT's own recipe with resnet18: fine-tuned, FrozenBatchNorm, at "
                   "--optimizer-lr-backbone). No cache.")
@click.option("--backbone", default="resnet18", show_default=True, help="With --online: the registered backbone.")
@click.option("--weights", default="auto", show_default=True, help="With --online: its weights (auto, PATH or random).")
@click.option("--image-size", default=None,
              help="With --online: the backbone's input size, N or HxW [default: a convnet's the camera's native size, "
                   "as ACT trains ResNet18; a ViT's its registry size].")
@backbone_options(lr=False)
@_act_options
def train(store: Path, out: Path, preset: str | None, steps: int, batch_size: int, val_episodes: str,
          val_frames: int, eval_every: int, save_every: int, log_every: int, seed: int, device: str | None,
          memory_budget: str | None, device_memory_budget: str | None, window_frames: int | None, compile_: bool,
          cuda_graph: bool, view_sampling: str, grid_shift: int, patch_dropout: float, resume: bool,
          log_to: tuple[str, ...], no_progress: bool, online: bool, backbone: str,
          weights: str, image_size: str | None, unfreeze_last: int | None, layer_decay: float | None,
          gradient_checkpointing: bool, **act: Any) -> None:
    """Train an ACT head on the cached features of STORE (stage two), or online on a dataset's frames.

    Every ACTConfig field is an option under its LeRobot name; unset ones take the preset's value,
    else LeRobot's default.

    \b
    Examples:
      dinocache train features.zarr --out runs/act1 --preset dinov2-reg
      dinocache train features.zarr --out runs/act1 --chunk-size 50 --kl-weight 10 --lr 1e-5
      dinocache train features.zarr --out runs/act1 --resume --steps 100000
      dinocache train views.zarr --out runs/act2 --grid-shift 1 --patch-dropout 0.1
      torchrun --nproc_per_node 4 -m dinocache.cli train features.zarr --out runs/act1
      dinocache train --online --backbone resnet18 DATASET --out runs/act-resnet   # ACT's own recipe
    """
    from dinocache.policy.training.train import train as run_training

    ctx = click.get_current_context()
    given = frozenset(name for name in ctx.params if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT)
    cfg = TrainConfig(store=store, out=out, steps=steps, batch_size=batch_size, preset=preset,
                      act={k: v for k, v in act.items() if v is not None}, val_episodes=val_episodes,
                      val_frames=val_frames, eval_every=eval_every, save_every=save_every, log_every=log_every,
                      seed=seed, device=device, compile=compile_, cuda_graph=cuda_graph, memory_budget=memory_budget,
                      device_memory_budget=device_memory_budget, window_frames=window_frames, resume=resume,
                      progress=not no_progress, given=given, log_to=log_to, view_sampling=view_sampling,
                      grid_shift=grid_shift, patch_dropout=patch_dropout)
    if online:
        from dinocache.datasets.hub import resolve_dataset
        from dinocache.policy.training.finetune import train_online

        training = backbone_training(None, unfreeze_last, layer_decay, gradient_checkpointing)
        cfg = dataclasses.replace(cfg, store=resolve_dataset(store))  # a Hub id becomes its local folder
        result = train_online(cfg, backbone, weights, image_size, training)
    else:
        result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(result.format())
