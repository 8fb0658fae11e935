"""End-to-end training on a tiny shapes set: a short run, bit-identical resume, 2-process DDP (gloo), and stopping
on a signal with a checkpoint."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

import detectors.engine.train as engine
from detectors.config import load_config
from detectors.data.coco import DatasetError
from detectors.engine.checkpoint import CheckpointError, load_checkpoint
from detectors.engine.stop import StopSignals, TrainingInterrupted
from detectors.engine.train import train
from signal_hooks import signalling_builder

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "shapes_tiny.yaml"


def _tiny_overrides(shapes_root, max_iter):
    return [
        f"data.shapes.root={shapes_root}",
        "data.shapes.num_train=32",
        "data.shapes.num_val=8",
        "data.num_workers=0",
        "model.backbone.widths=[8, 16, 16, 32]",
        "model.fpn_channels=32",
        "model.dyhead_channels=32",
        "model.dyhead_blocks=1",
        "solver.ims_per_batch=4",
        f"solver.max_iter={max_iter}",
        "solver.warmup_iters=2",
        "solver.steps=[100]",
        "solver.log_period=1",
        "num_threads=1",
        "device=cpu",
    ]


@pytest.mark.slow
def test_shapes_tiny_runs_and_loss_falls(tmp_path):
    overrides = _tiny_overrides(tmp_path / "data", 60)
    overrides += ["data.shapes.num_train=64", "solver.base_lr=0.004", "solver.checkpoint_period=30",
                  "solver.eval_period=30"]
    metrics = train(load_config(CONFIG, overrides), tmp_path / "out")
    out = tmp_path / "out"
    assert set(metrics) == {"bbox"}
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    detections = json.loads((out / "coco_instances_results.json").read_text())
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 61))
    assert [r["iter"] for r in records if "bbox" in r] == [30, 60]  # periodic and final evaluation

    def fall(name):  # mean of the last 8 logged values over the mean of the first 8
        values = [r[name] for r in steps]
        return sum(values[-8:]) / sum(values[:8])

    # the classifier learns first; centerness barely moves in 60 iterations of a tiny model
    assert fall("loss") < 0.8 and fall("loss_cls") < 0.6 and fall("loss_box") < 0.95
    assert (out / "model_0000030.pth").is_file() and (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert "iter 60/60" in (out / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["atss", "faster_rcnn"])
def test_resume_is_bit_identical(tmp_path, architecture):
    # Faster R-CNN samples its RPN and RoI training boxes from torch's global generator, which the checkpoint
    # restores: anything else that draws from it (a DataLoader seeding its workers) would shift the resumed run
    data = tmp_path / "data"
    extra = [f"model.meta_architecture={architecture}", "model.rcnn.fc_dim=32",
             "model.rcnn.roi_batch_size_per_image=64"]
    straight = train(load_config(CONFIG, _tiny_overrides(data, 6) + extra), tmp_path / "straight")
    train(load_config(CONFIG, _tiny_overrides(data, 3) + extra), tmp_path / "resumed")
    resumed = train(load_config(CONFIG, _tiny_overrides(data, 6) + extra), tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "model_final.pth")
    b = load_checkpoint(tmp_path / "resumed" / "model_final.pth")
    assert b["iteration"] == 6 and a.keys() == b.keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
    assert straight == resumed
    # the log of the resumed run reads as one run of 6 iterations
    iters = [json.loads(line).get("iter") for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 3, 4, 5, 6, 6]


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    overrides = _tiny_overrides(tmp_path / "data", 3) + ["model.score_thresh=0"]  # detections on every image
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "detectors.cli", "train", "--config", str(CONFIG), "--output-dir", str(tmp_path / "out")]
    for item in overrides:
        cmd += ["--set", item]
    # this checkout's detectors, not whichever copy the environment has installed (cwd is tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    state = load_checkpoint(out / "model_final.pth")
    assert state["iteration"] == 3 and state["data"] == {"seed": 0, "world_size": 2}
    assert len(state["rng"]) == 2  # one RNG state per process
    # seeded with seed + rank, as detectron2 does: the processes draw different streams
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3]
    # each process evaluated half of the 8 validation images; rank 0 gathered all of them
    detections = json.loads((out / "coco_instances_results.json").read_text())
    per_image = Counter(d["image_id"] for d in detections)
    assert sorted(per_image) == list(range(1, 9)) and max(per_image.values()) <= 100  # none evaluated twice
    # both processes evaluated the checkpoint's model: rank 1 with rank 0's BatchNorm statistics too
    from detectors.cli import main

    args = ["--config", str(CONFIG)] + [a for item in overrides for a in ("--set", item)]
    weights = str(out / "model_final.pth")
    assert main(["eval", "--weights", weights, "--output-dir", str(tmp_path / "eval")] + args) == 0
    alone = json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())

    # scores sorted per image (equal scores leave the order open), to one step of the results' 5 decimals
    def scores(results):
        return {i: sorted(d["score"] for d in results if d["image_id"] == i) for i in range(1, 9)}

    together, separately = scores(detections), scores(alone)
    for image_id in together:
        assert together[image_id] == pytest.approx(separately[image_id], abs=1.1e-5), image_id
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_cli_eval_and_predict_from_a_checkpoint(tmp_path):
    from detectors.cli import main

    overrides = _tiny_overrides(tmp_path / "data", 2) + ["model.score_thresh=0"]  # untrained scores are ~0.01
    train(load_config(CONFIG, overrides), tmp_path / "run")
    args = ["--config", str(CONFIG)] + [a for item in overrides for a in ("--set", item)]
    weights = str(tmp_path / "run" / "model_final.pth")
    assert main(["eval", "--weights", weights, "--output-dir", str(tmp_path / "eval")] + args) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "run" / "metrics.json").read_text()
    )
    image = next((tmp_path / "data").glob("shapes-*/val/000001.png"))
    out = tmp_path / "pred"
    predict = ["predict", "--weights", weights, "--output-dir", str(out), "--score-thresh", "0", str(image)]
    assert main(predict + args) == 0
    result = json.loads((out / "000001.json").read_text())
    assert result["image"] == str(image) and len(result["detections"]) > 0
    assert {d["label"] for d in result["detections"]} <= {"square", "circle", "triangle", "diamond"}
    assert (out / "000001.png").is_file()


def test_cli_reports_config_errors(tmp_path, capsys):
    from detectors.cli import main

    code = main(["train", "--config", str(CONFIG), "--output-dir", str(tmp_path), "--set", "solver.lr=1"])
    assert code == 2
    assert "unknown config key 'solver.lr'" in capsys.readouterr().err
    # the shapes set has 4 categories: 3 classes leave labels without an output
    args = ["train", "--config", str(CONFIG), "--output-dir", str(tmp_path)]
    for item in _tiny_overrides(tmp_path / "data", 1) + ["model.num_classes=3"]:
        args += ["--set", item]
    assert main(args) == 2
    assert "model.num_classes=3 is less than the 4 categories" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_after_the_iteration_with_a_checkpoint_and_resume_is_bit_identical(tmp_path, monkeypatch):
    """Stopped after iteration 3 of 6, between the metrics records of iterations 2 and 4: the resumed run ends with
    the same weights and the same records, the one of iteration 4 still the mean over iterations 3 and 4."""
    data = tmp_path / "data"

    def cfg():
        return load_config(CONFIG, _tiny_overrides(data, 6) + ["solver.log_period=2"])

    train(cfg(), tmp_path / "straight")
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "build_detector", signalling_builder(3))
        with pytest.raises(TrainingInterrupted) as stopped:
            train(cfg(), tmp_path / "resumed")
    assert (stopped.value.iteration, stopped.value.signum) == (3, signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    out = tmp_path / "resumed"
    assert stopped.value.checkpoint == out / "model_0000003.pth"
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert load_checkpoint(out / "model_0000003.pth")["iteration"] == 3
    assert not (out / "metrics.json").exists()  # no final evaluation

    train(cfg(), out, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "model_final.pth")["model"]
    b = load_checkpoint(out / "model_final.pth")["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name

    def records(run):  # without the seconds per iteration
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [r["iter"] for r in records("straight")] == [2, 4, 6, 6]
    assert records("resumed") == records("straight")


@pytest.fixture
def signal_handlers():
    """Python's default SIGINT handler and SIGTERM ignored for the test, whatever the runner set; restored after."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_second_signal_acts_at_once_and_an_ignored_one_stays_ignored(signal_handlers):
    cpu = torch.device("cpu")
    with StopSignals() as stop:
        assert stop.requested(cpu) is None
        signal.raise_signal(signal.SIGTERM)  # ignored before, so ignored now
        assert stop.requested(cpu) is None
        signal.raise_signal(signal.SIGINT)
        assert stop.requested(cpu) == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_leaving_without_a_signal_restores_the_handlers(signal_handlers):
    with StopSignals():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigint_outside_the_training_loop_is_one_line_and_status_130(tmp_path, monkeypatch, capsys, signal_handlers):
    """Ctrl-C in train's final evaluation, in eval and in predict, where no handler of the training loop is
    installed: one line and 128 + SIGINT. The final checkpoint is saved, and --resume evaluates it without
    training again."""
    import detectors.cli as cli

    def ctrl_c(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)

    def status(argv):
        try:
            return cli.main(argv)
        except KeyboardInterrupt:  # would end the whole pytest session rather than fail this test
            pytest.fail("KeyboardInterrupt escaped main")

    out, overrides = tmp_path / "out", _tiny_overrides(tmp_path / "data", 2)
    config = ["--config", str(CONFIG)] + [a for item in overrides for a in ("--set", item)]
    train_args = ["train", "--output-dir", str(out)] + config
    with monkeypatch.context() as patch:
        patch.setattr(engine, "evaluate", ctrl_c)
        assert status(train_args) == 130
    final = out / "model_final.pth"
    assert capsys.readouterr().err.endswith(
        f"dyhead train: interrupted by SIGINT after training; {final} is saved: --resume runs the final evaluation\n"
    )
    assert not (out / "metrics.json").exists()
    trained = final.stat().st_mtime_ns
    assert status(train_args + ["--resume"]) == 0
    assert (out / "metrics.json").is_file() and final.stat().st_mtime_ns == trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 2] and "bbox" in records[-1]

    weights = ["--weights", str(final)]
    monkeypatch.setattr(cli, "evaluate", ctrl_c)
    assert status(["eval", "--output-dir", str(tmp_path / "eval")] + weights + config) == 130
    assert capsys.readouterr().err.endswith("dyhead eval: interrupted by SIGINT\n")
    monkeypatch.setattr(cli, "read_rgb_image", ctrl_c)
    image = next((tmp_path / "data").glob("shapes-*/val/000001.png"))
    assert status(["predict", "--output-dir", str(tmp_path / "pred"), str(image)] + weights + config) == 130
    assert capsys.readouterr().err.endswith("dyhead predict: interrupted by SIGINT\n")


