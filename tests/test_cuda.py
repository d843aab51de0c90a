"""The CUDA path on a real GPU; every test here is skipped without one. tools/gpu_check/check_gpu.sh runs them.

fp32 on CUDA (TF32 off) against the CPU on the same weights, whole and sliding-window, for GCNet and
the comparison's FCN and NonLocal models; tools/gpu_check's cuDNN-fused inference candidate; cuDNN's
channels_last against the default layout; bf16 and fp16 (GradScaler) training on the toy set;
activation checkpointing; evaluate.py on both devices; a torchrun run of train.py that resumes;
NCCL in one process; SyncBatchNorm in two ranks sharing the one GPU. The whole file takes about two
minutes on one GPU, the toy set's generation included.
"""

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

import data
import evaluate
import model
import recipe
import runtime
import train
from tools.gpu_check import cudnn_fused

REPO = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: tools/gpu_check/check_gpu.sh runs these on one"
)


@pytest.fixture(autouse=True)
def all_cpu_threads():
    """The CPU references want every core (conftest.py keeps two for the CPU-only suite)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "toy"
    data.build_dataset("toy", root=str(root), split="train")  # writes it
    return str(root)


def randomized(net, seed=0):
    """Random BatchNorm weights, biases and running statistics, and random weights for the convs
    that start at zero. A fresh GCNet zero-initialises the last BatchNorm of every residual branch
    and the last conv of the GC block: they start as the identity, and most of the network (the GC
    block included) would not be compared at all."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.25 + 0.5 * torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            elif isinstance(module, nn.Conv2d) and not module.weight.any():
                module.weight.copy_(0.01 * torch.randn(module.weight.shape, generator=generator))
    return net


