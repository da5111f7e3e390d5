"""`dinocache sim`: scripted demonstrations and closed-loop evaluation in the ALOHA simulator.

This module imports only click, so ``dinocache --help`` lists ``sim`` even where the ``sim`` extra is
not installed; each command checks for the extra first and otherwise says in one line how to get it.
"""

from __future__ import annotations

from pathlib import Path

import click

from dinocache.sim import require_sim

_TASKS = click.Choice(["transfer_cube"])


@click.group("sim", context_settings={"help_option_names": ["-h", "--help"]})
def sim() -> None:
    """Scripted ALOHA demonstrations and closed-loop evaluation (needs: pip install 'dinocache[sim]').

    \b
    Examples:
      dinocache sim demos --task transfer_cube --episodes 50 --out data/transfer_cube
      dinocache sim eval policy.pt2 --task transfer_cube --episodes 50 --seed 0
    """


@sim.command()
@click.option("--task", type=_TASKS, default="transfer_cube", show_default=True, help="Simulated task.")
@click.option("--episodes", default=50, type=click.IntRange(min=1), show_default=True,
              help="Scripted episodes to attempt (failed ones are left out).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset folder to create (must be empty).")
@click.option("--format", "fmt", type=click.Choice(["lerobot-v3.0", "lerobot-v2.1", "aloha-hdf5"]),
              default="lerobot-v3.0", show_default=True,
              help="Dataset format to write: LeRobot's codebase_version v3.0 (what LeRobotDataset and "
                   "lerobot-train read) or v2.1 (LeRobot <= 0.3), or ALOHA HDF5.")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True,
              help="Episode i resets the cube with seed SEED + i.")
@click.option("--cameras", default="top", show_default=True, help="Comma-separated scene cameras to record.")
@click.option("--image-size", default="240x320", show_default=True, help="HxW of the recorded frames.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes making episodes [default: one per available core]; the dataset is the same for any number.")
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
def demos(task: str, episodes: int, out: Path, fmt: str, seed: int, cameras: str, image_size: str,
          workers: int | None, no_progress: bool) -> None:
    """Write scripted demonstrations (successful episodes only) as a dataset for `dinocache extract` and `lerobot-train`.

    \b
    Examples:
      dinocache sim demos --episodes 50 --out data/transfer_cube
      dinocache sim demos --episodes 50 --format aloha-hdf5 --out data/transfer_cube_hdf5
      dinocache sim demos --episodes 50 --workers 16 --out data/transfer_cube
    """
    require_sim()
    from dinocache.encoders.image_size import parse_image_size
    from dinocache.sim.demos import generate_demos

    summary = generate_demos(out, task=task, episodes=episodes, seed=seed, cameras=cameras.split(","),
                             image_size=parse_image_size(image_size), format=fmt, workers=workers,
                             progress=not no_progress)
    click.echo(summary.format())


@sim.command("eval")
@click.argument("policy", type=click.Path(exists=True, path_type=Path))
@click.option("--task", type=_TASKS, default="transfer_cube", show_default=True,
              help="Simulated task (the one the policy was trained on).")
@click.option("--episodes", default=50, type=click.IntRange(min=1), show_default=True,
              help="Evaluation episodes, on held-out seeds.")
@click.option("--seed", default=0, type=click.IntRange(min=0), show_default=True,
              help="Episode i resets the cube with seed 1000000 + SEED + i.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for results.json and the videos (default: <policy>_eval beside the policy).")
@click.option("--videos", default=3, type=click.IntRange(min=0), show_default=True,
              help="Write an mp4 of each of the first N rollouts.")
@click.option("--max-steps", default=400, type=click.IntRange(min=1), show_default=True, help="Steps per episode at 50 Hz.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cpu).")
@click.option("--demos", "demos_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="The training demonstrations: check that no evaluation seed was used there.")
@click.option("--num-envs", type=click.IntRange(min=1), default=None,
              help="Episodes run at a time, the policy queried in one batch per wave [default: two per available core].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes stepping and rendering the environments [default: one per available core, at most "
                   "--num-envs, none for one environment]; 0: all in this process.")
@click.option("--waves", type=click.IntRange(min=1, max=2), default=None,
              help="2: the environments are two halves taking turns, the policy answering one while the other "
                   "steps; 1: all step, then all are queried [default: 2 where each worker holds two or more].")
@click.option("--no-progress", is_flag=True, help="No progress bar (batch jobs).")
def eval_command(policy: Path, task: str, episodes: int, seed: int, out: Path | None, videos: int, max_steps: int,
                 device: str | None, demos_path: Path | None, num_envs: int | None, workers: int | None,
                 waves: int | None, no_progress: bool) -> None:
    """Run an exported policy closed loop on held-out cube positions; report the success rate.

    \b
    Examples:
      dinocache sim eval policy.pt2 --episodes 50 --seed 0
      dinocache sim eval policy.pt2 --demos data/transfer_cube --out eval/
      dinocache sim eval policy.pt2 --num-envs 32 --workers 16 --device cuda   # two waves of 16
      dinocache sim eval policy.pt2 --num-envs 16 --workers 16 --waves 1       # all 16 queried together
      dinocache sim eval policy.pt2 --num-envs 1 --workers 0     # one episode at a time, in this process
    """
    require_sim()
    from dinocache.sim.evaluate import RESULTS_FILE, evaluate

    out = out or policy.with_name(f"{policy.stem}_eval")
    result = evaluate(policy, task=task, episodes=episodes, seed=seed, max_steps=max_steps, out=out, videos=videos,
                      device=device, demos=demos_path, num_envs=num_envs, workers=workers, waves=waves,
                      progress=not no_progress)
    click.echo(result.format())
    click.echo(f"results     {out / RESULTS_FILE}")
