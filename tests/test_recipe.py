"""recipe.py: every row of the results table, the 769 rule, crop parsing and official file names."""

import pytest

import recipe

# The 16 rows of the original's GCNet table (mmsegmentation v0.5.0 configs/gcnet/README.md).
TABLE = {
    f"gcnet_r{depth}-d8_{crop}_{schedule}_{dataset}"
    for depth in (50, 101)
    for dataset, crops, schedules in (
        ("cityscapes", ("512x1024", "769x769"), ("40k", "80k")),
        ("ade20k", ("512x512",), ("80k", "160k")),
        ("voc12aug", ("512x512",), ("20k", "40k")),
    )
    for crop in crops
    for schedule in schedules
}


def rows_in_the_table():
    for dataset in recipe.TABLE_DATASETS:
        for crop in recipe.DATASETS[dataset]["crops"]:
            for iters in recipe.DATASETS[dataset]["iters"]:
                for depth in (50, 101):
                    yield recipe.row(dataset, crop, depth, iters)


def test_the_rows_are_the_16_of_the_table():
    rows = list(rows_in_the_table())
    assert len(TABLE) == 16 and {row["config_name"] for row in rows} == TABLE
    assert all(row["in_table"] for row in rows)
    assert not recipe.row("cityscapes", 640)["in_table"] and not recipe.row("toy")["in_table"]
    assert not recipe.row("cityscapes", iters=1000)["in_table"]


def test_a_769_row_in_full():
    row = recipe.row("cityscapes", "769", depth=101, iters=80000)
    assert row["config_name"] == "gcnet_r101-d8_769x769_80k_cityscapes"
    assert (row["batch_size"], row["global_batch"], row["iters"], row["eval_interval"]) == (2, 8, 80000, 8000)
    assert (row["lr"], row["momentum"], row["weight_decay"], row["power"], row["min_lr"]) == (
        0.01, 0.9, 5e-4, 0.9, 1e-4
    )  # fmt: skip
    assert row["aux_weight"] == 0.4 and row["crop_size"] == (769, 769)
    # The 769 rule: align_corners in both heads, the 2049x1025 scale, windows of the crop at stride 513.
    assert row["align_corners"] is True and row["scale"] == (2049, 1025)
    assert (row["test_mode"], row["test_crop"], row["test_stride"]) == ("slide", (769, 769), (513, 513))
    assert row["pretrained"].endswith("resnet101_v1c-e67eebb6.pth") and row["workers"] == 2


def test_every_other_row_tests_on_the_whole_image():
    for row in rows_in_the_table():
        sliding = row["crop_size"] == (769, 769)
        assert (row["test_mode"] == "slide") == sliding == row["align_corners"], row["config_name"]
    ade = recipe.row("ade20k", depth=50)
    assert (ade["scale"], ade["batch_size"], ade["global_batch"], ade["iters"]) == ((2048, 512), 4, 16, 80000)
    city = recipe.row("cityscapes")
    assert city["crop_size"] == (512, 1024) and city["scale"] == (2048, 1024) and city["test_mode"] == "whole"


def test_the_toy_demo_and_your_own_folder():
    toy = recipe.row("toy")
    assert (toy["lr"], toy["pretrained"], toy["crop_size"], toy["iters"]) == (0.05, "none", (128, 128), 300)
    folder = recipe.row("folder")
    assert folder["scale"] == (2048, 512) and folder["pretrained"] == recipe.IMAGENET_URLS[50]
    with pytest.raises(ValueError, match="unknown dataset 'coco'; choose one of ade20k, cityscapes"):
        recipe.row("coco")


@pytest.mark.parametrize(
    "value, expected",
    [("769", (769, 769)), (769, (769, 769)), ("512x1024", (512, 1024)), ("512X1024", (512, 1024)),
     ((512, 1024), (512, 1024)), ([64, 96], (64, 96))],
)  # fmt: skip
def test_parse_crop(value, expected):
    assert recipe.parse_crop(value) == expected


@pytest.mark.parametrize("value", ["0", "-5", "512x", "axb", "1x2x3", (0, 4)])
def test_parse_crop_refuses_what_is_no_size(value):
    with pytest.raises(ValueError, match="--size: expected N or HxW with sizes from 1 to 8192"):
        recipe.parse_crop(value, flag="--size")


def test_the_row_of_an_official_file_name():
    name = "checkpoints/gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth"
    row = recipe.row_of_config_name(name)
    assert row["config_name"] == "gcnet_r50-d8_769x769_40k_cityscapes" and row["test_mode"] == "slide"
    assert recipe.row_of_config_name("gcnet_r101-d8_512x512_160k_ade20k_x.pth")["depth"] == 101
    assert recipe.row_of_config_name("my_model.pth") is None


def test_scale_flag_and_the_validation_interval_of_short_runs():
    assert recipe.parse_scale("256") == (1024, 256)  # short side 256, long side up to 4 x 256
    assert recipe.parse_scale("2048x512") == recipe.parse_scale("512x2048") == (2048, 512)  # order-free
    for bad in ("0", "x", "12x", "1x2x3", "40000"):
        with pytest.raises(ValueError, match="--scale: expected N"):
            recipe.parse_scale(bad)
    intervals = {iters: recipe.row("toy", iters=iters)["eval_interval"] for iters in (6, 40, 100, 300, 40000)}
    assert intervals == {6: 6, 40: 20, 100: 20, 300: 30, 40000: 4000}