def relative_error(actual, expected, scale=None):
    """max |actual - expected| / max |expected| (or / scale), in float64 on the CPU."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.abs().max().item() if scale is None else scale
    difference = (actual - expected).abs().max().item()
    return difference / scale if scale > 0 else difference


def worst_gradient_error(net, reference):
    """The largest relative error over the parameters' gradients, and its parameter's name. Each is
    measured against its own largest value, but at least 1e-5 of the model's largest
    gradient: some gradients are zero up to rounding (a bias before a softmax over pixels, as the
    GC block's attention has), and their rounding noise is not worth comparing."""
    reference_grads = dict(reference.named_parameters())
    floor = 1e-5 * max(parameter.grad.abs().max().item() for parameter in reference.parameters())
    errors = {}
    for name, parameter in net.named_parameters():
        expected = reference_grads[name].grad
        errors[name] = relative_error(parameter.grad, expected, max(expected.abs().max().item(), floor))
    name = max(errors, key=errors.get)
    return errors[name], name


def random_images(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def toy_loss(net, images, labels):
    """The training loss; the same dropout masks on every call (the heads drop channels in training)."""
    torch.manual_seed(0)
    logits, aux_logits = net(images)
    return train.segmentation_loss(logits, labels) + recipe.AUX_WEIGHT * train.segmentation_loss(
        aux_logits, labels
    )


# -----------------------------------------------------------------------------------------------
# fp32 on CUDA = the CPU; channels_last = the default layout


@torch.no_grad()
def test_fp32_whole_image_logits_on_cuda_equal_the_cpu():
    net = randomized(model.GCNet(19)).eval()
    images = random_images((1, 3, 256, 512))
    with runtime.precision_context(CPU, "fp32"):
        expected = net(images)
    net_cuda = copy.deepcopy(net).to(CUDA)
    with runtime.precision_context(CUDA, "fp32"):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"  # TF32 off
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        actual = net_cuda(images.to(CUDA))
    error = relative_error(actual, expected)
    assert error <= 1e-4, f"relative error {error:.2e}"


@torch.no_grad()
def test_fp32_slide_inference_on_cuda_equals_the_cpu():
    # The 769 models' protocol at a small size: align_corners, 129x129 windows at stride 86 on a
    # 257x385 image (3 x 4 windows, the last ones shifted back inside the image).
    net = randomized(model.GCNet(19, align_corners=True)).eval()
    images = random_images((1, 3, 257, 385))
    settings = dict(crop_size=(129, 129), stride=(86, 86), window_batch=4)
    results = {}
    for device, run_net in ((CPU, net), (CUDA, copy.deepcopy(net).to(CUDA))):
        with runtime.precision_context(device, "fp32"):
            logits = evaluate.slide_inference(run_net, images.to(device), **settings)
            probabilities = evaluate.predict(
                run_net, [images.to(device)], (300, 450), mode="slide", **settings
            )
        results[device.type] = logits, probabilities
    error = relative_error(results["cuda"][0], results["cpu"][0])
    assert error <= 1e-4, f"relative error of the logits {error:.2e}"
    difference = (results["cuda"][1].cpu() - results["cpu"][1]).abs().max().item()
    assert difference <= 1e-4, f"largest probability difference {difference:.2e}"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_softmax_in_place_on_cuda_gives_the_out_of_place_values(layout):
    # evaluate.predict soft-maxes each resized map in place (torch.softmax with out= its input).
    logits = (torch.randn(1, 150, 301, 517, device=CUDA) * 4).contiguous(memory_format=layout)
    if layout == torch.channels_last:  # the classes innermost in memory: a softmax over the last dim
        expected = logits.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)
    else:
        expected = logits.softmax(dim=1)
    assert torch.equal(evaluate.class_softmax_(logits), expected)


@pytest.mark.parametrize("context", ["nonlocal", "none"])
def test_the_comparison_models_on_cuda_equal_the_cpu(context, monkeypatch):
    # The paper's comparison (README): the FCN baseline, and the Non-local block both ways, whole with
    # gradients as in training and a block of rows at a time without (here 4 blocks of 512 rows).
    net = randomized(model.GCNet(19, context=context)).eval()
    images = random_images((1, 3, 256, 512))  # 32 x 64 = 2048 positions at 1/8
    monkeypatch.setattr(model, "ATTENTION_CHUNK", 512 * 2048)
    rows, pairwise_attention = [], model.pairwise_attention
    monkeypatch.setattr(
        model, "pairwise_attention", lambda q, k: rows.append(q.shape[1]) or pairwise_attention(q, k)
    )
    with runtime.precision_context(CPU, "fp32"), torch.no_grad():
        expected, attention = net(images, return_attention=True)
    net_cuda = copy.deepcopy(net).to(CUDA)
    with runtime.precision_context(CUDA, "fp32"):
        with torch.no_grad():
            actual, actual_attention = net_cuda(images.to(CUDA), return_attention=True)
        whole = net_cuda(images.to(CUDA))  # with gradients: the matrix formed whole
    # Non-local: the blocks and the centre row on each device, then the whole matrix and its centre row.
    if context == "nonlocal":
        assert rows == ([512] * 4 + [1]) * 2 + [2048, 1], rows
    for name, logits in (("in blocks", actual), ("whole", whole)):
        error = relative_error(logits, expected)
        assert error <= 1e-4, f"{context}, {name}: relative error {error:.2e}"
    if context == "none":
        assert attention is None and actual_attention is None
    else:  # the centre position's map
        assert relative_error(actual_attention, attention) <= 1e-4
    # A bf16 training step with the block: finite, and the Non-local matrix's gradient reaches theta.
    net_cuda.train()
    labels = torch.randint(0, 19, (1, 256, 512), generator=torch.Generator().manual_seed(2)).to(CUDA)
    with runtime.autocast(CUDA, "bf16"):
        logits, aux_logits = net_cuda(images.to(CUDA))
    loss = train.segmentation_loss(logits, labels) + recipe.AUX_WEIGHT * train.segmentation_loss(
        aux_logits, labels
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net_cuda.parameters())
    if context == "nonlocal":
        assert net_cuda.decode_head.nl_block.theta.conv.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_the_cudnn_fused_inference_candidate_equals_the_folded_model():
    # tools/gpu_check/targets.py's candidate: cuDNN's conv + bias (+ residual) + ReLU in one call.
    net = randomized(model.GCNet(19)).eval().to(CUDA, memory_format=torch.channels_last)
    folded = evaluate.fold_batchnorm(net)
    fused = cudnn_fused.fuse_conv_relu(folded)
    images = random_images((1, 3, 256, 512)).to(CUDA, memory_format=torch.channels_last)
    with runtime.precision_context(CUDA, "fp32"):
        error = relative_error(fused(images), folded(images))
    assert error <= 1e-4, f"fp32: relative error {error:.2e}"
    dtypes = []
    fused.backbone.layer4.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    with runtime.precision_context(CUDA, "bf16"):
        expected, actual = folded(images), fused(images)
    assert dtypes == [torch.bfloat16]  # cast as autocast casts a convolution
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= 0.99 and relative_error(actual, expected) <= 0.05, agreement


def for_gradient_checks(net):
    """Training mode with every BatchNorm on its running statistics and no dropout. With batch
    statistics, this randomized net's gradients are so ill-conditioned that float32 and float64 differ
    by ~10-20% for some weights on the CPU and on CUDA alike, in either layout (measured on an H200);
    CUDA's dropout masks differ from the CPU's."""
    net.train()
    for module in net.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.Dropout2d)):
            module.eval()
    return net