@pytest.mark.slow
def test_a_signal_to_one_ddp_process_stops_both_at_the_same_iteration(tmp_path):
    """Only rank 0 gets SIGTERM (during iteration 2): both processes must agree to stop after it, write one
    checkpoint together and exit, rather than hang in a collective the other never joins."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import detectors.engine.train as engine
        from detectors.cli import main
        from signal_hooks import signalling_builder

        engine.build_detector = signalling_builder(2, rank=0)
        sys.exit(main(sys.argv[1:]))
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           "train", "--config", str(CONFIG), "--output-dir", str(tmp_path / "out")]
    for item in _tiny_overrides(tmp_path / "data", 5):
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("stopped by SIGTERM after iteration 2") == 2, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "out" / "model_0000002.pth")
    assert state["iteration"] == 2 and len(state["rng"]) == 2
    assert (tmp_path / "out" / "last_checkpoint").read_text() == "model_0000002.pth"


@pytest.mark.slow
def test_a_signal_to_the_process_group_spares_the_loader_workers(tmp_path):
    """Ctrl-C, `timeout` and cluster schedulers signal the whole process group, the DataLoader workers too: the
    run must still stop after the iteration with a checkpoint. Here the worker itself signals the group while
    it loads a batch, so the main process waits for that batch (a worker killed by the signal never sends it)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent("""
        import os, signal, sys
        import detectors.data.coco as coco
        from detectors.cli import main

        MAIN, load, calls = os.getpid(), coco.CocoDetection.__getitem__, []

        def signalling_load(self, key):
            calls.append(key)
            if os.getpid() != MAIN and len(calls) == 14:
                os.killpg(os.getpgrp(), signal.SIGTERM)
            return load(self, key)

        coco.CocoDetection.__getitem__ = signalling_load
        sys.exit(main(sys.argv[1:]))
    """))
    cmd = [sys.executable, str(launcher), "train", "--config", str(CONFIG), "--output-dir", str(tmp_path / "out")]
    for item in _tiny_overrides(tmp_path / "data", 8) + ["data.num_workers=1"]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # a session of its own: the signal must not reach pytest
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    stopped = (tmp_path / "out" / "last_checkpoint").read_text()
    assert stopped != "model_final.pth" and load_checkpoint(tmp_path / "out" / stopped)["iteration"] < 8


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-iteration run: its data folder and a function that copies its output folder."""
    root = tmp_path_factory.mktemp("finished")
    train(load_config(CONFIG, _tiny_overrides(root / "data", 2)), root / "out")

    def copy(dest):
        shutil.copytree(root / "out", dest)
        return dest

    return root / "data", copy


@pytest.mark.parametrize("override, message", [
    ("solver.optimizer=sgd", r"written with solver.optimizer=adamw \(config: sgd\): resume with the same"),
    ("solver.decay_groups=by_name", r"solver.decay_groups=by_type \(config: by_name\)"),
    ("solver.max_iter=1", r"at iteration 2, past solver.max_iter=1"),
])
def test_resume_refuses_a_checkpoint_the_solver_does_not_fit(tmp_path, finished_run, override, message):
    """Before, another optimiser failed at its first step (KeyError), other groups raised torch's ValueError, and a
    smaller max_iter evaluated the later model under the smaller number. The folder stays as it was."""
    data, copy = finished_run
    out = copy(tmp_path / "out")
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=message):
        train(load_config(CONFIG, _tiny_overrides(data, 2) + [override]), out, resume=True)
    assert (out / "config.yaml").read_text() == config_before
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


def test_resuming_a_finished_run_evaluates_it_again_and_logs_one_run(tmp_path, monkeypatch, finished_run):
    data, copy = finished_run
    out = copy(tmp_path / "out")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"loss_box": 1.2, "lo')  # a write cut short
    start_batches = []
    build_train_loader = engine.build_train_loader

    def recording_loader(*args, start_batch, **kwargs):
        start_batches.append(start_batch)
        return build_train_loader(*args, start_batch=start_batch, **kwargs)

    monkeypatch.setattr(engine, "build_train_loader", recording_loader)
    train(load_config(CONFIG, _tiny_overrides(data, 2) + ["solver.base_lr=0.5"]), out, resume=True)
    assert start_batches == [2]  # the data order goes on after the checkpoint's 2 batches
    assert (out / "last_checkpoint").read_text() == "model_final.pth"  # a resumed run keeps its pointer
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], "bbox" in r) for r in records] == [(1, False), (2, False), (2, True)]
    log = (out / "log.txt").read_text()
    assert "dropped 1 line(s) that are not JSON records" in log
    assert "keeps its solver settings over the config's: base learning rates [0.002" in log


def test_a_resume_removes_the_checkpoint_temporaries_that_a_kill_left(tmp_path, finished_run):
    """SIGKILL during a checkpoint's write (a scheduler's, after a grace period shorter than the write) leaves its
    temporary, and one of an iteration the resumed run does not write again (a stop's) stayed for good; other
    files stay."""
    data, copy = finished_run
    out = copy(tmp_path / "out")
    (out / "model_0000001.pth.tmp").write_bytes(b"cut short")
    (out / "notes.tmp").write_text("the user's")
    train(load_config(CONFIG, _tiny_overrides(data, 2)), out, resume=True)
    assert sorted(p.name for p in out.glob("*.tmp")) == ["notes.tmp"]
    assert "removed model_0000001.pth.tmp: checkpoint writes that a kill cut short" in (out / "log.txt").read_text()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_fails_to_start_leaves_the_earlier_run_as_it_was(tmp_path, monkeypatch, resume):
    """A typo that fails the data setup must not cost the folder's earlier run its resume pointer or config."""
    from detectors.engine.checkpoint import last_checkpoint, save_checkpoint

    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(CONFIG, _tiny_overrides(tmp_path / "data", 20))
    # what --resume checks before the data: a training state of this data order, within max_iter
    earlier = {"model": {}, "optimizer": {}, "scheduler": {}, "iteration": 10, "rng": [],
               "data": {"seed": cfg.seed, "world_size": 1}}
    save_checkpoint(out, "model_0000010.pth", earlier)
    (out / "config.yaml").write_text("the earlier run's\n")

    def crash(cfg, train):
        raise DatasetError("no such dataset")

    monkeypatch.setattr(engine, "build_dataset", crash)
    with pytest.raises(DatasetError):
        train(cfg, out, resume=resume)
    assert last_checkpoint(out) == out / "model_0000010.pth"
    assert (out / "config.yaml").read_text() == "the earlier run's\n"


def test_a_fresh_run_in_an_earlier_runs_folder_forgets_its_last_checkpoint(tmp_path, monkeypatch):
    """Without --resume, a crash after this run started but before its first checkpoint must not leave --resume
    pointing at the earlier run's checkpoint."""
    from detectors.engine.checkpoint import last_checkpoint, save_checkpoint

    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out, "model_0000010.pth", {"iteration": 10})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "BadImageLog", crash)  # the first thing after the run starts
    with pytest.raises(KeyboardInterrupt):
        train(load_config(CONFIG, _tiny_overrides(tmp_path / "data", 2)), out)
    assert last_checkpoint(out) is None and (out / "model_0000010.pth").is_file()
    assert "holds an earlier run (last checkpoint model_0000010.pth)" in (out / "log.txt").read_text()


