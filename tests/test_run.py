"""run.py: a training run's work dir: atomic checkpoints, full disks, exact names, stop signals."""

import errno
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import run
import runtime


def test_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="non-finite values in weight"):
        run.save_checkpoint(
            tmp_path / "x.pth", {"state_dict": net.state_dict(), "optimizer": optimizer.state_dict()}
        )
    assert not list(tmp_path.iterdir())


def test_temporary_files_are_unique_per_writer_and_removed_on_failure(tmp_path, monkeypatch):
    written = []

    def failing_save(checkpoint, path):
        written.append(Path(path).name)
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    net = torch.nn.Linear(2, 2)
    for _ in range(2):
        with pytest.raises(OSError):
            run.save_checkpoint(tmp_path / "iter_1.pth", {"state_dict": net.state_dict()})
    assert written[0] != written[1] and all(str(os.getpid()) in name for name in written)
    assert not list(tmp_path.iterdir())


def small_writer(tmp_path):
    net = torch.nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(1, 3, 5, 5)).sum().backward()
    optimizer.step()
    dataset = SimpleNamespace(classes=["a", "b"], palette=[[0, 0, 0], [1, 1, 1]])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    meta = {"CLASSES": dataset.classes, "PALETTE": dataset.palette}
    return run.CheckpointWriter(
        work_dir=tmp_path,
        raw_model=net,
        optimizer=optimizer,
        scaler=scaler,
        config={},
        meta=meta,
        keep=2,
        how_to_continue=lambda: "continue with: python train.py --resume",
    )


def test_only_rank_0_writes_but_every_rank_knows_the_checkpoint_to_continue_from(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "rank_and_world_size", lambda: (1, 2))
    monkeypatch.setattr(run, "gather_rng_states", lambda: [])  # the all-gather of a real process group
    assert small_writer(tmp_path).save(4, -1.0, None) == tmp_path / "iter_4.pth"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_said_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    writer = small_writer(tmp_path)
    first = writer.save(1, -1.0, None)
    real_save = torch.save

    def disk_full(checkpoint, path):
        real_save(checkpoint, path)  # most of it reached the disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk filled up

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        writer.save(2, -1.0, first)
    message = str(stop.value)
    assert "the disk is full" in message and "MB free" in message and "iter_2.pth needs about" in message
    assert f"{first} is intact" in message and message.endswith("python train.py --resume")
    assert "older than iter_1.pth may go, and --keep 1 keeps one from then on" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_1.pth", "last_checkpoint"]
    assert torch.load(first, weights_only=True)["iteration"] == 1


def test_only_exact_iter_names_are_checkpoints(tmp_path):
    writer = small_writer(tmp_path)
    for iteration in (4, 12):
        writer.save(iteration, -1.0, None)
    (tmp_path / "iter_4 copy.pth").write_bytes((tmp_path / "iter_4.pth").read_bytes())
    (tmp_path / "iter_x.pth").write_bytes(b"note")
    (tmp_path / "iter_04.pth").write_bytes(b"a user's copy, not checkpoint 4")
    assert [p.name for p in run.checkpoints_in(tmp_path)] == ["iter_4.pth", "iter_12.pth"]
    assert run.find_resume_checkpoint("latest", tmp_path).name == "iter_12.pth"
    writer.save(20, -1.0, None)  # keeps 2: prunes iter_4.pth and leaves the copies alone
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "last_checkpoint")
    assert names == ["iter_04.pth", "iter_12.pth", "iter_20.pth", "iter_4 copy.pth", "iter_x.pth"]


def test_keep_never_deletes_what_the_run_just_wrote_and_resume_takes_the_newest_written(tmp_path):
    # A run resumed from an earlier checkpoint writes numbers below the abandoned ones beside it.
    writer = small_writer(tmp_path)  # keeps 2
    for abandoned in (100, 200):
        writer.save(abandoned, -1.0, None)
    for iteration in (5, 10, 15):
        path = writer.save(iteration, -1.0, None)
        assert path.is_file()  # before, --keep deleted it at once: 100 and 200 are "newer"
        assert run.find_resume_checkpoint("latest", tmp_path) == path
    names = sorted(p.name for p in run.checkpoints_in(tmp_path))
    assert names == ["iter_10.pth", "iter_100.pth", "iter_15.pth", "iter_200.pth"]
    (tmp_path / "iter_15.pth").unlink()  # last_checkpoint names a file that is gone: the highest number
    assert run.find_resume_checkpoint("latest", tmp_path).name == "iter_200.pth"


