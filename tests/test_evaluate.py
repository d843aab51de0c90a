"""evaluate.py: sliding windows, scales and flips, metrics, distributed sums, pictures, command line."""

import fcntl
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

import checkpoints
import data
import evaluate
import layouts
import pictures
import recipe
import runtime
import train
from model import GCNet

REPO = Path(__file__).resolve().parents[1]

# ---- stand-in models ------------------------------------------------------------------------


class PixelModel(nn.Module):
    """A 1x1 conv: logits at the input size, flip-equivariant. Its 'attention' is a softmax over the
    positions of a 1/8-resolution map, as the GC block's. As GCNet's, its logits come at any size without
    upsampling (here: the input's), and upsample() brings them to the input's."""

    def __init__(self, num_classes=3, align_corners=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes
        self.align_corners = align_corners

    def upsample(self, logits, size):
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, x, return_attention=False, upsample=True):
        logits = self.conv(x)
        if not return_attention:
            return logits
        pooled = F.avg_pool2d(x.mean(1, keepdim=True), 8, ceil_mode=True)  # (N, 1, h/8, w/8)
        attention = pooled.flatten(1).softmax(dim=1).view_as(pooled)
        return logits, attention


class RampModel(PixelModel):
    """PixelModel plus a left-to-right ramp on class 0: NOT flip-equivariant."""

    def forward(self, x, return_attention=False, upsample=True):
        ramp = torch.linspace(0, 3, x.shape[-1]).view(1, 1, 1, -1)
        bias = torch.cat([ramp, torch.zeros(1, self.num_classes - 1, 1, x.shape[-1])], dim=1)
        return self.conv(x) + bias


class RecordingModel(nn.Module):
    """Logits = the input's first channel times the input height; records the input shapes."""

    num_classes = 1
    align_corners = False

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x[:, :1] * x.shape[-2]


class WindowMeanModel(nn.Module):
    """Every output pixel is the mean of its window: overlapping windows disagree."""

    num_classes = 1
    align_corners = False

    def forward(self, x):
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, -1, *x.shape[-2:])


# ---- sliding windows (mmseg v0.5.0 encoder_decoder.py slide_inference) -----------------------


def test_slide_windows_of_the_769_models_are_the_original_2x4_grid():
    boxes = evaluate.slide_windows(1025, 2049, 769, 513)
    assert len(boxes) == 8
    assert sorted({(y1, y2) for y1, y2, _, _ in boxes}) == [(0, 769), (256, 1025)]
    assert sorted({(x1, x2) for _, _, x1, x2 in boxes}) == [(0, 769), (513, 1282), (1026, 1795), (1280, 2049)]


@pytest.mark.parametrize("height, width", [(1, 1), (37, 53), (64, 64), (65, 129), (100, 31), (769, 770)])
def test_slide_windows_cover_every_pixel_and_stay_inside(height, width):
    crop, stride = (33, 40), (21, 27)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for y1, y2, x1, x2 in evaluate.slide_windows(height, width, crop, stride):
        assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
        assert (y2 - y1, x2 - x1) == (min(crop[0], height), min(crop[1], width))
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1


def test_slide_inference_places_windows_and_averages_overlaps_on_odd_sizes():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 45, 71)
    identity = RecordingModel()
    out = evaluate.slide_inference(identity, images, crop_size=(17, 23), stride=(11, 13), window_batch=3)
    assert torch.allclose(out, images[:, :1] * 17)  # each window put back where it came from
    # Windows that disagree: the hand-computed average of a 1x5 row, crop 3, stride 2.
    row = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    averaged = evaluate.slide_inference(WindowMeanModel(), row, crop_size=(1, 3), stride=(1, 2))
    # windows [0,3) mean 1 and [2,5) mean 3; pixel 2 is covered by both
    assert averaged.flatten().tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]


def test_slide_inference_results_do_not_depend_on_window_batch():
    torch.manual_seed(0)
    model = PixelModel(4).eval()
    images = torch.randn(1, 3, 50, 90)
    outs = [
        evaluate.slide_inference(model, images, crop_size=32, stride=21, window_batch=b) for b in (1, 4, 100)
    ]
    assert torch.allclose(outs[0], outs[1], atol=1e-6) and torch.allclose(outs[0], outs[2], atol=1e-6)


def test_windows_smaller_than_the_crop_are_zero_padded_as_in_v050():
    # 20 rows < crop 33: the window is padded to 33x33 at the bottom/right, the output cropped back.
    images = torch.rand(1, 3, 20, 50) + 1
    model = RecordingModel()
    out = evaluate.slide_inference(model, images, crop_size=33, stride=22, window_batch=1)
    assert all(shape[-2:] == (33, 33) for shape in model.shapes)  # the model always saw full crops
    assert out.shape == (1, 1, 20, 50)
    assert torch.allclose(out, images[:, :1] * 33)  # output = crop of the padded window's output


# ---- scales and flips (mmseg v0.5.0 encoder_decoder.py aug_test) ------------------------------


def resized_softmax(model, image, size, align_corners=False):
    """The original's one pass: logits resized to `size`, softmax over the classes; (C, H, W)."""
    logits = F.interpolate(model(image[None]), size=size, mode="bilinear", align_corners=align_corners)
    return logits.softmax(1)[0]


def test_single_scale_is_softmax_of_logits_resized_to_the_original_size():
    model = PixelModel(3, align_corners=True).eval()
    image = torch.randn(3, 40, 56)
    probabilities = evaluate.predict(model, [image], (30, 41))
    assert probabilities.shape == (3, 30, 41)
    assert torch.allclose(
        probabilities, resized_softmax(model, image, (30, 41), align_corners=True), atol=1e-6
    )


def test_class_softmax_of_channels_last_logits_equals_the_dim_1_softmax():
    logits = torch.randn(2, 5, 7, 9)
    expected = logits.softmax(dim=1)
    channels_last = evaluate.class_softmax_(logits.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, expected)
    assert channels_last.stride(1) == 1  # stays channels_last, where the argmax over classes is fast
    assert torch.equal(evaluate.class_softmax_(logits), expected)


def test_multi_scale_averages_probabilities_at_the_original_size():
    model = PixelModel(3).eval()
    images = [torch.randn(3, 20, 28), torch.randn(3, 40, 56)]
    probabilities = evaluate.predict(model, images, (30, 42))
    per_scale = [resized_softmax(model, image, (30, 42)) for image in images]
    assert torch.allclose(probabilities, (per_scale[0] + per_scale[1]) / 2, atol=1e-6)
    assert torch.allclose(probabilities.sum(0), torch.ones(30, 42), atol=1e-5)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_changes_nothing_for_a_flip_equivariant_model(mode):
    model = PixelModel(3).eval()
    image = torch.randn(3, 37, 61)
    kwargs = dict(mode=mode, crop_size=25, stride=17)
    plain = evaluate.predict(model, [image], (37, 61), flip=False, **kwargs)
    flipped = evaluate.predict(model, [image], (37, 61), flip=True, **kwargs)
    assert torch.allclose(plain, flipped, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_multi_scale_flip_sums_each_passes_softmax_bit_for_bit(layout, randomize):
    # predict holds one map of the original size beside the sum (a softmax in place, the flipped map
    # added back in bands of rows): the sum is still that of each pass's softmax, to the last bit.
    net = randomize(GCNet(150, align_corners=True)).eval().to(memory_format=layout)
    images = [torch.randn(1, 3, *size).contiguous(memory_format=layout) for size in ((41, 57), (97, 131))]
    expected = 0
    with torch.no_grad():
        for image in images:
            logits = net(torch.cat([image, image.flip(-1)]))  # the flipped copy shares the forward pass
            resized = F.interpolate(logits, size=(70, 95), mode="bilinear", align_corners=True)
            for k, one in enumerate(resized.split(1)):
                if layout == torch.channels_last:  # the classes innermost in memory: a softmax over them
                    softmax = one.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)[0]
                else:
                    softmax = one.softmax(1)[0]
                expected = expected + (softmax.flip(-1) if k else softmax)
        probabilities = evaluate.predict(net, images, (70, 95), flip=True)
    assert torch.equal(probabilities, expected / 4)


