"""The training and test pipelines of data.py written with OpenCV and numpy, step by step as the
original's mmcv ran them (mmseg v0.5.0 mmseg/datasets/pipelines/transforms.py): a second reading of
data.TrainTransform for those who know OpenCV, and what tools/gpu_check/targets.py has benchmark.py
time beside ours.

OpenCV is no dependency of this project, only a point of comparison: `cv2` is None when it is not
installed, and targets.py then says "opencv not installed".
"""

import numpy as np
import torch
import torch.nn.functional as F

import data

try:
    import cv2
except ImportError:
    cv2 = None


def pipelines(image_path, label_path, train_scale, crop_size):
    """dict(train=..., test=...): functions that read the two PNGs and return a training sample
    (image, label) and a test image, tensors shaped as data.TrainTransform and data.test_transform
    return them. train_scale is (W, H), crop_size (H, W)."""
    cv2.setNumThreads(1)  # one loader worker, like torch.set_num_threads(1) for ours
    mean, std = np.array(data.MEAN, np.float32), np.array(data.STD, np.float32)
    rng = np.random.default_rng(0)

    def normalized(image_bgr):  # uint8 H x W x 3 BGR -> float32 3 x H x W RGB tensor
        rgb = image_bgr[..., ::-1].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1)))

    def convert(image, alpha=1.0, beta=0.0):
        return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(image):
        return convert(image, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else image

    def crop_box(label):
        """data.random_crop: up to 10 cat_max_ratio checks, then an unchecked draw."""
        for _ in range(11):
            top = int(rng.integers(0, max(label.shape[0] - crop_size[0], 0) + 1))
            left = int(rng.integers(0, max(label.shape[1] - crop_size[1], 0) + 1))
            window = label[top : top + crop_size[0], left : left + crop_size[1]]
            counts = np.bincount(window.ravel(), minlength=256)
            counts[data.IGNORE_INDEX] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
        return top, left

    def train_sample():
        image = cv2.imread(image_path, cv2.IMREAD_COLOR)  # BGR
        label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        height, width = data.rescale_size(*label.shape, data.ratio_scale(train_scale, rng.uniform(0.5, 2.0)))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        top, left = crop_box(label)
        image = image[top : top + crop_size[0], left : left + crop_size[1]]
        label = label[top : top + crop_size[0], left : left + crop_size[1]]
        if rng.random() < 0.5:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        if rng.integers(2):  # photometric distortion, in mmseg's order
            image = convert(image, beta=rng.uniform(-32, 32))
        contrast_first = rng.integers(2)
        if contrast_first:
            image = contrast(image)
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + rng.integers(-18, 18)) % 180
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if not contrast_first:
            image = contrast(image)
        padding = (0, crop_size[1] - image.shape[1], 0, crop_size[0] - image.shape[0])
        label = F.pad(torch.from_numpy(label.astype(np.int64)), padding, value=data.IGNORE_INDEX)
        return F.pad(normalized(image), padding, value=0.0), label

    def test_sample():
        image = cv2.imread(image_path, cv2.IMREAD_COLOR)
        height, width = data.rescale_size(*image.shape[:2], train_scale)
        if (height, width) != image.shape[:2]:
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        return normalized(image)

    return dict(train=train_sample, test=test_sample)