def test_a_full_disk_reported_by_torch_save_as_a_runtime_error_is_still_a_full_disk(tmp_path, monkeypatch):
    # torch 2.14's zip writer reports ENOSPC without the errno: "[enforce fail at inline_container.cc:672]
    # . unexpected pos 704 vs 598" (measured with torch.save into /dev/full).
    writer = small_writer(tmp_path)
    first = writer.save(1, -1.0, None)

    def disk_full(checkpoint, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=100))
    with pytest.raises(SystemExit) as stop:
        writer.save(2, -1.0, first)
    message = str(stop.value)
    assert "the disk is full" in message and "has 0 MB free" in message and "Lower --lr" not in message
    assert f"{first} is intact" in message and message.endswith("python train.py --resume")
    assert "older than iter_1.pth may go, and --keep 1 keeps one from then on" in message
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left, another failure: as it is
        writer.save(3, -1.0, first)


def test_the_stop_handler_lets_forked_children_die_and_is_put_back_after_a_run():
    # A process pool forked after train.main (tools/prepare_datasets.py in the same process, say) ends
    # its workers with SIGTERM; a worker that only noted the signal would hang the pool for ever.
    before = signal.getsignal(signal.SIGTERM)
    stop = run.StopRequest()
    try:
        ready, ready_write = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(ready_write, b"1")  # (a signal between fork and Python's after-fork reset is dropped)
            time.sleep(20)
            os._exit(0)
        os.read(ready, 1)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        # In the process that made it: before the first step, nothing to keep, so it stops at once ...
        with pytest.raises(SystemExit, match="stopped by SIGTERM before training started"):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # noted too, should the exit be swallowed (raised inside a finaliser)
        stop.requested, stop.training = False, True  # once steps are done it is noted: the step ends, kept
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_broken_or_foreign_last_checkpoint_never_blocks_a_resume_nor_leaves_the_work_dir(tmp_path):
    writer = small_writer(tmp_path)
    for iteration in (2, 4):
        writer.save(iteration, -1.0, None)
    other = tmp_path.parent / "other"
    other.mkdir(exist_ok=True)
    (other / "iter_9.pth").write_bytes((tmp_path / "iter_2.pth").read_bytes())
    for pointer in (b"\xff\xfe\x00garbage\x9c", b"../other/iter_9.pth", str(other / "iter_9.pth").encode()):
        (tmp_path / "last_checkpoint").write_bytes(pointer)
        assert run.find_resume_checkpoint("latest", tmp_path) == tmp_path / "iter_4.pth"


def test_a_line_torn_by_a_crash_stays_alone_on_its_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"iteration": 1, "loss": 0.5}\n{"iteration": 2, "lo')  # killed mid-line
    with run.Log(path) as log:
        log.write({"iteration": 3, "mIoU": 50.0})
    records, unreadable = run.read_log(path)
    assert records == [{"iteration": 1, "loss": 0.5}, {"iteration": 3, "mIoU": 50.0}] and unreadable == 1


def test_the_log_only_appends_so_a_pipe_or_a_write_only_file_takes_it(tmp_path):
    path = tmp_path / "log.jsonl"
    os.mkfifo(path)  # a run's log followed from elsewhere: it cannot be read back nor seeked
    received = []
    reader = threading.Thread(target=lambda: received.append(path.read_bytes()))
    reader.start()
    with run.Log(path) as log:
        log.write({"iteration": 1})
    reader.join(10)
    assert received == [b'{"iteration": 1}\n']


def test_ctrl_c_is_acknowledged_at_once_and_a_second_one_stops_in_words(capsys):
    stop = run.StopRequest(lambda: "continue with: python train.py --iters 10 --resume")
    stop.training = True  # steps are done
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        assert "stopping after this step, with a checkpoint; press Ctrl-C again" in capsys.readouterr().err
        with pytest.raises(SystemExit) as second:
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    message = str(second.value)
    assert "stopped at once by a second Ctrl-C" in message and message.endswith("--iters 10 --resume")


def test_a_bad_file_before_any_checkpoint_says_to_start_again_without_resume(tmp_path):
    config = {"work_dir": str(tmp_path), "pictures": False}
    training = run.Run(config, ["--iters", "10"])
    with pytest.raises(SystemExit) as stop, training.checkpoint_and_exit_on_a_bad_file():
        raise data.FileProblem("cannot decode image x.png (damaged)")
    message = str(stop.value)
    assert message.startswith("train.py: cannot decode image x.png") and "(no checkpoint yet)" in message
    assert message.endswith("start again with: python train.py --iters 10")


def test_the_command_that_continues_a_run_fits_what_the_run_has_written(tmp_path):
    training = run.Run(
        {"work_dir": str(tmp_path), "pictures": False}, ["--iters", "10", "--load-from", "a b.pth"]
    )
    assert training.how_to_continue() == "start again with: python train.py --iters 10 --load-from 'a b.pth'"
    # Resumed from an earlier checkpoint: a bare --resume would take the one last_checkpoint names.
    training.resume_path = training.last_path = tmp_path / "iter_2.pth"
    resumed = f"continue with: python train.py --iters 10 --resume {tmp_path / 'iter_2.pth'}"
    assert training.how_to_continue() == resumed
    training.last_path = tmp_path / "iter_4.pth"  # written by this run: last_checkpoint names it
    assert training.how_to_continue() == "continue with: python train.py --iters 10 --resume"
