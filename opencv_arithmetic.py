"""OpenCV's 8-bit pixel arithmetic in plain torch, bit for bit: bilinear and nearest resizing (of a
window of the result, so that a crop resizes only what it keeps) and the BGR<->HSV conversions. The
original resizes and converts colours with OpenCV (mmcv v1.0.2 mmcv/image/geometric.py,
mmcv/image/colorspace.py) in fixed point; float arithmetic, rounded, would differ by 1 on many pixels, so
the training crops would not match. data.py's transforms call these; there is no GCNet to read here.
"""

import torch


def linear_taps(in_size, out_size, start, count, clamp_weights):
    """Source indices and 11-bit weights of the outputs start..start+count-1 along one axis, as OpenCV's
    8-bit INTER_LINEAR: source (d + 0.5) * in/out - 0.5 in float, weights cvRound(w * 2048). Columns
    outside the image are pinned to the edge (weight 0 on the other tap); rows only clamp the index."""
    positions = torch.arange(start, start + count, dtype=torch.float64)
    source = ((positions + 0.5) * (1.0 / (out_size / in_size)) - 0.5).float()
    index0 = torch.floor(source).long()
    fraction = source - index0
    if clamp_weights:
        outside = (index0 < 0) | (index0 >= in_size - 1)
        fraction[outside] = 0
        index0 = torch.where(index0 < 0, 0, index0)
    weight1, weight0 = torch.round(fraction * 2048).int(), torch.round((1 - fraction) * 2048).int()
    index1 = (index0 + 1).clamp(0, in_size - 1)
    return index0.clamp(0, in_size - 1), index1, weight0, weight1


def resize_image_window(image, size, top, left, height, width):
    """The window [top:top+height, left:left+width] of `image` (uint8 3 x H x W) resized to `size`, bit-exact
    with cv2.resize(INTER_LINEAR) then the crop: columns with 11-bit weights into int32, then rows, shifted as
    OpenCV's vectorised code does (float bilinear, rounded, differs by 1 on about 12% of the values)."""
    col0, col1, col_weight0, col_weight1 = linear_taps(image.shape[2], size[1], left, width, True)
    row0, row1, row_weight0, row_weight1 = linear_taps(image.shape[1], size[0], top, height, False)
    # Only the source rows the window reads take part; indices become relative to them.
    first_row, last_row = int(row0.min()), int(row1.max())
    source = image[:, first_row : last_row + 1]
    shape = (source.shape[0], source.shape[1], width)
    columns = source.gather(2, col0.expand(shape)).to(torch.int32).mul_(col_weight0)
    columns += source.gather(2, col1.expand(shape)).to(torch.int32).mul_(col_weight1)
    columns >>= 4
    upper = columns.index_select(1, row0 - first_row).mul_(row_weight0[:, None]).bitwise_right_shift_(16)
    lower = columns.index_select(1, row1 - first_row).mul_(row_weight1[:, None]).bitwise_right_shift_(16)
    upper.add_(lower).add_(2).bitwise_right_shift_(2)  # (C, height, width)
    return upper.clamp_(0, 255).to(torch.uint8)


