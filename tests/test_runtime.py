"""runtime.py: device and precision flags, the float32 and autocast scopes, flag checks, host memory."""

import argparse
import fcntl
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime

REPO = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


def test_precision_flags_resolve_by_hardware_and_by_choice():
    assert runtime.resolve_precision("fp32", CPU) == "fp32"
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    assert runtime.resolve_precision("auto", CPU, auto="fp32") == "fp32"  # evaluate.py's for official files
    assert runtime.resolve_precision("auto", CPU) in ("bf16", "fp32")
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        runtime.resolve_precision("fp16", CPU)
    # A GPU that emulates bf16 (a V100, the table's) trains in fp16: torch counts emulation by default.
    emulating = lambda including_emulation=True: including_emulation  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_bf16_supported", emulating)
        assert runtime.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert runtime.resolve_channels_last(None, CPU, "bf16") is True
    assert runtime.resolve_channels_last(None, CPU, "fp32") is False
    assert runtime.resolve_channels_last(False, torch.device("cuda"), "bf16") is False


def test_ieee_float32_is_put_back_even_after_an_error():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with pytest.raises(KeyError), runtime.ieee_float32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        raise KeyError("an error inside")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_autocast_runs_bf16_for_bf16_and_nothing_for_fp32():
    linear, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with runtime.autocast(CPU, "bf16"):
        assert linear(x).dtype == torch.bfloat16
    with runtime.autocast(CPU, "fp32"):
        assert linear(x).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with runtime.precision_context(CPU, "bf16"):
        assert linear(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        runtime.autocast(CPU, "fp16")
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or fp16"):
        runtime.precision_context(CPU, "fp8")


def test_one_process_is_rank_zero_of_one(capsys):
    assert runtime.rank_and_world_size() == (0, 1)
    calls = []
    assert runtime.rank_zero_first(lambda: calls.append(1) or "result") == "result" and calls == [1]
    runtime.say("said", 3)
    assert capsys.readouterr().out == "said 3\n"
    assert 1 <= runtime.usable_cores() <= (torch.get_num_threads() + 1024)


def parse(flag_type, text):
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=flag_type)
    return parser.parse_args(["--x", text]).x


def test_number_flags_refuse_what_is_out_of_range(capsys):
    assert parse(runtime.number_flag(int, 0), "0") == 0  # an explicit 0 is a value
    assert parse(runtime.number_flag(float, 0, 1), "0.5") == 0.5
    for flag_type, text in [(runtime.number_flag(int, 1), "0"), (runtime.number_flag(float, 0, exclusive=True), "0"),
                            (runtime.number_flag(float, 0), "nan"), (runtime.number_flag(float, 0, 1), "inf"),
                            (runtime.number_flag(int, 0), "two"), (runtime.number_flag(int, 1), "1" + "0" * 400)]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse(flag_type, text)
        assert "argument --x: expected" in capsys.readouterr().err


def test_size_and_path_flags(tmp_path, capsys, monkeypatch):
    assert parse(runtime.size_flag("--crop"), "769") == (769, 769)
    assert parse(runtime.size_flag("--crop"), "512x1024") == (512, 1024)
    with pytest.raises(SystemExit):
        parse(runtime.size_flag("--crop"), "big")
    assert "argument --x: expected N or HxW" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert parse(runtime.writable_path("file"), str(tmp_path / "new" / "out.json")) == str(
        tmp_path / "new" / "out.json"
    )
    for kind, text, message in [("file", tmp_path, "is a directory"), ("folder", a_file, "is a file"),
                                ("file", a_file / "x.json", "is a file, not a folder")]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse(runtime.writable_path(kind), str(text))
        assert message in capsys.readouterr().err
    # An existing file is replaced by a rename in its folder: the folder's permission is what counts.
    asked = []
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda place, mode: asked.append(Path(place)) or True)
        parse(runtime.writable_path("file"), str(a_file))
    assert asked == [tmp_path]
    # A name of 250 characters is written, its temporary's name cut to fit the file system's 255.
    runtime.write_text(tmp_path / ("n" * 246 + ".json"), "{}")
    assert (tmp_path / ("n" * 246 + ".json")).read_text() == "{}"


def test_peak_memory_is_the_resident_peak_on_a_cpu():
    before = runtime.peak_memory_gb(CPU)
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    assert runtime.peak_memory_gb(CPU) >= before and runtime.peak_memory_gb(CPU) > 0.06
    del block


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_loader_workers_outlive_the_group_stop_but_not_their_process(tmp_path):
    # Workers ignore a stop sent to the process group (the main process checkpoints first), yet end
    # when their own process ends them: a loader left open at exit (after an exception, say) is ended
    # by the interpreter with SIGTERM, which workers that ignored it outright made hang for ever.
    # The same child process also keeps freed memory (a setting that lasts for the whole process, and
    # this one runs other tests): with glibc, it takes effect.
    # The stop is sent once both workers have started (one was sometimes still starting, and died of
    # it), by a kill that must succeed: /bin/sh's kill in Debian and Ubuntu (dash) refuses
    # 'kill -TERM -- -PGID' ("Illegal number: -"), and the test then passed without any stop sent.
    script = tmp_path / "left_open.py"
    script.write_text(
        "import os, signal, sys, time, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import runtime\n"
        "print(runtime.keep_freed_memory())\n"
        "class Numbers(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 1000\n"
        "    def __getitem__(self, i): return i\n"
        "loader = torch.utils.data.DataLoader(Numbers(), num_workers=2,\n"
        "    worker_init_fn=runtime.leave_stop_signals_to_the_main_process)\n"
        "batches = iter(loader)\n"
        "next(batches), next(batches)  # one from each worker: both have started\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the main process takes the stop itself\n"
        "assert os.system(f'kill -TERM -{os.getpgid(0)}') == 0  # as a scheduler does, from another process\n"
        "time.sleep(0.2)\n"
        "print(sum(int(next(batches)) for _ in range(20)))  # the workers are still there\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          start_new_session=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", str(sum(range(2, 22)))]


def test_more_torchrun_processes_than_gpus_are_said_in_words(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")  # the third process of --nproc_per_node=4 on a 2-GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="process 2 of this machine has no GPU of its own: 2 are visible"):
        runtime.setup_device("auto")


def test_a_lock_file_removed_between_its_open_and_its_lock_is_not_held_but_made_anew(tmp_path, monkeypatch):
    # evaluate.py removes its lock files as it ends; a run that opened one just before would otherwise lock
    # a file no one else finds, and a third run would take the lock beside it on a new file.
    path, real_flock, calls = tmp_path / ".evaluate.lock", fcntl.flock, []

    def removed_by_its_holder_first(file, flags):
        if not calls:
            path.unlink()
        calls.append(flags)
        return real_flock(file, flags)

    monkeypatch.setattr(fcntl, "flock", removed_by_its_holder_first)
    lock = runtime.hold_lock(path)
    assert len(calls) == 2 and os.fstat(lock.fileno()).st_ino == path.stat().st_ino
    monkeypatch.undo()
    with pytest.raises(runtime.Taken, match=rf"process {os.getpid()} on "):
        runtime.hold_lock(path)  # the file on the path is the one held