def test_flipped_predictions_are_flipped_back():
    model = RampModel(3).eval()
    image = torch.randn(3, 16, 24)
    probabilities = evaluate.predict(model, [image], (16, 24), flip=True)
    plain = model(image[None]).softmax(1)[0]
    flipped_back = model(image[None].flip(-1)).softmax(1)[0].flip(-1)
    assert torch.allclose(probabilities, (plain + flipped_back) / 2, atol=1e-6)
    assert not torch.allclose(probabilities, (plain + model(image[None].flip(-1)).softmax(1)[0]) / 2)


# ---- metrics (mmseg v0.5.0 mmseg/core/evaluation/mean_iou.py) ---------------------------------


def test_metrics_by_hand_with_ignored_and_absent_classes():
    label = torch.tensor([[0, 0, 1, 1], [255, 1, 0, 255]])
    pred = torch.tensor([[0, 1, 1, 3], [2, 1, 0, 3]])
    matrix = evaluate.confusion_matrix(pred, label, 4)
    # rows = ground truth, columns = prediction; the two ignored pixels count nowhere
    assert matrix.tolist() == [[2, 1, 0, 0], [0, 2, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert matrix.dtype == torch.int64
    metrics = evaluate.metrics_from_confusion(matrix)
    # class 2: predicted only where ignored -> union 0 -> NaN, skipped; class 3: predicted, absent
    # from the ground truth -> IoU 0, counted; Acc NaN for both.
    assert metrics["IoU"][:2] == pytest.approx([200 / 3, 50])
    assert math.isnan(metrics["IoU"][2]) and metrics["IoU"][3] == 0
    assert metrics["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)
    assert metrics["Acc"][:2] == pytest.approx([200 / 3, 200 / 3])
    assert math.isnan(metrics["Acc"][2]) and math.isnan(metrics["Acc"][3])
    assert metrics["mAcc"] == pytest.approx(200 / 3)
    assert metrics["aAcc"] == pytest.approx(100 * 4 / 6)
    # F1 = 2I / (GT + P): road 4/5, car 4/6; sky NaN like its IoU; bus 0 (predicted once on a labelled
    # pixel, never there: the prediction on the ignored pixel counts nowhere).
    assert metrics["F1"][:2] == pytest.approx([80, 400 / 6])
    assert math.isnan(metrics["F1"][2]) and metrics["F1"][3] == 0
    assert metrics["mF1"] == pytest.approx(100 * (4 / 5 + 4 / 6 + 0) / 3)
    # precision = I / P: road 2/2, car 2/3, sky never predicted on a labelled pixel (NaN), bus 0/1
    assert metrics["Precision"][:2] == pytest.approx([100, 200 / 3])
    assert math.isnan(metrics["Precision"][2]) and metrics["Precision"][3] == 0
    assert metrics["mPrecision"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert metrics["Recall"] == pytest.approx(metrics["Acc"], nan_ok=True)
    assert metrics["mRecall"] == metrics["mAcc"]
    # Dice is the harmonic mean of precision and recall where both are defined
    harmonic = 2 / (100 / metrics["Precision"][1] + 100 / metrics["Recall"][1])
    assert metrics["F1"][1] == pytest.approx(100 * harmonic)
    table = evaluate.format_table(metrics, ["road", "car", "sky", "bus"]).splitlines()
    assert table[0].split() == ["class", "IoU", "Acc/Rec", "F1", "Prec"]
    assert table[2].split() == ["car", "50.00", "66.67", "66.67", "66.67"]
    assert table[3].split() == ["sky", "nan", "nan", "nan", "nan"]
    for mean in ("mIoU 38.89", "mF1 48.89", "mPrecision 55.56", "mRecall 66.67"):
        assert mean in table[-1]


def test_confusion_matrices_add_up_over_images_and_reject_bad_labels():
    torch.manual_seed(0)
    label, pred = torch.randint(0, 5, (2, 30, 40)), torch.randint(0, 5, (2, 30, 40))
    label[0, :3] = 255
    total = evaluate.confusion_matrix(pred.flatten(), label.flatten(), 5)
    per_image = sum(evaluate.confusion_matrix(p, t, 5) for p, t in zip(pred, label))
    assert torch.equal(total, per_image) and total.sum() == 2 * 30 * 40 - 3 * 40
    with pytest.raises(ValueError, match="0..4"):
        evaluate.confusion_matrix(pred[0], torch.full((30, 40), 7), 5)


# ---- a whole split: fake dataset, distributed sums, pictures ----------------------------------


class FakeValSet(torch.utils.data.Dataset):
    """Val items as data.build_dataset gives them: images per ratio, label at the original size."""

    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    scale = (80, 56)  # (W, H); used only when no ratio is 1.0
    classes = ["red", "green", "blue"]
    num_classes = 3
    name = "fake"

    def __init__(self, folder, count=5, size=(37, 53), ratios=(1.0,), log=None):
        self.folder, self.count, self.size = Path(folder), count, size
        self.test_ratios = ratios
        self.log = log  # a file that records which indices were read

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if self.log is not None:
            with open(self.log, "a") as file:
                file.write(f"{index}\n")
        generator = torch.Generator().manual_seed(index)
        height, width = self.size
        path = self.folder / f"image_{index}.png"
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        if not path.exists():
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        label = torch.randint(0, 3, (height, width), generator=generator)
        label[:2] = 255
        images = []
        for ratio in self.test_ratios:  # a stand-in for data.test_transform, 1.5 x the original size
            size = (int(1.5 * height * ratio), int(1.5 * width * ratio))
            images.append(F.interpolate(image[None].float() / 64 - 2, size=size, mode="bilinear")[0])
        return images, label, dict(name=f"image_{index}", image_path=str(path), original_size=(height, width))


# evaluate_dataset's keywords in these tests: one whole-image pass per image (predict's defaults)
EVALUATION = dict(device="cpu", precision="fp32", workers=0)


def distributed_worker(rank, world_size, port, folder):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    dataset = FakeValSet(folder, log=Path(folder) / f"rank_{rank}.txt")
    results = evaluate.evaluate_dataset(PixelModel(3).eval(), dataset, **EVALUATION)
    (Path(folder) / f"results_{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def test_distributed_evaluation_sums_disjoint_shares(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Forked, not spawned: two ranks of this process, without two fresh imports of torch and of this
    # file (2 to 3 s). Each rank sets one thread before any torch work, as a DataLoader worker does,
    # so the OpenMP pool left behind in the parent is never needed.
    mp.start_processes(
        distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    single = evaluate.evaluate_dataset(PixelModel(3).eval(), FakeValSet(tmp_path), **EVALUATION)
    seen = [set(map(int, (tmp_path / f"rank_{r}.txt").read_text().split())) for r in range(2)]
    assert seen == [{0, 2, 4}, {1, 3}]  # disjoint shares, rank::world_size
    for rank in range(2):
        results = json.loads((tmp_path / f"results_{rank}.json").read_text())
        assert results["confusion_matrix"] == single["confusion_matrix"]  # every rank gets the sum
        assert results["num_images"] == 5 and results["mIoU"] == pytest.approx(single["mIoU"])
        assert results["loss"] == pytest.approx(single["loss"])


def test_the_validation_loss_is_the_training_loss_over_the_split(tmp_path):
    dataset, model = FakeValSet(tmp_path, count=3), PixelModel(3).eval()
    results = evaluate.evaluate_dataset(model, dataset, **EVALUATION)
    losses = []  # each image: the model's logits resized to the label, train.segmentation_loss
    for images, label, meta in (dataset[index] for index in range(3)):
        logits = F.interpolate(model(images[0][None]), size=meta["original_size"], mode="bilinear")
        losses.append(train.segmentation_loss(logits, label[None]).item())
    assert results["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)  # images of one size: their mean
    # A probability that underflowed float32 costs as much as the smallest normal one: no inf, no NaN.
    probabilities = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (C=2, 1, 2): pixel 1 is wrong and certain
    summed, pixels = evaluate.summed_pixel_losses(probabilities, torch.tensor([[0, 0]])).tolist()
    assert pixels == 2 and summed == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))


def test_precision_agreement_runs_fp32_on_the_reference_model(tmp_path):
    dataset, options = FakeValSet(tmp_path, count=3), dict(EVALUATION, precision="bf16")
    model = PixelModel(3, seed=0).train()
    same = evaluate.precision_agreement(model, model, dataset, 3, **options)
    assert model.training  # mode restored
    labelled = sum(int((dataset[i][1] != 255).sum()) for i in range(3))
    assert same["images"] == 3 and same["pixels"] == labelled and same["agreement"] > 0.95
    other = evaluate.precision_agreement(model, PixelModel(3, seed=1), dataset, 3, **options)
    assert other["agreement"] < 0.8  # another model in the fp32 pass: the check sees the difference


def test_evaluate_dataset_writes_pictures_at_the_original_size(tmp_path):
    dataset = FakeValSet(tmp_path, count=2, ratios=(0.5, 1.0))
    model = PixelModel(3).train()
    results = evaluate.evaluate_dataset(model, dataset, save_dir=tmp_path / "pictures", **EVALUATION)
    assert model.training  # mode restored
    assert results["num_images"] == 2 and sum(map(sum, results["confusion_matrix"])) == 2 * 35 * 53
    image, label, meta = dataset[1]
    prediction = evaluate.predict(model.eval(), image, meta["original_size"]).argmax(0)
    labels = Image.open(tmp_path / "pictures" / "image_1_pred.png")
    assert labels.mode == "P" and labels.size == (53, 37)
    assert labels.getpalette()[:9] == [255, 0, 0, 0, 255, 0, 0, 0, 255]
    assert torch.equal(torch.from_numpy(np.array(labels)).long(), prediction)
    for suffix in ("overlay.jpg", "attention.png"):
        picture = Image.open(tmp_path / "pictures" / f"image_1_{suffix}")
        assert picture.mode == "RGB" and picture.size == (53, 37)


def test_empty_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        evaluate.evaluate_dataset(PixelModel(3), FakeValSet(tmp_path, count=0), **EVALUATION)


# ---- the real GCNet at a tiny size ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gcnet():
    torch.manual_seed(0)
    return GCNet(num_classes=3, depth=50, align_corners=True).eval()


def test_real_gcnet_slide_ms_flip_and_attention(tiny_gcnet):
    torch.manual_seed(0)
    images = [torch.randn(3, 49, 73), torch.randn(3, 65, 97)]
    protocol = dict(mode="slide", crop_size=65, stride=43, flip=True, window_batch=4)
    probabilities = evaluate.predict(tiny_gcnet, images, (60, 90), **protocol)
    assert probabilities.shape == (3, 60, 90)
    assert torch.allclose(probabilities.sum(0), torch.ones(60, 90), atol=1e-5)
    attention, title = pictures.attention_map(tiny_gcnet, images[1], (60, 90))
    assert attention.shape == (60, 90) and attention.min() == 0 and attention.max() == 1
    assert title == "GC attention (red: more weight)"


def test_folded_batchnorm_gives_the_same_logits_without_batchnorm(randomize):
    net = randomize(GCNet(19), seed=5).eval()
    batchnorms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    folded = evaluate.fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)] == batchnorms  # untouched
    conv = folded.backbone.layer1[0].conv1
    bn = net.backbone.layer1[0].bn1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(conv.weight, net.backbone.layer1[0].conv1.weight * scale[:, None, None, None])
    torch.testing.assert_close(conv.bias, bn.bias - bn.running_mean * scale)
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        reference, logits = net(x), folded(x)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert folded.num_classes == 19 and folded.depth == 50 and not folded.training


# ---- the settings: the checkpoint's row or recipe, the flags over it ----------------------------


def official_info(crop_size, align_corners, dataset="cityscapes"):
    """checkpoint_info's answer for an official checkpoint of the table's row with this crop."""
    info = dict(crop_size=crop_size, align_corners=align_corners, recipe=None, dataset=None, row=None)
    info.update(depth=50, num_classes=19, classes=None, palette=None)
    if crop_size is not None:
        info.update(dataset=dataset, row=recipe.row(dataset, crop_size))
    return info


def settings_of(flags, info):
    return evaluate.resolve_settings(evaluate.build_parser().parse_args(flags), info, torch.device("cpu"))


def test_settings_follow_the_checkpoint_row_and_flags_override():
    info = official_info((769, 769), True)
    row_769 = settings_of(["--ms-flip"], info)
    protocol = [row_769[key] for key in ("mode", "crop_size", "stride", "ratios", "flip", "align_corners")]
    assert protocol == ["slide", (769, 769), (513, 513), evaluate.MS_RATIOS, True, True]
    assert row_769["scale"] == (2049, 1025)  # the 769 models are tested on 2049x1025
    row_512 = settings_of([], official_info((512, 1024), False))
    assert (row_512["mode"], row_512["ratios"], row_512["flip"]) == ("whole", (1.0,), False)
    unknown = settings_of(["--crop", "769"], official_info(None, None))
    assert (unknown["mode"], unknown["stride"], unknown["align_corners"]) == ("slide", (513, 513), True)
    # A crop of the table takes its row's protocol; another is the window size of a sliding test.
    assert settings_of(["--crop", "512x1024"], info)["mode"] == "whole"
    window = settings_of(["--crop", "640"], info)
    assert (window["mode"], window["crop_size"], window["stride"], window["align_corners"]) == (
        "slide",
        (640, 640),
        (427, 427),
        True,
    )
    custom = settings_of(["--ms-flip", "--no-flip", "--scales", "1", "2", "--mode", "whole"], info)
    assert (custom["mode"], custom["ratios"], custom["flip"]) == ("whole", (1.0, 2.0), False)


def test_our_checkpoints_are_tested_with_their_recorded_recipe():
    recorded = dict(dataset="folder", crop_size=[65, 65], test_mode="slide", test_crop=[65, 65])
    recorded.update(test_stride=[40, 40], align_corners=True, scale=[300, 100])
    row = {**recipe.row("folder", 65), **recorded}
    info = dict(official_info((65, 65), True), recipe=recorded, dataset="folder", row=row)
    settings = settings_of([], info)
    assert (settings["mode"], settings["crop_size"], settings["stride"]) == ("slide", (65, 65), (40, 40))
    assert settings["scale"] == (300, 100) and settings["align_corners"] is True
    info["row"]["scale"] = [10000, 2500]  # recorded by train.py --scale 2500: sides past --crop's 8192
    assert settings_of([], info)["scale"] == (10000, 2500)
    info["row"]["scale"] = [300, 100]
    assert settings_of(["--stride", "30x20"], info)["stride"] == (30, 20)
    recorded["reduce_zero_label"] = True  # trained with label 0 = ignore: scored the same way
    assert settings_of([], info)["reduce_zero_label"] is True
    assert settings_of(["--dataset", "toy"], info)["reduce_zero_label"] is None  # toy's own rule
    # Trained without the flag (recorded False): the dataset's own rule, as in training (ADE20K's True,
    # or classes.txt's `label0: ignore`), not an explicit False.
    recorded["reduce_zero_label"] = False
    assert settings_of([], info)["reduce_zero_label"] is None


def test_official_checkpoints_are_scored_in_fp32_by_default():
    parse, info = evaluate.build_parser().parse_args, official_info((512, 1024), False)
    args = parse([])
    settings = evaluate.resolve_settings(args, info, torch.device("cpu"))
    assert settings["precision"] == "fp32" and settings["check_agreement"] == 0
    assert settings["fold_batchnorm"] is False  # a speed setting: fp32 keeps the original's BatchNorm
    assert vars(args) == vars(parse([]))  # the flags are read, never rewritten
    settings = settings_of(["--precision", "bf16"], info)
    assert settings["precision"] == "bf16" and settings["channels_last"] is True
    assert settings["check_agreement"] == 10 and settings["fold_batchnorm"] is True


def test_a_crop_given_for_a_checkpoint_whose_crop_was_guessed_takes_its_rows_scale():
    # A renamed official file without meta: 19 classes say Cityscapes, its crop is unknown, so the row
    # was the dataset's first (512x1024, scale 2048x1024); --crop 769 names the row, scale 2049x1025.
    info = dict(official_info(None, None), dataset="cityscapes", row=recipe.row("cityscapes"))
    settings = settings_of(["--crop", "769"], info)
    assert settings["scale"] == (2049, 1025) and (settings["mode"], settings["align_corners"]) == (
        "slide",
        True,
    )
    assert settings_of(["--crop", "769"], official_info((512, 1024), False))["scale"] == (2048, 1024)  # named
    with pytest.raises(SystemExit):  # a typo, which --image took for a dataset without names or colours
        evaluate.build_parser().parse_args(["--dataset", "cityscape"])


def test_an_explicit_zero_is_not_unset():
    args = evaluate.build_parser().parse_args(["--check-agreement", "0", "--workers", "0", "--opacity", "0"])
    settings = evaluate.resolve_settings(args, official_info((512, 1024), False), torch.device("cpu"))
    assert settings["check_agreement"] == 0 and settings["workers"] == 0 and args.opacity == 0


def test_stride_larger_than_the_window_is_refused():
    with pytest.raises(ValueError, match="--stride"):
        settings_of(["--mode", "slide", "--crop", "33", "--stride", "40"], official_info((769, 769), True))


def test_the_settings_that_differ_from_trainings_validation_are_named():
    config = dict(
        dataset="toy", data_root=None, test_mode="whole", test_crop=[128, 128], test_stride=[86, 86]
    )
    config.update(scale=[256, 128], precision="bf16", fold_batchnorm=True, channels_last=True, device="cpu")
    validation = checkpoints.validation_settings(config)
    assert tuple(validation) == checkpoints.VALIDATION_KEYS  # what training_differences compares
    settings = dict(mode="whole", crop_size=(128, 128), stride=(86, 86), scale=(256, 128), ratios=(1.0,))
    settings.update(flip=False, precision="bf16", fold_batchnorm=True, channels_last=True)
    toy, cpu = types.SimpleNamespace(name="toy", root="data/toy"), torch.device("cpu")
    assert evaluate.training_differences(validation, settings, toy, cpu) == []
    other = dict(settings, precision="fp32", fold_batchnorm=False, ratios=evaluate.MS_RATIOS, flip=True)
    assert evaluate.training_differences(validation, other, toy, cpu) == [
        "ratios [1.0] in training, [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] here",
        "flip False in training, True here",
        "precision bf16 in training, fp32 here",
        "BatchNorm folded True in training, False here",
    ]
    assert evaluate.training_differences(None, settings, toy, cpu) is None  # nothing recorded


# ---- every flag is checked when it is parsed --------------------------------------------------


def must_not_run(*args, **kwargs):
    raise AssertionError("the evaluation ran before the flags were checked")


NUMBER, SIZE = r"a number in \[0.01, 4\]", "sizes from 1 to 8192"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scales", "0"], f"argument --scales: expected .*{NUMBER}"),
        (["--scales", "1", "-1"], f"argument --scales: expected .*{NUMBER}"),
        (["--scales", "inf"], f"argument --scales: expected .*{NUMBER}"),
        (["--scales", "nan"], f"argument --scales: expected .*{NUMBER}"),
        (["--scales", "0.0001"], f"argument --scales: expected .*{NUMBER}"),
        (["--scales", "1e6"], f"argument --scales: expected .*{NUMBER}"),
        (["--mode", "slide", "--crop", "0"], f"argument --crop: expected .*{SIZE}"),
        (["--mode", "slide", "--stride", "0"], f"argument --stride: expected .*{SIZE}"),
        (["--stride", "-3"], f"argument --stride: expected .*{SIZE}"),
        (["--stride", "5x0"], f"argument --stride: expected .*{SIZE}"),
        (["--crop", "51200"], f"argument --crop: expected .*{SIZE}"),
        (["--window-batch", "0"], "argument --window-batch: expected .*an integer >= 1"),
        (["--workers", "-1"], "argument --workers: expected .*an integer in \\[0, "),
        (["--workers", "two"], "argument --workers: expected .*an integer in \\[0, "),
        (["--workers", "100000"], "argument --workers: expected .*at most 4 per core"),
        (["--threads", "9" * 23], "argument --threads: expected .*at most 4 per core"),
        (["--save-dir", ""], "argument --save-dir: an empty path; pass a folder name"),
        (["--checkpoint", " "], r"argument --checkpoint: an empty path \(an unset variable\?\)"),
        (["--ms-fl"], "unrecognized arguments: --ms-fl"),  # not guessed to be --ms-flip
        (["--opacity", "1.5"], r"argument --opacity: expected .*a number in \[0, 1\]"),
        (["--opacity", "nan"], r"argument --opacity: expected .*a number in \[0, 1\]"),
        (["--check-agreement", "-2"], "argument --check-agreement: expected .*an integer >= 0"),
        (["--out", "."], "argument --out: .* is a directory"),
        (["--out", "a_file.txt/results.json"], "argument --out: .* is a file, not a folder"),
        (["--save-dir", "a_file.txt"], "argument --save-dir: .* is a file"),
        (["--out", "r.json"], "argument --out: .* is not writable"),  # a read-only place, as root too
        (["--split", "test"], "--split test has no labels to score: add --format-only"),
        (["--format-only", "--image", "x.jpg"], "--image predicts files: pass one of them"),
        (
            ["--format-only", "--out", "r.json"],
            "--out is where a split's scores go; --format-only and --image",
        ),
        (["--image", "x.jpg", "--out", "r.json"], "--out is where a split's scores go"),
        (["--checkpoint", "nothing.pth"], "checkpoint not found: nothing.pth"),
        ([], r"no checkpoint found: looked for work_dirs/\*/best.pth"),
    ],
)
def test_bad_flags_end_the_run_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoints, "read_checkpoint", must_not_run)
    (tmp_path / "a_file.txt").write_text("x")
    if "writable" in message:
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--device", "cpu", *flags])
    printed = f"{stop.value} {capsys.readouterr().err}"
    assert re.search(message, printed) and "argument --split" not in printed
    assert stop.value.code == 2 or not message.startswith("argument")  # argparse's exit status


