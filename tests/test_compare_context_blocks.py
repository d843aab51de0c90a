"""tools/compare_context_blocks.py: the paper's comparison end to end on the toy set, and its measures."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from model import GCNet
from tools import compare_context_blocks as compare


def test_the_measures_are_the_papers_cosine_distance_and_an_effective_fraction():
    same = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert compare.mean_cosine_distance(same) == pytest.approx(0, abs=1e-12)
    one_hot = torch.eye(3)  # no two maps share a position: every pair at distance 1
    assert compare.mean_cosine_distance(one_hot) == pytest.approx(1)
    mixed = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # cos 45 degrees
    assert compare.mean_cosine_distance(mixed) == pytest.approx(1 - 0.5**0.5)
    fractions = compare.effective_fraction(torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]))
    assert fractions.tolist() == pytest.approx([1.0, 0.25, 0.5])


def toy_checkpoints(tmp_path, toy_copy):
    """The toy set (3 val images) and a random FCN, NonLocal and GC model of it, saved as train.py saves
    them: (root, paths, models)."""
    root = toy_copy(tmp_path, val_images=3)
    paths, nets = {}, {}
    for name, options in (
        ("fcn", dict(context="none")),
        ("nonlocal", dict(context="nonlocal")),
        ("gcnet", {}),
    ):
        torch.manual_seed(len(paths))
        net = nets[name] = GCNet(
            5, **options
        ).eval()  # at their initialisation: the Non-local maps are near uniform
        recipe = dict(dataset="toy", crop_size=[128, 128], align_corners=False, test_mode="whole", test_crop=[128, 128],
                      test_stride=[86, 86], config_name=f"{name}_r50-d8_128x128_300it_toy", data_root=str(root))  # fmt: skip
        meta = dict(CLASSES=data.TOY_CLASSES, PALETTE=data.TOY_PALETTE)
        paths[name] = tmp_path / f"{name}.pth"
        torch.save(dict(state_dict=net.state_dict(), recipe=recipe, meta=meta), paths[name])
    return root, paths, nets


def test_the_tool_scores_times_and_draws_the_three_kinds_on_the_toy_set(tmp_path, capsys, toy_copy):
    root, paths, nets = toy_checkpoints(tmp_path, toy_copy)
    out = tmp_path / "out"
    flags = ["--out", str(out), "--look", "2", "--max-images", "2", "--timed", "1", "--size", "64x128", "--train-crop", "64", "--train-batch",
             "1", "--workers", "0", "--device", "cpu"]  # fmt: skip
    report = compare.main(["--checkpoints", *map(str, paths.values()), *flags])
    printed = capsys.readouterr().out
    assert [entry["model"] for entry in report["models"]] == ["FCN", "NonLocal", "GCNet"]
    assert [entry["block"]["context"] for entry in report["models"]] == ["none", "nonlocal", "gc"]
    assert report["num_images"] == 2 and all(entry["num_images"] == 2 for entry in report["models"])
    # (b) the Non-local block's matrix products and the GC block's convs cost FLOPs, and keep memory.
    flops = [entry["speed"]["gflop_per_image"] for entry in report["models"]]
    assert flops[0] < flops[2] < flops[1], flops
    kept = [entry["speed"]["estimated_training_memory_gb"] for entry in report["models"]]
    assert kept[0] < kept[2] < kept[1], kept
    # (c) the GC maps of the two images, recomputed here, and their cosine distance.
    gc = nets["gcnet"]
    dataset = data.build_dataset("toy", str(root), "val")
    with torch.no_grad():
        maps = [gc(dataset[i][0][0][None], return_attention=True)[1][0, 0] for i in (0, 1)]  # (h, w)
    expected = 1 - F.cosine_similarity(maps[0].flatten().double(), maps[1].flatten().double(), dim=0).item()
    assert report["gc"]["mean_cosine_distance_between_images"] == pytest.approx(expected, rel=1e-4)
    # The Non-local maps of the first image's 64 sampled queries (the tool's seeded draw), recomputed
    # from theta and phi: softmax(theta_i . phi_j / sqrt(C')), then the mean distance over the pairs.
    nl_net = nets["nonlocal"]
    block, captured = nl_net.decode_head.nl_block, {}
    block.register_forward_pre_hook(lambda module, inputs: captured.update(x=inputs[0]))
    with torch.no_grad():
        nl_net(dataset[0][0][0][None])
        theta, phi = (part(captured["x"])[0].flatten(1) for part in (block.theta, block.phi))  # (C', h*w)
    queries = torch.randperm(theta.shape[1], generator=torch.Generator().manual_seed(0))[:64]
    nl_maps = (torch.einsum("cq,cp->qp", theta[:, queries], phi) / theta.shape[0] ** 0.5).softmax(1).double()
    cosine = F.cosine_similarity(nl_maps[:, None], nl_maps[None], dim=2)
    expected = (1 - cosine[~torch.eye(64, dtype=torch.bool)]).mean().item()
    nl = report["nonlocal"]
    assert nl["per_image"][0] == pytest.approx(expected, rel=1e-3, abs=1e-9)
    assert 0 < nl["effective_fraction"] <= 1 and 0 < report["gc"]["effective_fraction"] <= 1
    assert 0 <= nl["centred"] <= 2 and 0 <= report["gc"]["centred"] <= 2  # 1: unrelated shapes
    # (e) the GC map's weight by class: the two maps at the labels' size, each summing to 1 there.
    by_class, mass = report["gc"]["mass_by_class"], 0
    for index, attention in enumerate(maps):
        label = dataset[index][1]
        weights = F.interpolate(attention[None, None], size=tuple(label.shape), mode="bilinear")[
            0, 0
        ].double()
        mass += (weights * (label == data.TOY_CLASSES.index("disc"))).sum() / weights.sum() / 2
    assert by_class["disc"]["mass"] == pytest.approx(mass.item(), rel=1e-6)
    assert sum(v["mass"] for v in by_class.values()) == pytest.approx(1)
    assert sum(v["area"] for v in by_class.values()) == pytest.approx(1)
    assert set(by_class) <= set(data.TOY_CLASSES) | {"(ignored)"}
    # (d) one picture per image: the image with the 4 query crosses, 4 Non-local maps and the GC map.
    picture = Image.open(out / f"maps_{dataset[0][2]['name']}.png")
    assert picture.width == 6 * compare.PANEL_WIDTH + 5 * 6
    y, x = compare.QUERY_POINTS[0]
    (h, w), height = maps[0].shape, picture.height - 20  # the feature map; the panels below their titles
    centre = (
        round((int(x * w) + 0.5) / w * compare.PANEL_WIDTH),
        20 + round((int(y * h) + 0.5) / h * height),
    )
    assert picture.getpixel(centre) == (255, 255, 255)  # the white cross of query 1
    assert (out / "gc_attention_by_class.png").is_file()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["models"][1]["mIoU"] == pytest.approx(report["models"][1]["mIoU"])
    for word in ("FCN", "NonLocal", "GCNet", "mean cosine distance", "GC map weight by class"):
        assert word in printed


def test_a_file_as_out_and_a_comparison_without_its_baselines_are_said_first(tmp_path, capsys):
    (tmp_path / "taken").write_text("a user's file")
    with pytest.raises(SystemExit):  # before any checkpoint is read, as a folder it cannot write would be
        compare.main(["--checkpoints", "none.pth", "--out", str(tmp_path / "taken")])
    assert re.search(r"argument --out: \S*taken is a file; pass a folder", capsys.readouterr().err)
    with pytest.raises(SystemExit):  # compare's own usage, not evaluate.py's, which it passes the name to
        compare.main(["--checkpoints", "none.pth", "--dataset", "cityscape"])
    assert "argument --dataset: invalid choice: 'cityscape'" in capsys.readouterr().err
    split = SimpleNamespace(name="toy", classes=["a", "b"])
    gc = dict(context="gc", pooling="att", fusion="add")
    models = [dict(path=f"{name}.pth", dataset=split, info=dict(block=gc)) for name in ("one", "two")]
    compare.check_models(models)  # two GC checkpoints: minutes of timing, with nothing to compare against
    said = capsys.readouterr().out
    assert "only GC models among the checkpoints: no FCN (--context none) or Non-local model" in said
    compare.check_models([dict(models[0], info=dict(block=dict(gc, context="none"))), models[1]])
    assert "only GC models" not in capsys.readouterr().out


def test_a_training_size_the_speed_cannot_take_is_refused_before_any_scoring(tmp_path, toy_copy, monkeypatch):
    _, paths, _ = toy_checkpoints(tmp_path, toy_copy)
    scored = []
    monkeypatch.setattr(compare.evaluate, "evaluate_dataset", lambda *args, **kwargs: scored.append(1))
    flags = ["--train-crop", "8", "--train-batch", "1", "--workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"--train-crop 8x8 at --train-batch 1 .*\(or pass --no-speed\)"):
        compare.main(
            ["--checkpoints", str(paths["fcn"]), str(paths["gcnet"]), "--out", str(tmp_path / "o"), *flags]
        )
    assert scored == []  # the scores were not spent first, then lost