def resize_image(image, size):
    """uint8 3 x H x W -> uint8 3 x h x w, bit-exact with cv2.resize(INTER_LINEAR): half-pixel
    centres, no antialiasing (a downscale samples rather than averages)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return resize_image_window(image, size, 0, 0, size[0], size[1])


def resize_label_window(label, size, top, left, height, width):
    """The window [top:top+height, left:left+width] of `label` (uint8 H x W) resized to `size` with
    cv2 INTER_NEAREST, from the source indices floor(d * (1 / (out / in))) in double, as OpenCV (torch's
    'nearest' works in float: another pixel for about 8% of size pairs)."""

    def indices(in_size, out_size, start, count):
        positions = torch.arange(start, start + count, dtype=torch.float64)
        return torch.floor(positions * (1.0 / (out_size / in_size))).long().clamp_(max=in_size - 1)

    rows = indices(label.shape[0], size[0], top, height)  # copied whole, then the columns gathered
    columns = indices(label.shape[1], size[1], left, width)
    return label.index_select(0, rows).gather(1, columns.expand(height, width))


# OpenCV's 8-bit BGR<->HSV conversion is fixed-point (12 fractional bits) with these division tables.
# No entry is a tie, so round() is OpenCV's saturate_cast here.
SATURATION_DIVISORS = torch.tensor([0] + [round((255 << 12) / v) for v in range(1, 256)], dtype=torch.int32)
HUE_DIVISORS = torch.tensor([0] + [round((180 << 12) / (6 * d)) for d in range(1, 256)], dtype=torch.int32)


def lookup(table, indices):
    """table[indices] for an int32 index map; index_select on the flat map is the fast path."""
    return table.index_select(0, indices.flatten()).view(indices.shape)


def rgb_to_hsv_uint8(image):
    """uint8 RGB 3 x H x W -> (hue 0..179, saturation, value), int32 H x W each, bit-exact with
    cv2.cvtColor(COLOR_BGR2HSV): V = max, S = 255 (max - min) / V, H = 30 (G - B) / spread, 60 + 30 (B - R)
    / spread or 120 + 30 (R - G) / spread as R, G or B holds the max (in that order of precedence)."""
    rgb = image.to(torch.int32)
    red, green, blue = rgb.unbind(0)
    value = rgb.amax(0)
    spread = value - rgb.amin(0)  # max - min
    saturation = lookup(SATURATION_DIVISORS, value).mul_(spread).add_(1 << 11).bitwise_right_shift_(12)
    # -1 (all bits set) where a channel holds the max, else 0: the sign bit of max - channel - 1, spread
    # by a shift. Bit masks select without torch.where's branches.
    red_is_max = (value - red).sub_(1).bitwise_right_shift_(31)
    green_is_max = (value - green).sub_(1).bitwise_right_shift_(31)
    from_green = (blue - red).add_(spread, alpha=2).bitwise_and_(green_is_max)
    from_blue = (red - green).add_(spread, alpha=4).bitwise_and_(green_is_max.bitwise_not_())
    from_red = (green - blue).bitwise_and_(red_is_max)
    hue = from_green.add_(from_blue).bitwise_and_(red_is_max.bitwise_not_()).add_(from_red)
    hue.mul_(lookup(HUE_DIVISORS, spread)).add_(1 << 11).bitwise_right_shift_(12)  # arithmetic: floor, as C
    hue += hue.bitwise_right_shift(31).bitwise_and_(180)  # negative angles wrap around: + 180
    return hue, saturation, value


def hsv_to_rgb_factors():
    """(3, 256, 180) float32: for R, G, B, each saturation S and hue H, the x such that the channel is
    trunc(V / 255 * x * 255) in OpenCV's 8-bit COLOR_HSV2BGR (4.1.1 and later on x86 with FMA, as the
    published models were trained): in float32, x = 1 - s w with s = S / 255 and w = 0, 1, f or 1 - f by
    sector, f the fraction of H * (6 / 180), the product fused into one rounding. Not reproduced: the
    last width mod 64 (or 32) pixels of a row, which OpenCV converts in scalar code that rounds."""
    h = torch.arange(180, dtype=torch.float32) * (torch.tensor(6.0) / 180)  # float32, as OpenCV
    fraction = h - h.trunc()
    weights = torch.stack([torch.zeros(180), torch.ones(180), fraction, 1 - fraction])  # V, p, q, t
    # Which of (V, p, q, t) each of R, G, B takes in each 60-degree sector.
    sectors = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    channel_weights = weights.gather(0, sectors[h.long()].T)  # 3 x 180
    s = torch.arange(256, dtype=torch.float32) * torch.tensor(1 / 255)  # float32
    fused = 1 - s.double()[:, None] * channel_weights.double()[:, None, :]  # exact product, one rounding
    return fused.float()


HSV_TO_RGB_FACTORS = hsv_to_rgb_factors()


def hsv_to_rgb_uint8(hue, saturation, value, hue_shift=0):
    """Inverse of rgb_to_hsv_uint8, bit-exact with OpenCV's 8-bit COLOR_HSV2BGR. hue_shift=d converts
    the hues (H + d) mod 180, by rolling the tables along the hue axis instead of touching each pixel."""
    factors = HSV_TO_RGB_FACTORS.roll(-hue_shift, dims=2).flatten(1)  # [c, S*180 + H] = x(S, H + d)
    index = (saturation.to(torch.int32) * 180).add_(hue)  # a new tensor: the inputs stay as they are
    v = value.to(torch.float32, copy=True).mul_(torch.tensor(1 / 255))  # float32, as OpenCV
    channels = []
    for channel_factors in factors:
        channel = lookup(channel_factors, index).mul_(v).mul_(255)  # V * x, then * 255: two roundings
        channels.append(channel.clamp_(0, 255).to(torch.uint8))  # float -> uint8 truncates, as OpenCV
    return torch.stack(channels)