def test_help_gives_every_default():
    text = " ".join(evaluate.build_parser().format_help().split())
    assert "sliding windows per pass (default 4)" in text and "loader processes (default: 4, at most" in text
    text = " ".join(train.build_parser().format_help().split())
    defaults = ("default: toy, the demo", "ResNet depth (default 50)", "--seed SEED default 0", "128 toy")
    for words in (*defaults, "at most the cores per process on a CPU"):
        assert words in text, words


# ---- the command line on checkpoints of train.py --------------------------------------------


def run(checkpoint, *flags):
    """evaluate.py's command line on the CPU, its loader in this process."""
    evaluate.main(["--device", "cpu", "--workers", "0", "--checkpoint", str(checkpoint), *map(str, flags)])


def write_server_files(checkpoint, root, out, scale):
    """--format-only on the test split, at a test scale small enough for a CPU."""
    run(
        checkpoint,
        "--data-root",
        root,
        "--split",
        "test",
        "--format-only",
        "--save-dir",
        out,
        "--scales",
        scale,
    )


def saved_run(path, num_classes, recorded, classes, palette):
    """A random GCNet saved as train.py saves a run: its recipe, classes and palette."""
    torch.manual_seed(0)
    meta = dict(CLASSES=classes, PALETTE=palette)
    torch.save(dict(state_dict=GCNet(num_classes).state_dict(), recipe=recorded, meta=meta), path)
    return path


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A 5-class toy run (an older one: its recipe lacks the test scale, which the row gives)."""
    recorded = dict(dataset="toy", crop_size=[128, 128], align_corners=False, test_mode="whole")
    recorded.update(test_crop=[128, 128], test_stride=[86, 86], config_name="gcnet_r50-d8_128x128_300it_toy")
    path = tmp_path_factory.mktemp("checkpoint") / "best.pth"
    return saved_run(path, 5, recorded, data.TOY_CLASSES, data.TOY_PALETTE)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 3-class folder run tested at 48x32: fast pictures."""
    recorded = dict(dataset="folder", crop_size=[32, 32], align_corners=False, test_mode="whole")
    recorded.update(test_crop=[32, 32], test_stride=[22, 22], scale=[48, 32], config_name="tiny")
    path = tmp_path_factory.mktemp("tiny") / "best.pth"
    return saved_run(path, 3, recorded, ["sky", "road", "car"], [[0, 0, 255], [128, 128, 128], [255, 0, 0]])