def test_channels_last_equals_the_default_layout_on_cudnn():
    torch.backends.cudnn.benchmark = False
    net = randomized(model.GCNet(19))
    images = random_images((2, 3, 256, 256))
    labels = torch.randint(0, 19, (2, 256, 256), generator=torch.Generator().manual_seed(2))
    labels[:, :16] = data.IGNORE_INDEX
    plain, channels_last = (
        copy.deepcopy(net).to(CUDA),
        copy.deepcopy(net).to(CUDA, memory_format=torch.channels_last),
    )
    assert channels_last.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    layouts = ((plain, images.to(CUDA)), (channels_last, images.to(CUDA, memory_format=torch.channels_last)))
    with runtime.precision_context(CUDA, "fp32"):
        with torch.no_grad():
            expected, actual = (run_net.eval()(run_images) for run_net, run_images in layouts)
        error = relative_error(actual, expected)
        assert error <= 1e-4, f"relative error of the eval logits {error:.2e}"
        for run_net, run_images in layouts:
            toy_loss(for_gradient_checks(run_net), run_images, labels.to(CUDA)).backward()
    # The truth: float64 on the CPU. Both layouts measured ~1e-3 from it (their sums run in other orders).
    reference = for_gradient_checks(copy.deepcopy(net).double())
    toy_loss(reference, images.double(), labels).backward()
    for name, run_net in (("default layout", plain), ("channels_last", channels_last)):
        error, parameter = worst_gradient_error(run_net, reference)
        assert error <= 5e-3, (
            f"{name}: relative error {error:.2e} of the gradient of {parameter} against float64"
        )
    # Training mode: batch statistics and the same dropout masks (toy_loss seeds them) give the same loss.
    with runtime.precision_context(CUDA, "fp32"), torch.no_grad():
        losses = [toy_loss(run_net.train(), run_images, labels.to(CUDA)) for run_net, run_images in layouts]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)


# -----------------------------------------------------------------------------------------------
# Mixed precision training, activation checkpointing