def test_cli_exit_status_and_line_for_a_stopped_or_interrupted_run(tmp_path, monkeypatch, capsys):
    """128 + the signal's number and one line each: a training stopped on SIGTERM after its checkpoint (143), a
    SIGINT in train before or after its first checkpoint (130) or in predict (130); a missing config file is an
    error (2)."""
    import detectors.cli as cli
    from detectors.engine.checkpoint import save_checkpoint

    out = tmp_path / "out"
    argv = ["train", "--config", str(CONFIG), "--output-dir", str(out)]

    def stopped(cfg, output_dir, resume):
        raise TrainingInterrupted(3, signal.SIGTERM, output_dir / "model_0000003.pth")

    monkeypatch.setattr(cli, "train", stopped)
    assert cli.main(argv) == 143
    assert capsys.readouterr().err == (f"dyhead train: stopped by SIGTERM after iteration 3; checkpoint "
                                       f"{out / 'model_0000003.pth'}: continue with --resume\n")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", ctrl_c)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == "dyhead train: interrupted by SIGINT before the first checkpoint\n"
    out.mkdir()
    save_checkpoint(out, "model_0000002.pth", {"iteration": 2})
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == (f"dyhead train: interrupted by SIGINT; --resume continues from "
                                       f"{out / 'model_0000002.pth'}\n")
    monkeypatch.setattr(cli, "_predict", ctrl_c)
    assert cli.main(["predict", "--config", str(CONFIG), "--weights", "w.pth", "x.png"]) == 130
    assert capsys.readouterr().err == "dyhead predict: interrupted by SIGINT\n"

    assert cli.main(["train", "--config", str(tmp_path / "none.yaml"), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dyhead train: error: ") and "none.yaml" in err and len(err.splitlines()) == 1


def test_metrics_writer_starts_afresh_or_keeps_what_a_resume_at_an_iteration_keeps(tmp_path):
    from detectors.engine.logger import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    lines = ['{"iter": 1, "loss": 3}', '{"iter": 2, "loss": 2}', '{"iter": 2, "bbox": {"AP": 1}}', '[1, 2]',
             '{"iter": 3, "loss": 1}', '{"iter": 4, "bbox": {"AP": 2}}', '{"iter": 4, "lo']
    text = "".join(line + "\n" for line in lines)
    path.write_text(text)
    MetricsWriter(path, resume_from=2)
    assert path.read_text().splitlines() == lines[:3]
    path.write_text(text)
    MetricsWriter(path, resume_from=2, redo_evaluation=True)  # a finished run of 2 iterations evaluates again
    assert path.read_text().splitlines() == lines[:2]
    path.write_text(text)
    writer = MetricsWriter(path)
    assert path.read_text() == ""
    writer.write({"iter": 1, "loss": 0.5})
    writer.write({"iter": 1, "bbox": {"AP": 3.0}})
    assert path.read_text() == '{"iter": 1, "loss": 0.5}\n{"iter": 1, "bbox": {"AP": 3.0}}\n'


def test_logging_writes_log_txt_on_the_main_process_only(tmp_path):
    """The main process logs INFO to the console and to log.txt; the others only warnings, to the console."""
    import logging

    from detectors.engine.logger import setup_logging

    try:
        other = setup_logging(tmp_path / "other", main_process=False)
        assert [h.level for h in other.handlers] == [logging.WARNING] and not (tmp_path / "other").exists()
        main = setup_logging(tmp_path / "main", main_process=True)
        assert [h.level for h in main.handlers] == [logging.INFO, logging.NOTSET]
        logging.getLogger("detectors.train").info("iter %d", 3)
        for handler in main.handlers:
            handler.flush()
        line = (tmp_path / "main" / "log.txt").read_text()
        assert re.fullmatch(r"\[\d\d/\d\d \d\d:\d\d:\d\d detectors\.train\] iter 3\n", line), line
    finally:
        setup_logging(None, main_process=True)