def write_folder_dataset(root, class_lines, count=1, size=(8, 8)):
    """ROOT/images/val, ROOT/labels/val and ROOT/classes.txt, the layout of data.py's folder dataset."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        image = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator)
        label = torch.randint(0, len(class_lines), size, dtype=torch.uint8, generator=generator)
        label[0] = 255
        Image.fromarray(image.numpy()).save(root / "images" / "val" / f"{index}.png")
        Image.fromarray(label.numpy()).save(root / "labels" / "val" / f"{index}.png")
    (root / "classes.txt").write_text("\n".join(class_lines))


def test_newest_best_checkpoint_is_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for index, run_name in enumerate(["b_run", "a_run"]):
        (tmp_path / "work_dirs" / run_name).mkdir(parents=True)
        (tmp_path / "work_dirs" / run_name / "best.pth").write_bytes(b"")
        os.utime(tmp_path / "work_dirs" / run_name / "best.pth", (1000 + index, 1000 + index))
    assert checkpoints.find_checkpoint(None) == str(Path("work_dirs/a_run/best.pth"))


def test_command_line_evaluates_a_split_and_writes_json(tmp_path, toy_checkpoint, capsys):
    # Two 32x64 images in the toy dataset's (Cityscapes) layout: the network sees them at the toy
    # test scale, 128x256; the metrics count the labels at 32x64.
    root = tmp_path / "toy"
    for folder in ("leftImg8bit/val/x", "gtFine/val/x"):
        (root / folder).mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        image = torch.randint(0, 256, (32, 64, 3), dtype=torch.uint8, generator=generator)
        label = torch.randint(0, 5, (32, 64), dtype=torch.uint8, generator=generator)
        label[:4] = 255
        Image.fromarray(image.numpy()).save(root / "leftImg8bit/val/x" / f"{name}_leftImg8bit.png")
        Image.fromarray(label.numpy()).save(root / "gtFine/val/x" / f"{name}_gtFine_labelTrainIds.png")
    out = tmp_path / "results.json"
    run(toy_checkpoint, "--data-root", root, "--out", out)
    printed = capsys.readouterr().out
    assert "diamond" in printed and f"wrote {out}" in printed
    record = json.loads(out.read_text())
    assert record["dataset"] == "toy" and record["num_images"] == 2
    assert record["settings"]["mode"] == "whole" and record["settings"]["ratios"] == [1.0]
    assert sum(map(sum, record["confusion_matrix"])) == 2 * 28 * 64  # original resolution, 255 left out
    assert list(record["per_class"]) == data.TOY_CLASSES
    iou = [entry["IoU"] for entry in record["per_class"].values() if entry["IoU"] is not None]
    assert record["mIoU"] == pytest.approx(sum(iou) / len(iou))


def split_of(checkpoint, info, *flags):
    """The split evaluate.py's jobs would take for the checkpoint (build_split), without its model."""
    return evaluate.build_split(info, settings_of([*map(str, flags)], info), checkpoint)