def train_steps(toy_root, device, precision, steps=20):
    """`steps` SGD steps of the toy recipe from scratch with train.py's pieces: its loss, the
    autocast of runtime.py around the forward pass, a GradScaler that only fp16 enables. Returns (losses, the number
    of steps the scaler skipped, the model)."""
    torch.manual_seed(0)
    row = recipe.row("toy")
    train_set = data.build_dataset("toy", root=toy_root, split="train")
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=row["batch_size"], shuffle=True, drop_last=True, num_workers=2,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    net = model.GCNet(train_set.num_classes).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(
        net.parameters(), lr=row["lr"], momentum=row["momentum"], weight_decay=row["weight_decay"]
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    losses, skipped = [], 0
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
    for images, labels in itertools.islice(batches, steps):
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
        with runtime.autocast(device, precision):  # the forward pass only, as train.py
            logits, aux_logits = net(images)
        loss = train.segmentation_loss(logits, labels) + row["aux_weight"] * train.segmentation_loss(
            aux_logits, labels
        )
        optimizer.zero_grad(set_to_none=True)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.is_enabled() and scaler.get_scale() < scale  # the scale drops on a skipped step
        losses.append(loss.item())
    return losses, skipped, net


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_stays_finite_and_the_loss_falls(toy_root, precision):
    losses, skipped, net = train_steps(toy_root, CUDA, precision)
    assert all(np.isfinite(losses)), losses
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
    assert skipped <= 5, f"the GradScaler skipped {skipped} of 20 steps"


def saved_bytes(function):
    """Bytes autograd keeps for the backward pass while `function` runs."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return result, total


def test_activation_checkpointing_gives_the_same_gradients():
    try:
        checkpointed = model.GCNet(5, activation_checkpointing=True)
    except TypeError:
        pytest.skip("model.GCNet takes no activation_checkpointing keyword")
    plain = randomized(model.GCNet(5))
    checkpointed.load_state_dict(plain.state_dict())
    images = random_images((2, 3, 128, 128)).to(CUDA)
    labels = torch.randint(0, 5, (2, 128, 128), generator=torch.Generator().manual_seed(2)).to(CUDA)
    results = {}
    with runtime.precision_context(CUDA, "fp32"):
        for name, net in (("plain", plain), ("checkpointed", checkpointed)):
            net.to(CUDA).train()
            loss, saved = saved_bytes(lambda net=net: toy_loss(net, images, labels))
            loss.backward()
            results[name] = loss.item(), saved
    assert results["checkpointed"][0] == pytest.approx(results["plain"][0], rel=1e-6)
    assert results["checkpointed"][1] < 0.6 * results["plain"][1], results  # it does keep less
    error, name = worst_gradient_error(checkpointed, plain)
    assert error <= 1e-4, f"relative error {error:.2e} of the gradient of {name}"
    # The recomputation must not update the BatchNorm statistics a second time.
    for (name, buffer), reference in zip(checkpointed.named_buffers(), plain.buffers()):
        torch.testing.assert_close(buffer, reference, rtol=1e-5, atol=1e-6, msg=name)


# -----------------------------------------------------------------------------------------------
# evaluate.py on both devices


def test_evaluate_fp32_on_cuda_predicts_what_the_cpu_predicts(toy_root, tmp_path):
    # A random 5-class model saved as train.py saves a toy run (its recipe, classes and palette).
    torch.manual_seed(0)
    checkpoint = tmp_path / "random.pth"
    meta = dict(CLASSES=data.TOY_CLASSES, PALETTE=data.TOY_PALETTE)
    torch.save(
        dict(state_dict=randomized(model.GCNet(5)).state_dict(), recipe=recipe.row("toy"), meta=meta),
        checkpoint,
    )
    predictions, matrices = {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        evaluate.main(["--checkpoint", str(checkpoint), "--data-root", toy_root, "--device", device,
                       "--precision", "fp32", "--workers", "0", "--save-dir", str(out / "pictures"),
                       "--out", str(out / "results.json")])  # fmt: skip
        files = sorted((out / "pictures").rglob("*_pred.png"))
        predictions[device] = {path.relative_to(out): np.array(Image.open(path)) for path in files}
        matrices[device] = np.array(json.loads((out / "results.json").read_text())["confusion_matrix"])
    assert (
        len(predictions["cpu"]) == data.TOY_COUNTS["val"]
        and predictions["cpu"].keys() == predictions["cuda"].keys()
    )
    cpu, cuda = (np.stack(list(predictions[device].values())) for device in ("cpu", "cuda"))
    assert len(np.unique(cpu)) >= 2, "the random model predicts one class only: the comparison would be empty"
    differing = int((cpu != cuda).sum())
    assert differing <= 1e-4 * cpu.size, f"{differing} of {cpu.size} pixels predicted differently"
    assert np.abs(matrices["cpu"] - matrices["cuda"]).sum() <= 2 * differing


# -----------------------------------------------------------------------------------------------
# Processes: torchrun, NCCL, SyncBatchNorm


def run_process(command, timeout, log_path, env=None):
    """Run a command with its output in log_path; on timeout SIGTERM it (torchrun passes that to its
    workers), then SIGKILL. Returns (exit status or None after a timeout, output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **(env or {}))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            status = None
    return status, Path(log_path).read_text()


def torchrun_train(toy_root, work_dir, *flags, timeout=150):
    """One-process torchrun of train.py on the toy set; fails the test with the output's tail."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               "--dataset", "toy", "--data-root", toy_root, "--work-dir", str(work_dir), "--device", "cuda",
               "--batch-size", "4", "--workers", "0", "--no-pictures", *flags]  # fmt: skip
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    # cuBLAS reads its workspace setting when it starts: set it before the process does.
    status, output = run_process(command, timeout, Path(work_dir).parent / f"{Path(work_dir).name}.log",
                                 env=dict(CUBLAS_WORKSPACE_CONFIG=":4096:8"))  # fmt: skip
    if status != 0:
        pytest.fail(f"torchrun train.py {' '.join(flags)} " + ("timed out" if status is None else f"exit {status}")
                    + ":\n" + output[-4000:])  # fmt: skip
    return output


def straight_and_resumed(toy_root, folder, iters, interval, flags):
    """Weights and optimizer state at `iters` of an uninterrupted run and of one resumed from the
    uninterrupted run's checkpoint at `interval`, plus the straight run's checkpoint at `interval`."""
    common = ["--iters", str(iters), "--eval-interval", str(interval), *flags]
    torchrun_train(toy_root, folder / "straight", *common)
    resumed_dir = folder / "resumed"
    resumed_dir.mkdir()
    shutil.copy(folder / "straight" / f"iter_{interval}.pth", resumed_dir)
    output = torchrun_train(toy_root, resumed_dir, *common, "--resume")
    assert f"at iteration {interval}" in output, output[-2000:]
    load = lambda path: torch.load(path, map_location="cpu", weights_only=False)  # noqa: E731
    straight, resumed = (
        load(folder / "straight" / f"iter_{iters}.pth"),
        load(resumed_dir / f"iter_{iters}.pth"),
    )
    assert straight["iteration"] == resumed["iteration"] == iters and len(resumed["rng"]) == 1
    return straight, resumed, load(folder / "straight" / f"iter_{interval}.pth")


def momentum_buffers(checkpoint):
    return [state["momentum_buffer"] for state in checkpoint["optimizer"]["state"].values()]


def test_torchrun_on_cuda_resumes_exactly_with_deterministic_kernels(toy_root, tmp_path):
    straight, resumed, _ = straight_and_resumed(
        toy_root, tmp_path, 6, 3, ["--crop", "64", "--precision", "fp32", "--deterministic"]
    )
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert all(torch.equal(a, b) for a, b in zip(momentum_buffers(straight), momentum_buffers(resumed)))


def test_torchrun_on_cuda_resumes_to_rounding_with_the_default_settings(toy_root, tmp_path):
    # bf16, channels_last, cudnn.benchmark: the kernels' reduction order varies from run to run, so
    # the two runs agree to rounding, far closer than to the weights four steps earlier.
    straight, resumed, earlier = straight_and_resumed(toy_root, tmp_path, 8, 4, [])
    assert straight["recipe"]["precision"] != "fp32" and straight["recipe"]["channels_last"]

    def distance(a, b):
        """The largest relative_error over the floating-point weights and buffers, and its key. The GC
        block's conv_mask.bias is left out: it shifts every score before a softmax over positions, so its
        gradient is zero but for rounding, and its value (from 0) is rounding noise in either run."""
        state, reference = a["state_dict"], b["state_dict"]
        errors = {
            key: relative_error(state[key], value)
            for key, value in reference.items()
            if value.is_floating_point() and not key.endswith("gc_block.conv_mask.bias")
        }
        key = max(errors, key=errors.get)
        return errors[key], key

    (apart, key), (moved, _) = distance(resumed, straight), distance(earlier, straight)
    assert apart <= 1e-2 and apart < 0.1 * moved, (
        f"resumed vs straight {apart:.2e} ({key}), 4 steps earlier {moved:.2e}"
    )


# The lines that mean a backend will not put two ranks on one GPU (NCCL refuses duplicate devices;
# a GPU in an exclusive compute mode refuses a second process).
REFUSALS = ("Duplicate GPU", "ncclInvalidUsage", "invalid usage", "busy or unavailable", "not supported")


def run_ranks(mode, backend, folder, world_size, timeout=60):
    """Start world_size processes of this file's rank_main; returns (statuses, their output)."""
    logs = [folder / f"rank{rank}.log" for rank in range(world_size)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    processes = []
    for rank in range(world_size):
        command = [sys.executable, __file__, mode, backend, str(folder), str(rank), str(world_size)]
        with open(logs[rank], "w") as log:
            processes.append(
                subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    deadline = time.monotonic() + timeout
    statuses = []
    for process in processes:
        try:
            statuses.append(process.wait(timeout=max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            statuses.append(None)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    return statuses, "\n".join(f"--- rank {rank}\n{log.read_text()}" for rank, log in enumerate(logs))


def test_nccl_in_one_process(tmp_path):
    # train.py starts no process group for one process, so this is where NCCL itself is shown to work.
    statuses, output = run_ranks("nccl-one-rank", "nccl", tmp_path, 1)
    assert statuses == [0], output[-4000:]
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"all_reduce": 3.0, "backend": "nccl"}


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_syncbn_in_two_ranks_on_one_gpu_equals_batchnorm_over_both(backend, tmp_path):
    statuses, output = run_ranks("syncbn", backend, tmp_path, 2)
    if statuses != [0, 0]:
        refusal = next(
            (line.strip() for line in output.splitlines() if any(r in line for r in REFUSALS)), None
        )
        if refusal is not None:
            pytest.skip(f"{backend} refuses two ranks on one GPU: {refusal[:300]}")
        if backend == "nccl" and None in statuses:
            pytest.skip(
                "nccl hung for 60 s with two ranks on one GPU (NCCL does not support that); gloo is tried next"
            )
        pytest.fail(f"{backend}: rank exit statuses {statuses}:\n{output[-4000:]}")
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert max(errors.values()) <= 1e-5, (rank, errors)


# -----------------------------------------------------------------------------------------------
# The rank processes: python tests/test_cuda.py MODE BACKEND FOLDER RANK WORLD_SIZE


def syncbn_rank(rank, folder):
    """SyncBatchNorm over both ranks' images against a plain BatchNorm2d over all of them. The ranks
    hold different numbers of images (1 and 3), so the statistics must weigh them by their counts."""
    generator = torch.Generator().manual_seed(0)
    images = 1 + 2 * torch.randn(4, 8, 5, 6, generator=generator)  # both ranks' images
    upstream = torch.randn(4, 8, 5, 6, generator=generator)  # d loss / d output
    reference = nn.BatchNorm2d(8)
    with torch.no_grad():
        reference.weight.copy_(0.5 + torch.rand(8, generator=generator))
        reference.bias.copy_(torch.randn(8, generator=generator))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference)).to(CUDA).train()
    assert isinstance(synced, nn.SyncBatchNorm)
    reference.to(CUDA).train()
    mine = slice(0, 1) if rank == 0 else slice(1, 4)
    inputs = images[mine].to(CUDA).requires_grad_()
    outputs = synced(inputs)
    outputs.backward(upstream[mine].to(CUDA))
    everything = images.to(CUDA).requires_grad_()
    expected = reference(everything)
    expected.backward(upstream.to(CUDA))
    # Each rank holds its share of the weight and bias gradients (DDP sums them).
    weight_grad, bias_grad = synced.weight.grad.clone(), synced.bias.grad.clone()
    dist.all_reduce(weight_grad)
    dist.all_reduce(bias_grad)
    errors = dict(
        output=relative_error(outputs, expected[mine]),
        input_grad=relative_error(inputs.grad, everything.grad[mine]),
        running_mean=relative_error(synced.running_mean, reference.running_mean),
        running_var=relative_error(synced.running_var, reference.running_var),
        weight_grad=relative_error(weight_grad, reference.weight.grad),
        bias_grad=relative_error(bias_grad, reference.bias.grad),
    )
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(errors))


def nccl_one_rank(rank, folder):
    total = torch.tensor([3.0], device=CUDA)
    dist.all_reduce(total)
    dist.barrier()
    result = {"all_reduce": total.item(), "backend": dist.get_backend()}
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))


def rank_main(mode, backend, folder, rank, world_size):
    torch.cuda.set_device(0)  # every rank on the one GPU
    dist.init_process_group(
        backend,
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world_size,
        device_id=torch.device("cuda", 0)
        if backend == "nccl"
        else None,  # NCCL: set up the communicator now, not later
    )
    try:
        {"syncbn": syncbn_rank, "nccl-one-rank": nccl_one_rank}[mode](rank, folder)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, backend, folder, rank, world_size = sys.argv[1:]
    rank_main(mode, backend, folder, int(rank), int(world_size))
