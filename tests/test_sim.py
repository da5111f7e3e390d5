"""Closed loop in the ALOHA simulator: scripted demos, their dataset, and demos -> extract -> train -> export -> eval.

Skipped only where the ``sim`` extra (gym-aloha, MuJoCo, dm_control) is not installed; CI installs it.
Rendering is headless (EGL, see ``docs/sim.md``); small cameras keep the whole file to about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gym_aloha")
pytest.importorskip("dm_control")

import av  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from dinocache.cli import main  # noqa: E402
from dinocache.datasets import open_dataset  # noqa: E402
from dinocache.errors import DinocacheError  # noqa: E402
from dinocache.sim.demos import DEMOS_RECORD, generate_demos, recorded_demo_seeds  # noqa: E402
from dinocache.sim.env import EPISODE_STEPS, JOINT_NAMES, cube_pose, demo_seeds, eval_seeds  # noqa: E402
from dinocache.sim.evaluate import RESULTS_FILE, evaluate, run_episodes, wilson_interval  # noqa: E402
from dinocache.sim.expert import ScriptedExpert, plan_joint_actions  # noqa: E402
from dinocache.sim.replay import PlanReplay  # noqa: E402
from dinocache.sim.vector import EnvPool  # noqa: E402
from _devices import DEVICES  # noqa: E402

CAMERA = (84, 112)  # HxW: small, and 112 is a multiple of the ViT patch (14) after the extractor resizes


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "demos"
    summary = generate_demos(out, episodes=2, seed=0, image_size=CAMERA, progress=False)
    assert summary.kept == 2, summary.format()
    return out


class CheckedReplay(PlanReplay):
    """The expert's plans for ``seeds`` as a policy, checking what eval hands it; episodes in ``fumble``
    keep the right gripper open: the cube is touched at most, and the episode runs to the end."""

    def __init__(self, seeds: list[int], fumble: tuple[int, ...] = ()) -> None:
        plans = [plan_joint_actions(seed) for seed in seeds]
        for k in fumble:
            plans[k][:, 13] = 1.0
        super().__init__(plans, {"top": CAMERA})

    def select_actions(self, observations: list[dict], envs: list[int]) -> np.ndarray:
        for observation in observations:
            assert observation["observation.images.top"].shape == (*CAMERA, 3)
            assert observation["observation.state"].shape == (14,)
        return super().select_actions(observations, envs)


def test_seed_schemes_are_disjoint_and_place_the_cube_explicitly():
    assert not set(demo_seeds(0, 10_000)) & set(eval_seeds(0, 10_000))
    np.testing.assert_array_equal(cube_pose(3), cube_pose(3))
    assert not np.allclose(cube_pose(3), cube_pose(4))
    assert wilson_interval(0, 50)[0] == 0 and 0.05 < wilson_interval(0, 50)[1] < 0.08
    low, high = wilson_interval(25, 50)
    assert low < 0.5 < high and abs((low + high) / 2 - 0.5) < 1e-9


def test_scripted_expert_transfers_the_cube():
    expert = ScriptedExpert({"top": CAMERA})
    for seed in (7, 8):
        rollout = expert.demonstrate(seed)
        assert rollout.success, (seed, rollout.max_reward)
        assert rollout.frames["top"].shape == (EPISODE_STEPS, *CAMERA, 3)
        assert rollout.qpos.shape == rollout.action.shape == (EPISODE_STEPS, 14)


def test_demo_dataset_reads_back(demos: Path, tmp_path: Path):
    source = open_dataset(demos)
    assert source.format == "lerobot-v3.0" and source.fps == 50  # the default format
    assert [e.length for e in source.episodes] == [EPISODE_STEPS, EPISODE_STEPS]
    assert source.lowdim["observation.state"].names == list(JOINT_NAMES)
    assert source.lowdim["action"].shape == (14,)
    frames = source.read_frames(1, "observation.images.top")
    assert frames.shape == (EPISODE_STEPS, *CAMERA, 3) and frames.std() > 10  # a rendered scene, not a blank
    assert recorded_demo_seeds(demos) == [0, 1]
    assert json.loads((demos / DEMOS_RECORD).read_text())["kept"] == 2

    hdf5 = generate_demos(tmp_path / "hdf5", episodes=1, seed=0, image_size=CAMERA, format="aloha-hdf5",
                          progress=False)
    aloha = open_dataset(hdf5.out)
    assert aloha.format == "aloha-hdf5" and aloha.fps == 50
    np.testing.assert_allclose(aloha.read_lowdim(0)["action"], source.read_lowdim(0)["action"], atol=1e-6)


def test_demos_with_one_and_two_workers_are_the_same_dataset(tmp_path: Path):
    """Each episode depends on its seed only, and the parent writes them in seed order: two worker
    processes give the one-process dataset byte for byte. ALOHA HDF5 stores the raw frames, so this
    compares every pixel; LeRobot's H.264 files are not byte-reproducible even in one process (the
    threaded x264 encoder), and the dataset fixture above already goes through two workers."""
    made = {workers: generate_demos(tmp_path / str(workers), episodes=2, seed=5, image_size=CAMERA,
                                    format="aloha-hdf5", workers=workers, progress=False) for workers in (1, 2)}
    assert (made[1].workers, made[2].workers) == (1, 2)
    assert made[1].seeds == made[2].seeds == [5, 6] and made[1].failed == made[2].failed
    files = {workers: sorted(p.relative_to(summary.out) for p in summary.out.rglob("*")
                             if p.is_file() and p.name != DEMOS_RECORD) for workers, summary in made.items()}
    assert files[1] == files[2] and len(files[1]) >= 2
    for name in files[1]:
        assert (made[1].out / name).read_bytes() == (made[2].out / name).read_bytes(), name


@pytest.fixture(scope="module")
def serial() -> list:
    """Three evaluation episodes run one after the other in this process (episode 1 a fumble): the
    outcomes every batched way of running them must give."""
    seeds = eval_seeds(0, 3)
    return run_episodes(CheckedReplay(seeds, fumble=(1,)), seeds, progress=False)


@pytest.mark.parametrize("workers, waves", [(2, 1), (1, 2)])
def test_batched_eval_gives_the_serial_outcomes_and_writes_video(serial: list, tmp_path: Path, workers: int,
                                                                 waves: int):
    """Two environments in worker processes: episode 0 succeeds and ends early, its environment takes
    episode 2 while episode 1 (a fumble) runs on to the step limit; every episode ends as it does when
    the episodes run one after the other in this process. Either both are queried together each step
    (two workers), or in two waves that take turns, both in one worker: the reset of episode 2 is
    answered after the other wave's step already queued there."""
    seeds = eval_seeds(0, 3)
    policy = CheckedReplay(seeds, fumble=(1,))
    batched = run_episodes(policy, seeds, num_envs=2, workers=workers, waves=waves, out=tmp_path, videos=1,
                           progress=False)
    assert [(r.seed, r.max_reward, r.steps) for r in batched] == [(r.seed, r.max_reward, r.steps) for r in serial]
    assert serial[0].success and serial[0].steps < EPISODE_STEPS  # stops at the first full reward
    assert not serial[1].success and serial[1].steps == EPISODE_STEPS and serial[2].success
    assert max(policy.batches) == 2 // waves and sum(policy.batches) == sum(r.steps for r in serial)  # a query a step
    assert batched[0].video and not batched[1].video
    _check_video(Path(batched[0].video), batched[0].steps)