def test_checkpoint_and_dataset_classes_must_agree(tmp_path, toy_checkpoint):
    info = checkpoints.checkpoint_info(toy_checkpoint)
    other_count, other_names = ["sky", "road", "car"], ["sky", "disc", "square", "diamond", "bar"]
    for classes, message in [
        (other_count, "predicts 5 classes but the folder dataset has 3"),
        (other_names, "class 0 is 'background' in the checkpoint, 'sky' in the dataset"),
    ]:
        root = tmp_path / f"{len(classes)}_classes"
        write_folder_dataset(root, classes)
        with pytest.raises(ValueError, match=message):
            split_of(toy_checkpoint, info, "--dataset", "folder", "--data-root", root)
    # Names in the meta that are fewer than its classes (before: a StopIteration traceback) are not its
    # classes' names: it is taken at its class count, as one that names none.
    root = tmp_path / "toy_names"
    write_folder_dataset(root, data.TOY_CLASSES)
    short = dict(info, classes=data.TOY_CLASSES[:2])
    assert (
        split_of(toy_checkpoint, short, "--dataset", "folder", "--data-root", root).classes
        == data.TOY_CLASSES
    )


def test_evaluate_reads_the_data_where_the_run_did_and_names_the_flag_when_it_is_not_there(
    tmp_path, tiny_checkpoint
):
    info = checkpoints.checkpoint_info(tiny_checkpoint)
    info["recipe"]["data_root"] = str(tmp_path / "gone")
    for flags, root, whose in [
        ([], tmp_path / "gone", "recorded by the checkpoint's run"),
        (["--data-root", "elsewhere"], "elsewhere", "given by --data-root"),
    ]:
        with pytest.raises(FileNotFoundError) as stop:
            split_of(tiny_checkpoint, info, *flags)
        looked = f"holds a folder model; this looked for folder in {root}, {whose}: pass --data-root"
        assert looked in str(stop.value)
    # --dataset another: the model is still named as the checkpoint's own.
    with pytest.raises(
        FileNotFoundError, match=r"holds a folder model; this looked for cityscapes in \S*nowhere"
    ):
        split_of(tiny_checkpoint, info, "--dataset", "cityscapes", "--data-root", str(tmp_path / "nowhere"))


def test_the_precision_check_runs_at_a_single_scale_with_a_progress_bar(
    tmp_path, tiny_checkpoint, capsys, monkeypatch
):
    write_folder_dataset(tmp_path / "mine", ["sky", "road", "car"], count=2)
    seen, real = [], evaluate.precision_agreement

    def spy(model, reference_model, dataset, count, **options):
        seen.append((dataset.test_ratios, options["flip"]))
        return real(model, reference_model, dataset, count, **options)

    monkeypatch.setattr(evaluate, "precision_agreement", spy)
    # Both images: by default the check stops when a fifth of the evaluation's time is spent.
    out, protocol = (
        tmp_path / "r.json",
        ["--precision", "bf16", "--scales", 0.5, 1, "--flip", "--check-agreement", 2],
    )
    run(tiny_checkpoint, "--data-root", tmp_path / "mine", "--out", out, *protocol)
    assert seen == [((1.0,), False)]  # the protocol's scales and flips are for the scores only
    printed = capsys.readouterr()
    assert (
        "bf16 vs fp32 check: 100%" in printed.err
        and "bf16 with BatchNorm folded vs fp32 at a single scale, 2 images:" in printed.out
    )
    assert json.loads(out.read_text())["settings"]["ratios"] == [0.5, 1.0]
    # In fp32 the check is off by default; asked for, it checks the folded BatchNorm against fp32.
    fp32 = ["--precision", "fp32", "--fold-batchnorm", "--check-agreement", 1, "--out", tmp_path / "f.json"]
    run(tiny_checkpoint, "--data-root", tmp_path / "mine", *fp32)
    assert "fp32 with BatchNorm folded vs fp32 at a single scale, 1 images:" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text())["precision_agreement"]["images"] == 1


def test_a_full_disk_while_writing_the_scores_is_said_in_words(tmp_path, tiny_checkpoint, monkeypatch):
    write_folder_dataset(tmp_path / "mine", ["sky", "road", "car"])

    def full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(runtime, "write_text", full)
    with pytest.raises(SystemExit, match=r"^evaluate.py: \[Errno 28\] No space left on device: \S*r\.json"):
        run(tiny_checkpoint, "--data-root", tmp_path / "mine", "--out", tmp_path / "r.json")