def test_worker_frames_arrive_through_shared_memory_intact():
    """Frames rendered in worker processes come back through shared buffers: every pixel equals the
    in-process render of the same seed and actions, and a frame already handed out stays as it was
    when the next step renders over the buffer."""
    seeds = {0: eval_seeds(0, 2)[0], 1: eval_seeds(0, 2)[1]}
    plans = {slot: plan_joint_actions(seed)[:3] for slot, seed in seeds.items()}
    shown = {}
    for workers in (0, 2):
        with EnvPool({"top": CAMERA}, "transfer_cube", num_envs=2, workers=workers) as pool:
            steps = [pool.reset(seeds)] + [pool.step({slot: plan[k] for slot, plan in plans.items()}) for k in range(3)]
        shown[workers] = [[t.images["top"] for _, t in sorted(step.items())] for step in steps]
    for local, remote in zip(shown[0], shown[2]):
        for a, b in zip(local, remote):
            assert a.shape == (*CAMERA, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(shown[2][0][0], shown[2][0][1])  # two cube poses: two different pictures


def test_env_pool_results_are_taken_in_any_order_and_a_busy_slot_is_refused():
    """Two slots in one worker, two commands in flight: the later result is taken first (the earlier
    answer is read on the way and kept), each result holds its own slot's transition, and a slot is
    refused a new command while its previous one is in flight."""
    first, second = eval_seeds(0, 2)
    with EnvPool({"top": CAMERA}, "transfer_cube", num_envs=2, workers=0) as local:
        expected = local.reset({0: first, 1: second})
    with EnvPool({"top": CAMERA}, "transfer_cube", num_envs=2, workers=1) as pool:
        early, late = pool.submit("reset", {0: first}), pool.submit("reset", {1: second})
        with pytest.raises(RuntimeError, match=r"slots \[1\] still have a command in flight"):
            pool.submit("reset", {1: first})
        got = {**pool.result(late), **pool.result(early)}
    assert sorted(got) == [0, 1]
    for slot in (0, 1):
        assert np.array_equal(got[slot].images["top"], expected[slot].images["top"])
        assert np.array_equal(got[slot].qpos, expected[slot].qpos)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_demos_extract_train_export_eval(demos: Path, tmp_path: Path, device: str):
    from dinocache.pipeline.extract import ExtractConfig, extract
    from dinocache.policy.deployment.export import export_policy
    from dinocache.policy.training.train import TrainConfig, train

    store = tmp_path / "features.zarr"
    extract(ExtractConfig(dataset=demos, out=store, backbone="dinov2_vits14_reg", weights="random",
                          image_size="42x56", batch_size=64, device=device, progress=False))
    run = tmp_path / "run"
    head = dict(dim_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                n_vae_encoder_layers=1, latent_dim=8, chunk_size=10, n_action_steps=10)
    train(TrainConfig(store=store, out=run, steps=4, batch_size=4, act=head, val_episodes=None, eval_every=4,
                      save_every=4, log_every=2, device=device, progress=False))
    policy = export_policy(run, tmp_path / "policy.pt2", format="pt2", device=device, dataset=demos,
                           progress=False).path

    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["sim", "eval", str(policy), "--episodes", "2", "--max-steps", "20",
                                       "--out", str(out), "--videos", "1", "--demos", str(demos), "--device", device,
                                       "--num-envs", "2", "--workers", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "success" in result.output and "95% CI" in result.output
    record = json.loads((out / RESULTS_FILE).read_text())
    assert record["episodes"] == 2 and record["successes"] in (0, 1, 2) and record["num_envs"] == 2
    assert record["per_episode"][0]["success"] in (False, True) and record["per_episode"][0]["steps"] <= 20
    assert set(record["stages"]) == {"touched", "lifted", "transfer_attempted", "transferred"}
    assert record["eval_seeds"] == eval_seeds(0, 2) and record["demo_seeds_checked_disjoint"] is True
    assert 0 <= record["ci95"][0] <= record["success_rate"] <= record["ci95"][1] <= 1
    _check_video(Path(record["videos"][0]), record["per_episode"][0]["steps"])


def test_missing_or_overlapping_inputs_are_one_line_errors(demos: Path, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(main, ["sim", "demos", "--episodes", "1", "--out", str(demos)])
    assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output
    with pytest.raises(DinocacheError, match="were used for demonstrations"):
        evaluate(tmp_path / "missing.pt2", episodes=1, seed=-1_000_000, demos=demos, progress=False)


def _check_video(path: Path, frames: int) -> None:
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (*CAMERA, 3)