def test_an_output_lock_is_removed_while_still_held(tmp_path, monkeypatch):
    # Removed after its release, a run that opened the file just before would hold a lock nothing finds.
    lock, real_unlink, held = runtime.hold_lock(tmp_path / ".evaluate.lock"), Path.unlink, []

    def unlink(path, missing_ok=False):
        with open(path, "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(path.name)
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    evaluate.release([lock])
    assert held == [".evaluate.lock"] and not (tmp_path / ".evaluate.lock").exists()


def test_the_scores_go_beside_the_checkpoint_or_are_refused_before_any_work(
    tmp_path, tiny_checkpoint, monkeypatch
):
    write_folder_dataset(tmp_path / "mine", ["sky", "road", "car"])
    scored = []

    def read_only(path):  # a read-only folder of checkpoints (root ignores permissions: told by the lock)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(evaluate, "evaluate_split", lambda *args: scored.append(args))
    monkeypatch.setattr(runtime, "hold_lock", read_only)
    out = re.escape(str(tiny_checkpoint.parent)) + r"/eval_folder_whole_\d+_\d+\.json"
    with pytest.raises(SystemExit, match=rf"cannot write --out {out}: Permission denied; pass --out"):
        run(tiny_checkpoint, "--data-root", tmp_path / "mine")
    assert not scored
    monkeypatch.undo()
    run(tiny_checkpoint, "--data-root", tmp_path / "mine")
    written = list(tiny_checkpoint.parent.glob("eval_folder_whole_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["num_images"] == 1
    written[0].unlink()
    # The default folders of --format-only and --image too: a file in the way is named before any work.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval_out").write_text("")
    for flags in (["--format-only"], ["--image", str(tmp_path / "mine" / "images")]):
        place = (
            "eval_out/folder_val: Not a directory" if flags == ["--format-only"] else "eval_out: File exists"
        )
        with pytest.raises(SystemExit, match=f"cannot write --save-dir {place}; pass --save-dir"):
            run(tiny_checkpoint, "--data-root", tmp_path / "mine", *flags)


# ---- --image: files, folders, patterns ---------------------------------------------------------


def test_every_image_gets_a_name_of_its_own():
    assert layouts.picture_names([Path("a/x.jpg"), Path("b/x.jpg")]) == ["a/x", "b/x"]
    # x.png's name by its suffix would be x_png, x_png.jpg's own: it is numbered instead.
    names = layouts.picture_names([Path("x.jpg"), Path("x.png"), Path("x_png.jpg"), Path("x_png_2.png")])
    assert names == ["x_jpg", "x_png", "x_png_3", "x_png_2"]


def write_picture(path, size=(33, 49), seed=0, **save_options):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_options)


def test_image_command_writes_pictures_at_the_photo_size(tmp_path, tiny_checkpoint, capsys):
    write_picture(tmp_path / "photo.jpg", size=(45, 70))
    run(tiny_checkpoint, "--image", tmp_path / "photo.jpg", "--save-dir", tmp_path / "out")
    printed = capsys.readouterr().out
    assert str(tmp_path / "out" / "photo_attention.png") in printed  # one file: named
    # What runs, said before it runs, as for a split: the file read, then the checkpoint and its protocol.
    assert printed.startswith(
        f"reading {tiny_checkpoint} and building its model\n{tiny_checkpoint}: 1 image file, mode whole"
    )
    assert "scale (48, 32)" in printed and "machine: " in printed
    labels = Image.open(tmp_path / "out" / "photo_pred.png")
    assert labels.mode == "P" and labels.size == (70, 45)
    assert labels.getpalette()[:9] == [0, 0, 255, 128, 128, 128, 255, 0, 0]  # the checkpoint's colours
    for suffix in ("overlay.jpg", "attention.png"):
        assert Image.open(tmp_path / "out" / f"photo_{suffix}").size == (70, 45)


def test_image_command_takes_files_folders_and_patterns_and_names_failures(tmp_path, tiny_checkpoint, capsys):
    names = ["photos/a.png", "photos/b.jpg", "photos/sub/e.png", "photos/.cache/f.png", "other/a.png"]
    for index, relative in enumerate([*names, "glob/c.jpg", "glob/d.webp"]):
        write_picture(tmp_path / relative, seed=index)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    images = [tmp_path / "photos", tmp_path / "other/a.png", tmp_path / "glob/*"]
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_checkpoint, "--save-dir", out, "--image", *images)
    assert exit_info.value.code == 1  # the broken image failed; every other one is written
    printed = capsys.readouterr()
    assert "broken.png" in printed.err and "1 file failed" in printed.err and "failed=1]" in printed.err
    assert "skipped 1 file that is not an image" in printed.out and "notes.txt" in printed.out
    assert "pictures of 6 images under" in printed.out and "(1 of 7 failed)" in printed.out
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*_pred.png"))
    assert written == [  # subfolders too, hidden ones not
        "glob/c_pred.png",
        "glob/d_pred.png",
        "other/a_pred.png",
        "photos/a_pred.png",
        "photos/b_pred.png",
        "photos/sub/e_pred.png",
    ]
    assert len(list(out.rglob("*_composite.png"))) == 6
    for name in ("photos/a", "other/a", "glob/d"):
        labels = Image.open(out / f"{name}_pred.png")
        assert labels.mode == "P" and labels.size == (49, 33) and labels.getpalette()[:3] == [0, 0, 255]
        assert Image.open(out / f"{name}_attention.png").size == (49, 33)
    # the two a.png are different pictures, so their predictions are kept apart
    overlays = [np.array(Image.open(out / f"{folder}/a_overlay.jpg")) for folder in ("photos", "other")]
    assert not np.array_equal(*overlays)


def damaged_png(path):
    """A PNG whose image data is damaged in the middle, header and end intact: it passes the start-up
    check, and torchvision's decoder crashed the process on it (segfault, exit 139)."""
    write_picture(path, size=(64, 64))
    content = bytearray(path.read_bytes())
    start = content.index(b"IDAT") + 100
    content[start : start + 40] = bytes(byte ^ 0x5A for byte in content[start : start + 40])
    path.write_bytes(bytes(content))


def png_declaring(path, width, height):
    """A valid PNG header that declares width x height pixels, with a few bytes of image data: what a
    389 KB file that asks for gigabytes looks like to a reader of its header."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = zlib.compress(b"\0" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_image_command_survives_damaged_and_huge_files_and_writes_inside_the_save_dir(
    tmp_path, tiny_checkpoint, capsys
):
    photos, victim, out = tmp_path / "photos", tmp_path / "victim", tmp_path / "out"
    write_picture(photos / "a.png", seed=1)
    damaged_png(photos / "damaged.png")
    png_declaring(photos / "bomb.png", 20000, 20000)  # beyond Pillow's own limit
    png_declaring(photos / "large.png", 9000, 9000)  # beyond ours only
    write_picture(photos / "big.png", size=(90, 120), seed=2)  # > 4 x the test scale's 48x32 pixels
    write_picture(victim / "y.png", seed=3)
    outside = photos / ".." / "victim" / "y.png"  # a path that climbs out of the common folder
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_checkpoint, "--save-dir", out, "--image", photos, outside)
    assert exit_info.value.code == 1  # exit 139 and nothing after damaged.png, before
    printed = capsys.readouterr()
    assert "3 files failed" in printed.err and "cannot decode image" in printed.err
    assert f"image {photos / 'bomb.png'} is too large" in printed.err
    assert f"image {photos / 'large.png'} is too large (9000x9000): at most 67,108,864 pixels" in printed.err
    assert "big.png: 120x90 is large; predicted and drawn at the test scale, 43x32" in printed.out
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*_pred.png"))
    assert written == ["photos/a_pred.png", "photos/big_pred.png", "victim/y_pred.png"]
    assert sorted(path.name for path in victim.iterdir()) == ["y.png"]  # nothing written beside it
    assert Image.open(out / "photos/big_pred.png").size == (43, 32)


def test_image_command_turns_photos_upright_and_shares_them_out(tmp_path, tiny_checkpoint, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: the camera was turned 90 degrees
    write_picture(tmp_path / "in" / "a_phone.jpg", size=(33, 49), exif=exif)
    write_picture(tmp_path / "in" / "b_plain.png", size=(33, 49))
    write_picture(tmp_path / "in" / "c_plain.png", size=(33, 49))
    written = {}
    monkeypatch.setattr(evaluate.runtime.dist, "barrier", lambda: None)  # the other rank is not there
    for rank in (1, 0):  # rank r of 2 under torchrun takes files[r::2]
        monkeypatch.setattr(evaluate.runtime, "rank_and_world_size", lambda rank=rank: (rank, 2))
        run(tiny_checkpoint, "--save-dir", tmp_path / f"r{rank}", "--image", tmp_path / "in")
        written[rank] = sorted(path.name for path in (tmp_path / f"r{rank}").glob("*_pred.png"))
    assert written == {1: ["b_plain_pred.png"], 0: ["a_phone_pred.png", "c_plain_pred.png"]}
    assert Image.open(tmp_path / "r0" / "a_phone_pred.png").size == (33, 49)  # upright: 49 high, 33 wide
    assert Image.open(tmp_path / "r0" / "c_plain_pred.png").size == (49, 33)


def test_image_files_names_a_missing_path_or_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    for path, message in [
        ("nothing.jpg", "--image .*nothing.jpg: no such file or folder"),
        ("empty", "--image .*empty: no .jpg/.jpeg/.png/.webp images there"),
    ]:
        with pytest.raises(FileNotFoundError, match=message):  # main says it and exits, as for any file
            layouts.image_files([str(tmp_path / path)])


# ---- --format-only: the files of the datasets' evaluation servers ------------------------------

# cityscapesScripts helpers/labels.py: the id of each of the 19 trainIds, written out independently.
CITYSCAPES_IDS_OF_TRAINIDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def test_server_files_hold_what_each_server_scores():
    pred = torch.arange(19).repeat(2, 1)  # (2, 19): every trainId
    image_path = "x/leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png"
    name, picture = pictures.server_file("cityscapes", pred, dict(image_path=image_path), palette=None)
    assert name == "berlin_000000_000019_leftImg8bit.png" and picture.mode == "L"
    assert np.array(picture).tolist() == [CITYSCAPES_IDS_OF_TRAINIDS] * 2
    pred = torch.arange(150).view(10, 15)
    name, picture = pictures.server_file("ade20k", pred, dict(image_path="t/ADE_test_00000001.jpg"), None)
    assert name == "ADE_test_00000001.png" and picture.mode == "L"
    assert np.array(picture).tolist() == (pred + 1).tolist()  # the challenge's 1..150
    palette = data.CLASSES_AND_PALETTES["voc12aug"]["palette"]
    pred = torch.tensor([[0, 20], [15, 7]])
    name, picture = pictures.server_file("voc12aug", pred, dict(image_path="J/2008_000001.jpg"), palette)
    assert name == "2008_000001.png" and picture.mode == "P"
    assert picture.getpalette()[:6] == [*palette[0], *palette[1]]
    assert np.array(picture).tolist() == pred.tolist()


@pytest.fixture(scope="module")
def cityscapes_weights():
    torch.manual_seed(0)
    return GCNet(19).state_dict()


def official_checkpoint(tmp_path, monkeypatch, state_dict, name):
    """An official-format checkpoint ({'meta', 'state_dict'}) under its model-zoo name, served from
    memory: the file exists for --checkpoint, reading it returns the dict without a 200 MB write."""
    path = tmp_path / name
    path.write_bytes(b"")
    served = {"meta": {}, "state_dict": state_dict}
    monkeypatch.setattr(checkpoints, "read_checkpoint", lambda source, trust=False: served)
    return path


def with_classes(state_dict, num_classes):
    """The same weights with both classifiers resized to num_classes (as the 150- and 21-class models)."""
    generator = torch.Generator().manual_seed(num_classes)
    resized = dict(state_dict)
    for head in ("decode_head", "auxiliary_head"):
        weight = state_dict[f"{head}.conv_seg.weight"]
        resized[f"{head}.conv_seg.weight"] = 0.01 * torch.randn(
            num_classes, *weight.shape[1:], generator=generator
        )
        resized[f"{head}.conv_seg.bias"] = torch.zeros(num_classes)
    return resized


def test_format_only_writes_cityscapes_label_ids_for_the_test_split(
    tmp_path, monkeypatch, cityscapes_weights, capsys
):
    root = tmp_path / "cityscapes"
    names = ["berlin_000000_000019", "berlin_000001_000019", "bonn_000000_000019"]
    for index, name in enumerate(names):  # the real test layout: leftImg8bit/test/<city>/, no gtFine
        write_picture(root / "leftImg8bit/test" / name.split("_")[0] / f"{name}_leftImg8bit.png", seed=index)
    name = "gcnet_r50-d8_512x1024_40k_cityscapes_20200618_074450-ef8f069b.pth"
    checkpoint = official_checkpoint(tmp_path, monkeypatch, cityscapes_weights, name)
    out = tmp_path / "server"  # --scales 0.03: the network sees 30x44, not 1024x1521
    write_server_files(checkpoint, root, out, 0.03)
    printed = capsys.readouterr().out
    assert f"wrote 3 cityscapes test predictions for its evaluation server in {out}" in printed
    assert sorted(path.name for path in out.iterdir()) == [f"{name}_leftImg8bit.png" for name in names]
    picture = Image.open(out / f"{names[0]}_leftImg8bit.png")
    assert picture.mode == "L" and picture.size == (49, 33)
    assert set(np.unique(np.array(picture))) <= set(CITYSCAPES_IDS_OF_TRAINIDS)


def test_the_originals_nonlocal_file_is_scored_as_a_gcnet(tmp_path, monkeypatch):
    # The block is read from the keys; the row (Cityscapes 512x1024, whole-image test) from the name.
    # (The FCN file's keys and name: tests/test_context_blocks.py.)
    root = tmp_path / "cityscapes"
    image_path = root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"
    write_picture(image_path)
    label = torch.randint(0, 19, (33, 49), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    label_path = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    label_path.parent.mkdir(parents=True)
    Image.fromarray(label.numpy()).save(label_path)
    torch.manual_seed(0)
    net = GCNet(19, context="nonlocal").eval()
    name = "nonlocal_r50-d8_512x1024_40k_cityscapes_20200605_210748-c75e81e3.pth"
    checkpoint, out = official_checkpoint(tmp_path, monkeypatch, net.state_dict(), name), tmp_path / "r.json"
    run(checkpoint, "--data-root", root, "--scales", 0.03, "--out", out)
    record = json.loads(out.read_text())
    assert record["config_name"] == name[: name.index("_2020")] and record["settings"]["mode"] == "whole"
    image = data.test_transform(data.read_image(image_path), (2048, 1024), (0.03,))[0]
    with torch.no_grad():
        logits = F.interpolate(net(image[None]), size=(33, 49), mode="bilinear", align_corners=False)
    expected = evaluate.metrics_from_confusion(
        evaluate.confusion_matrix(logits[0].argmax(0), label.long(), 19)
    )
    assert record["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)


def test_format_only_writes_ade20k_values_1_to_150_for_the_test_split(
    tmp_path, monkeypatch, cityscapes_weights
):
    root = tmp_path / "ADEChallengeData2016"
    for index in (1, 2):  # the real test layout: images/testing/, no annotations
        write_picture(root / "images" / "testing" / f"ADE_test_0000000{index}.jpg", seed=index)
    name = "gcnet_r50-d8_512x512_80k_ade20k_20200614_185146-91a6da41.pth"
    checkpoint = official_checkpoint(tmp_path, monkeypatch, with_classes(cityscapes_weights, 150), name)
    out = tmp_path / "server"
    write_server_files(checkpoint, root, out, 0.06)
    assert sorted(path.name for path in out.iterdir()) == ["ADE_test_00000001.png", "ADE_test_00000002.png"]
    values = np.array(Image.open(out / "ADE_test_00000001.png"))
    assert values.shape == (33, 49) and values.min() >= 1 and values.max() <= 150


def test_format_only_writes_voc_palette_pngs_for_the_val_split(tmp_path, monkeypatch, cityscapes_weights):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000042\n")
    (root / "SegmentationClass").mkdir()
    for index, name in enumerate(["2007_000033", "2007_000042"]):
        write_picture(root / "JPEGImages" / f"{name}.jpg", seed=index)
        Image.fromarray(np.zeros((33, 49), dtype=np.uint8)).save(root / "SegmentationClass" / f"{name}.png")
    name = "gcnet_r50-d8_512x512_20k_voc12aug_20200617_165701-3cbfdab1.pth"
    checkpoint = official_checkpoint(tmp_path, monkeypatch, with_classes(cityscapes_weights, 21), name)
    out = tmp_path / "server"
    run(checkpoint, "--data-root", root, "--format-only", "--save-dir", out, "--scales", 0.06, 0.08, "--flip")
    assert sorted(path.name for path in out.iterdir()) == [
        "2007_000033.png",
        "2007_000042.png",
    ]  # ms+flip too
    picture = Image.open(out / "2007_000033.png")
    assert picture.mode == "P" and picture.size == (49, 33)
    assert picture.getpalette()[:6] == [0, 0, 0, 128, 0, 0] and np.array(picture).max() <= 20


def test_the_agreement_check_stops_when_its_time_is_spent(tmp_path):
    dataset, options = FakeValSet(tmp_path, count=3), dict(EVALUATION, precision="bf16")
    # evaluate_split gives it a fifth of the evaluation's time; with none left it checks one image.
    spent = evaluate.precision_agreement(PixelModel(3), PixelModel(3), dataset, 3, seconds=0, **options)
    assert spent["images"] == 1 and spent["pixels"] == int((dataset[0][1] != 255).sum())


def test_ctrl_c_ends_a_script_in_words():
    # Both scripts in one process (one import of torch), each stopped by a real SIGINT where it starts.
    code = "import os, runpy, signal, sys, checkpoints, runtime\n"
    for script, (module, name) in (("evaluate.py", ("checkpoints", "find_checkpoint")),
                                   ("train.py", ("runtime", "setup_device"))):  # fmt: skip
        code += (
            f"sys.argv = [{script!r}, '--device', 'cpu']\n"
            f"{module}.{name} = lambda *args: os.kill(os.getpid(), signal.SIGINT)\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            f"except SystemExit as stop:\n    print(stop.code)\n"  # the words; exit status 1 alone
        )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    said = [line for line in done.stdout.splitlines() if line]  # each message starts on a line of its own
    assert len(said) == 2 and "Traceback" not in done.stderr, (done.stdout, done.stderr)
    assert said[0].startswith("evaluate.py: stopped by Ctrl-C") and said[1].startswith(
        "train.py: stopped by Ctrl-C"
    )


def test_two_evaluations_into_the_same_outputs_are_refused(tmp_path):
    settings = dict(save_dir=str(tmp_path / "pictures"), out=str(tmp_path / "r.json"))
    held = evaluate.claim_outputs(settings)
    try:
        with pytest.raises(
            FileExistsError, match=r"--save-dir \S*pictures is being written by another evaluate.py \(process"
        ):
            evaluate.claim_outputs(settings)
        with pytest.raises(FileExistsError, match=r"--out \S*r.json is being written by another evaluate.py"):
            evaluate.claim_outputs(dict(settings, save_dir=None))
        other = tmp_path / "other"
        with pytest.raises(FileExistsError, match=r"--out \S*r.json is being written"):
            evaluate.claim_outputs(dict(settings, save_dir=str(other)))
        assert list(other.iterdir()) == []  # its --save-dir lock went with the refusal
    finally:
        for lock in held:
            lock.close()
    for lock in evaluate.claim_outputs(settings):  # free again once the first run ended
        lock.close()


def test_sliding_windows_of_another_size_keep_the_checkpoints_test_scale(tiny_checkpoint):
    info = checkpoints.checkpoint_info(tiny_checkpoint)
    for flags in ([], ["--mode", "slide", "--crop", "24", "--stride", "16"]):
        args = evaluate.build_parser().parse_args(["--checkpoint", str(tiny_checkpoint), *flags])
        settings = evaluate.resolve_settings(args, info, torch.device("cpu"))
        assert settings["scale"] == (48, 32)  # before, --crop took the folder dataset's 2048x512
    assert (settings["mode"], settings["crop_size"], settings["stride"]) == ("slide", (24, 24), (16, 16))


def test_the_predictor_bounds_a_large_photo_as_the_image_command_does(tmp_path, tiny_checkpoint):
    write_picture(tmp_path / "big.png", size=(90, 120), seed=2)  # > 4 x the test scale's 48x32 pixels
    write_picture(tmp_path / "small.png", size=(33, 49), seed=3)
    predictor = evaluate.Predictor(tiny_checkpoint, ["--workers", "0"])
    labels = predictor(tmp_path / "big.png")
    shrunk = data.resize_image(data.read_image(tmp_path / "big.png"), (32, 43))  # as --image draws it
    _, at_test_scale = evaluate.image_prediction(predictor.model, shrunk, predictor.settings)
    assert labels.shape == (90, 120)  # at the photo's size, each test-scale pixel's class enlarged
    rows, columns = torch.arange(90) * 32 // 90, torch.arange(120) * 43 // 120
    assert torch.equal(labels, at_test_scale[rows[:, None], columns])
    small = data.read_image(tmp_path / "small.png")
    assert torch.equal(
        predictor(tmp_path / "small.png"),
        evaluate.image_prediction(predictor.model, small, predictor.settings)[1],
    )
