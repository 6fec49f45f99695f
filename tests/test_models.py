"""models.py network and weight import/export: formulas, structure, every weights format,
numerical equality with timm, refusal of unsafe pickles, and a smoke run of the benchmark."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models  # noqa: E402


def small(num_classes=5, name="R14x1", seed=0):
    torch.manual_seed(seed)
    return models.create_model(name, num_classes).eval()


def randomize_norms(model):
    """Non-trivial GroupNorm affine parameters, so that loading them is really checked."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, models.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------------------
# Weight Standardization and GroupNorm against their formulas

def test_weight_standardization_formula():
    torch.manual_seed(0)
    conv = models.StdConv2d(6, 4, kernel_size=3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(4, 1, 1, 1, dtype=torch.double) * 5).add_(0.3)  # not already standard
    w = conv.weight.detach()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # biased variance
    w_std = (w - mean) / torch.sqrt(var + 1e-10)
    x = torch.randn(2, 6, 9, 9, dtype=torch.double)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_std, padding=1), rtol=1e-10, atol=1e-10)
    # a tiny filter shows the eps is 1e-10 inside the sqrt
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0] * 27).view(1, 6, 3, 3).repeat(4, 1, 1, 1) * 1e-5)
    wv = conv.weight.detach()
    expected = wv / torch.sqrt(torch.tensor(1e-10, dtype=torch.double) + 1e-10)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected, padding=1))


def group_norm_formula(x, weight, bias, groups, eps=1e-5):
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return y * weight.double().view(1, c, 1, 1) + bias.double().view(1, c, 1, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_formula_fp32_and_channels_last(channels_last):
    torch.manual_seed(0)
    gn = randomize_norms(models.GroupNorm(32, 64))
    assert (gn.num_groups, gn.eps) == (32, 1e-5)
    x = torch.randn(3, 64, 7, 5) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = gn(x)
    ref = group_norm_formula(x, gn.weight.detach(), gn.bias.detach(), 32)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # gradient of the module equals the gradient of the formula
    xr = x.detach().double().requires_grad_()
    g = torch.randn(x.shape, dtype=torch.double)
    group_norm_formula(xr, gn.weight.detach(), gn.bias.detach(), 32).backward(g)
    xo = x.detach().requires_grad_()
    gn(xo).backward(g.float())
    torch.testing.assert_close(xo.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["gn", "ws"])
def test_fused_and_written_out_paths_agree(norm):
    """The fast path of each normalisation (fused kernel) and its written-out formula give the
    same output and the same gradients of input and parameters."""
    torch.manual_seed(0)
    if norm == "gn":
        module = randomize_norms(models.GroupNorm(32, 64))
        x = (torch.randn(3, 64, 7, 5) * 3 + 1).contiguous(memory_format=torch.channels_last)
    else:
        module = models.StdConv2d(16, 8, kernel_size=3, padding=1, bias=False)
        with torch.no_grad():
            module.weight.mul_(torch.rand(8, 1, 1, 1) * 5).add_(0.3)
        x = torch.randn(2, 16, 9, 9)
    g = torch.randn(module(x).shape)
    results = []
    for fused in (True, False):
        module.fused = fused
        xx = x.detach().requires_grad_()
        module.zero_grad()
        y = module(xx)
        y.backward(g)
        results.append((y.detach(), xx.grad, module.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert results[0][2].abs().sum() > 0


def test_group_norm_bf16_autocast():
    torch.manual_seed(0)
    gn = randomize_norms(models.GroupNorm(32, 64))
    x = (torch.randn(2, 64, 6, 6) * 2).bfloat16()  # what a conv gives under bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x)
    ref = group_norm_formula(x.float(), gn.weight.detach(), gn.bias.detach(), 32)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------
# Structure

def test_output_shapes_features_and_names():
    model = small(num_classes=7)
    x = torch.randn(2, 3, 48, 48)
    assert logits(model, x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 2048)
    names = set(dict(model.named_parameters()))
    for n in ["root.conv.weight", "body.block1.unit01.gn1.weight", "body.block1.unit01.conv1.weight",
              "body.block1.unit01.gn2.bias", "body.block1.unit01.conv2.weight",
              "body.block1.unit01.gn3.weight",
              "body.block1.unit01.conv3.weight", "body.block1.unit01.downsample.weight",
              "body.block4.unit01.downsample.weight", "head.gn.weight", "head.conv.weight", "head.conv.bias"]:
        assert n in names, n
    u = model.body.block2.unit01  # stride on the 3x3 conv and the projection, not the first 1x1
    assert (u.conv1.stride, u.conv2.stride, u.downsample.stride) == ((1, 1), (2, 2), (2, 2))
    assert model.root.conv.kernel_size == (7, 7) and model.root.conv.stride == (2, 2)
    assert model.root.pool.padding == 0 and model.root.pad.padding == (1, 1, 1, 1)


def test_root_pool_pads_with_zeros_not_minus_inf():
    # an all-negative root output: BiT's zero padding makes the border maxima 0
    model = small()
    root = model.root
    out = root.pool(root.pad(-torch.ones(1, 64, 8, 8)))
    assert out.shape == (1, 64, 4, 4) and out[0, 0, 0, 0] == 0 and out[0, 0, 1, 1] == -1


def test_r50x1_parameter_count():
    model = models.create_model("R50x1", 1000)
    assert sum(p.numel() for p in model.parameters()) == 25_549_352  # BiT R50x1 (timm: the same)
    assert len(model.state_dict()) == 153
    assert len(model.body.block3) == 6 and len(models.create_model("R101x1", 10).body.block3) == 23


def test_every_parameter_gets_a_gradient():
    # create_model's head is random; with reset_head's zero head no gradient would reach the body
    model = small(num_classes=3).train()
    loss = model(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_half_width_demo_model():
    # R14x0.5: every width halved (root 32 channels, stages 128 ... 1024), a quarter of the weights
    half, full = models.create_model("R14x0.5", 3), models.create_model("R14x1", 3)
    assert half.root.conv.out_channels == 32 and half.num_features == 1024
    assert 0.24 < sum(p.numel() for p in half.parameters()) / sum(p.numel() for p in full.parameters()) < 0.26
    half(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in half.parameters())


def test_unknown_model_name():
    with pytest.raises(models.UserError, match="unknown model 'R77x1'"):
        models.create_model("R77x1", 10)


# ----------------------------------------------------------------------------------------
# Google's BiT .npz

def test_npz_round_trip_and_official_layout(tmp_path):
    src = randomize_norms(small(num_classes=6))
    path = tmp_path / "BiT-S-R14x1.npz"
    models.export_bit_npz(src, path)
    with np.load(path) as z:
        keys = set(z.files)
        assert len(keys) == len(src.state_dict())
        # kernels HWIO, 1-D norms, head as a 1x1 conv kernel: the official layout
        assert z["resnet/root_block/standardized_conv2d/kernel"].shape == (7, 7, 3, 64)
        assert z["resnet/block1/unit01/a/proj/standardized_conv2d/kernel"].shape == (1, 1, 64, 256)
        assert z["resnet/block2/unit01/b/standardized_conv2d/kernel"].shape == (3, 3, 128, 128)
        assert z["resnet/block1/unit01/a/group_norm/gamma"].shape == (64,)
        assert z["resnet/group_norm/beta"].shape == (2048,)
        assert z["resnet/head/conv2d/kernel"].shape == (1, 1, 2048, 6)
        assert z["resnet/head/conv2d/bias"].shape == (6,)
    dst = small(num_classes=6, seed=1)
    models.load_weights(dst, path, keep_head=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(dst, x), logits(src, x), rtol=0, atol=0)


def test_npz_hand_built_keys(tmp_path):
    # arrays written by hand in the official layout, not by our exporter
    model = small(num_classes=4)
    arrays = {}
    rng = np.random.default_rng(0)
    for name, t in model.state_dict().items():  # everything else: exporter-independent zeros/ones
        arrays[models._bit_key(name)] = np.zeros(t.shape[::-1] if t.ndim != 4 else
                                                 (t.shape[2], t.shape[3], t.shape[1], t.shape[0]), np.float32)
    root = rng.standard_normal((7, 7, 3, 64)).astype(np.float32)
    gamma = rng.standard_normal(64).astype(np.float32)
    head = rng.standard_normal((1, 1, 2048, 4)).astype(np.float32)
    proj = rng.standard_normal((1, 1, 256, 512)).astype(np.float32)
    arrays["resnet/root_block/standardized_conv2d/kernel"] = root
    arrays["resnet/block1/unit01/b/group_norm/gamma"] = gamma
    arrays["resnet/head/conv2d/kernel"] = head
    arrays["resnet/block2/unit01/a/proj/standardized_conv2d/kernel"] = proj
    path = tmp_path / "hand.npz"
    np.savez(path, **arrays)
    models.load_weights(model, path, keep_head=True)
    w = model.root.conv.weight
    for (h, ww, i, o) in [(0, 0, 0, 0), (6, 2, 1, 63), (3, 5, 2, 17)]:
        assert w[o, i, h, ww] == float(root[h, ww, i, o])
    assert torch.equal(model.body.block1.unit01.gn2.weight, torch.from_numpy(gamma))
    assert model.head.conv.weight[3, 2000, 0, 0] == float(head[0, 0, 2000, 3])
    assert model.body.block2.unit01.downsample.weight[511, 255, 0, 0] == float(proj[0, 0, 255, 511])
    assert model.body.block2.unit01.downsample.weight[7, 100, 0, 0] == float(proj[0, 0, 100, 7])


def test_head_zeroed_or_kept(tmp_path):
    src = small(num_classes=10)
    path = tmp_path / "w.npz"
    models.export_bit_npz(src, path)
    transfer = small(num_classes=3, seed=5)
    models.load_weights(transfer, path)  # keep_head=False: a zero head of the model's 3 classes
    assert transfer.head.conv.weight.shape == (3, 2048, 1, 1)
    assert transfer.head.conv.weight.abs().sum() == 0 and transfer.head.conv.bias.abs().sum() == 0
    torch.testing.assert_close(transfer.root.conv.weight, src.root.conv.weight)
    kept = small(num_classes=10, seed=5)
    models.load_weights(kept, path, keep_head=True)
    torch.testing.assert_close(kept.head.conv.weight, src.head.conv.weight)
    with pytest.raises(models.UserError, match=r"head.conv.weight \(3, 2048, 1, 1\) in the model vs "
                                               r"\(10, 2048, 1, 1\) in the file"):
        models.load_weights(small(num_classes=3), path, keep_head=True)


# ----------------------------------------------------------------------------------------
# The paper's model.pth.tar, our own checkpoints, timm

def test_paper_style_pth_tar_with_module_prefix(tmp_path):
    src = randomize_norms(small(num_classes=14))
    state = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "model.pth.tar"
    torch.save({"model": state, "step": 1000, "optim": {"state": {}, "param_groups": []}}, path)
    dst = small(num_classes=14, seed=3)
    models.load_weights(dst, path, keep_head=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(dst, x), logits(src, x), rtol=0, atol=0)


def test_own_checkpoint_and_compile_prefix(tmp_path):
    src = randomize_norms(small(num_classes=5))
    path = tmp_path / "ckpt.pt"
    models.save_checkpoint(str(path), src, step=3)
    dst = small(num_classes=5, seed=2)
    models.load_weights(dst, str(path), keep_head=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(dst, x), logits(src, x), rtol=0, atol=0)
    compiled = tmp_path / "compiled.pt"
    torch.save({"_orig_mod." + k: v for k, v in src.state_dict().items()}, compiled)
    dst2 = small(num_classes=5, seed=4)
    models.load_weights(dst2, compiled, keep_head=True)
    torch.testing.assert_close(logits(dst2, x), logits(src, x), rtol=0, atol=0)


def test_timm_names_round_trip(tmp_path):
    src = randomize_norms(small(num_classes=5))
    ours = src.state_dict()
    t = models.to_timm_state_dict(ours)
    assert "stem.conv.weight" in t and "stages.0.blocks.0.norm1.weight" in t
    assert "stages.3.blocks.0.downsample.conv.weight" in t and "norm.bias" in t and "head.fc.weight" in t
    back = models.from_timm_state_dict(t)
    assert list(back) == list(ours) and all(back[k] is ours[k] for k in ours)
    path = tmp_path / "timm.pth"
    torch.save(t, path)  # a timm state dict file: detected by its names
    dst = small(num_classes=5, seed=9)
    models.load_weights(dst, path, keep_head=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(dst, x), logits(src, x), rtol=0, atol=0)


@pytest.mark.parametrize("ours_name,timm_name", [("R50x1", "resnetv2_50x1_bit"),
                                                   ("R101x1", "resnetv2_101x1_bit")])
def test_logits_equal_timm(ours_name, timm_name, tmp_path):
    timm = pytest.importorskip("timm")
    ours = randomize_norms(small(num_classes=1000, name=ours_name))
    ref = timm.create_model(timm_name, pretrained=False).eval()
    theirs = ref.state_dict()
    assert set(models.to_timm_state_dict(ours.state_dict())) == set(theirs)  # the real timm names
    # our .npz export read by timm's own reader of Google's files
    models.export_bit_npz(ours, tmp_path / "bit.npz")
    ref.load_pretrained(str(tmp_path / "bit.npz"))
    x = torch.randn(2, 3, 64, 64)
    a, b = logits(ours, x), logits(ref, x)
    # timm's StdConv2d eps is 1e-8 (ours 1e-10, BiT's): equal to 1e-4 ...
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ref.load_state_dict(models.to_timm_state_dict(ours.state_dict()))
    torch.testing.assert_close(logits(ref, x), b, rtol=0, atol=0)
    for m in ref.modules():
        if type(m).__name__ == "StdConv2d":
            m.eps = 1e-10
    # ... and with the same eps the same computation, to float rounding
    torch.testing.assert_close(a, logits(ref, x), rtol=1e-6, atol=1e-6)
    back = small(num_classes=1000, name=ours_name, seed=1)
    back.load_state_dict(models.from_timm_state_dict(ref.state_dict()))
    torch.testing.assert_close(logits(back, x), a, rtol=0, atol=0)


def test_input_normalisation_of_each_weights_format(tmp_path):
    """Google's .npz and timm: [-1, 1]; ours: what the checkpoint records; the paper's
    model.pth.tar: ImageNet mean / std in an imagenet folder (or config), else [-1, 1]; a bare
    state dict does not say (load_weights then assumes [-1, 1] unless told)."""
    src = small(num_classes=5)
    state = src.state_dict()
    models.export_bit_npz(src, tmp_path / "BiT-M-R14x1.npz")
    torch.save(models.to_timm_state_dict(state), tmp_path / "timm.pth")
    models.save_checkpoint(str(tmp_path / "ours.pt"), src, input_norm="imagenet")
    paper = {"model": {"module." + k: v for k, v in state.items()}, "optimizer": {}, "epoch": 90}
    for folder in ("imagenet1k_bit50x1", "chexpert_mimic_nih_padchest_bit50x1", "run"):
        (tmp_path / folder).mkdir()
        torch.save(paper, tmp_path / folder / "model.pth.tar")
    (tmp_path / "run" / "config.yaml").write_text("dataset: imagenet21k\nmodel: bit_pretrained_resnet50x1\n")
    torch.save(state, tmp_path / "bare.pt")
    expected = {"BiT-M-R14x1.npz": "bit", "timm.pth": "bit", "ours.pt": "imagenet",
                "imagenet1k_bit50x1/model.pth.tar": "imagenet",
                "chexpert_mimic_nih_padchest_bit50x1/model.pth.tar": "bit",
                "run/model.pth.tar": "imagenet", "bare.pt": None}
    for name, norm in expected.items():
        assert models.read_weights(str(tmp_path / name))[1] == norm, name
    # what the model is then fed: ImageNet mean / std for the paper's ImageNet file
    norm = models.load_weights(small(num_classes=5), str(tmp_path / "imagenet1k_bit50x1" / "model.pth.tar"))
    images = torch.full((1, 4, 4, 1), 255, dtype=torch.uint8)
    x = models.to_model_input(images, norm=norm)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    chest = models.load_weights(small(num_classes=5), str(tmp_path / "chexpert_mimic_nih_padchest_bit50x1" / "model.pth.tar"))
    assert torch.equal(models.to_model_input(images, norm=chest), torch.ones(1, 3, 4, 4))
    assert models.load_weights(small(num_classes=5), str(tmp_path / "bare.pt")) == "bit"
    assert models.load_weights(small(num_classes=5), str(tmp_path / "bare.pt"), input_norm="imagenet") == "imagenet"


def test_grey_images_under_imagenet_normalisation_as_the_authors():
    """A grey image under ImageNet mean / std: the authors' chest pipeline (datasets/builder.py
    Normalize: the first channel's mean and std, then the channel repeated) with chest=True;
    their BiT pipeline (the image loaded as RGB, torchvision's Normalize per channel) without."""
    images = torch.randint(0, 256, (2, 5, 5, 1), dtype=torch.uint8)
    grey = images[..., 0].float()[:, None] / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    torch.testing.assert_close(models.to_model_input(images, norm="imagenet", chest=True),
                               ((grey - 0.485) / 0.229).expand(-1, 3, -1, -1))
    torch.testing.assert_close(models.to_model_input(images, norm="imagenet"), (grey - mean) / std)
    rgb = images.expand(-1, -1, -1, 3)   # colour images: the same either way
    assert torch.equal(models.to_model_input(rgb, norm="imagenet", chest=True), models.to_model_input(rgb, norm="imagenet"))
    half = models.to_model_input(images, norm="bit", scale=torch.tensor([0.5, 1.0]), chest=True)
    torch.testing.assert_close(half[0], (grey[0] * 0.5 - 0.5).expand(3, -1, -1) / 0.5)


def test_random_affine_keeps_the_aspect_of_a_squashed_image():
    """A squashed image of width / height 3/2 (and 2/3): a crop of 3/4 of the shorter side and the
    same length of the longer, as Resize(shorter side) + a square RandomCrop see the original."""
    ramp = (torch.arange(64.0) / 63)
    images = torch.stack([ramp.repeat(64, 1), ramp[:, None].repeat(1, 64)])[None].repeat(2, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    out = models.random_affine(images, 48, crop=0.75, hflip=False, generator=gen, aspect=torch.tensor([1.5, 2 / 3]))
    span = (out[:, :, :, -1] - out[:, :, :, 0])[:, 0].mean(-1), (out[:, :, -1] - out[:, :, 0])[:, 1].mean(-1)
    pixels = 47 / 48 * 64 / 63   # output centres 0..47 span 47/48 of the crop; the ramp is 1 over 63 pixels
    torch.testing.assert_close(span[0], torch.tensor([0.75 / 1.5, 0.75]) * pixels, atol=1e-4, rtol=0)  # x
    torch.testing.assert_close(span[1], torch.tensor([0.75, 0.75 * 2 / 3]) * pixels, atol=1e-4, rtol=0)  # y


def test_random_affine_reflection_padding_and_random_resized_crop():
    ramp = (torch.arange(16.0) / 15).repeat(2, 3, 16, 1)  # columns 0 .. 1, left to right
    gen = torch.Generator().manual_seed(0)
    # a shift of up to half the side: zeros fill black (-1); reflection mirrors the image, so
    # only image values appear, varying outside the image as the mirrored columns do
    black = models.random_affine(ramp, 16, translate=0.5, hflip=False, generator=gen)
    gen.manual_seed(0)
    mirrored = models.random_affine(ramp, 16, translate=0.5, hflip=False, padding="reflection", generator=gen)
    assert (black == -1).any()
    assert mirrored.min() >= -1e-6 and mirrored.max() <= 1 + 1e-6
    outside = mirrored[black == -1]
    assert outside.min() >= -1e-6 and outside.unique().numel() > 3  # mirrored, not the edge repeated
    # a random area crop magnifies: neighbouring output columns differ by less than a source column
    gen.manual_seed(1)
    crop = models.random_affine(ramp, 16, crop_area=(0.1, 0.3), hflip=False, generator=gen)
    step = crop[:, 0, 8].diff(dim=-1)
    assert (step < 1 / 15 - 0.01).all() and (step > 0).all()


# ----------------------------------------------------------------------------------------
# Errors

def test_wrong_architecture_and_width(tmp_path):
    path = tmp_path / "r26.npz"
    models.export_bit_npz(small(name="R26x1"), path)
    with pytest.raises(models.UserError) as e:
        models.load_weights(small(), path)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit R14x1" in msg and "tensors disagree" in msg
    assert "body.block1.unit02.gn1.weight (256,) not in the model" in msg
    n = sum(1 for k in small(name="R26x1").state_dict() if k not in small().state_dict())
    assert f": {n} tensors disagree" in msg
    wide = tmp_path / "r14x2.pth"
    torch.save({"model": {"root.conv.weight": torch.zeros(128, 3, 7, 7)}}, wide)
    with pytest.raises(models.UserError, match=r"root.conv.weight \(64, 3, 7, 7\) in the model vs "
                                               r"\(128, 3, 7, 7\) in the file"):
        models.load_weights(small(), wide)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"model": {"root.conv.weight": torch.zeros(1)}, "payload": Evil(str(marker))}, path)
    with pytest.raises(models.UserError, match="refused") as e:
        models.load_weights(small(), path)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the fixture is really dangerous: a plain load runs it
    assert marker.exists()


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_weights(small(), tmp_path / "nope.npz")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(models.UserError, match="not a checkpoint or weights file"):
        models.load_weights(small(), junk)
    listy = tmp_path / "list.pt"
    torch.save([1, 2, 3], listy)
    with pytest.raises(models.UserError, match="no state dict found"):
        models.load_weights(small(), listy)


# ----------------------------------------------------------------------------------------
# The benchmark runs (tiny settings; also the code path of the GPU mode except CUDA itself)

def test_bench_smoke(capsys):
    pytest.importorskip("timm")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_models.py"), "--size", "32", "--batch", "2",
           "--repeats", "1", "--warmup", "0", "--dtype", "bf16", "--threads", "1", "--no-compile",
           "--no-memory", "--peak-flops", "1e9"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    table = [r for r in rows if r[:2] in (["train", "bf16"], ["infer", "bf16"])]
    assert len(table) == 4
    for r in table:  # mode dtype variant, img/s ours, timm, ratio, MB ours, MB timm, %peak ours, timm
        assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[8].rstrip("%")) > 0
    norm_rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["gn"], ["ws"])]
    assert len(norm_rows) == 9  # GroupNorm: 3 shapes x 2 formats; WS: 3 shapes; fused and written out
    assert all(float(r[-6]) > 0 and float(r[-5]) > 0 and r[-3] == "-" for r in norm_rows)
    # the per-configuration subprocess measurement (peak memory on CPU), run in-process here
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_models
    bench_models.run_child({"impl": "ours", "model": "R50x1", "device": "cpu", "size": 32, "batch": 2,
                            "warmup": 0, "repeats": 1, "threads": 0, "channels_last": True, "compile": False,
                            "dtype": "fp32", "mode": "train"})
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ips"] > 0 and res["mem"] >= 0


# ----------------------------------------------------------------------------------------
# Device-dependent defaults and terminal output

def test_device_dependent_defaults(monkeypatch):
    """bf16 autocast only where it is fast (CUDA); loader workers fewer than the usable CPUs and
    at most the limit; the scripts leave --dtype and --workers to these when not given."""
    assert models.default_dtype("cpu") == "fp32" and models.default_dtype("cuda:0") == "bf16"
    for cpus, workers in [(1, 0), (2, 1), (4, 3), (64, 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert models.default_workers() == workers
    import pretrain
    import transfer
    args = pretrain.get_args_parser().parse_args(["--data", "d", "--out", "o"])
    assert args.dtype is None and args.workers is None
    assert transfer.get_args_parser().parse_args(["--data", "d"]).dtype is None


def test_log_line_printed_while_a_bar_is_open_comes_out_whole():
    """print0 goes through tqdm.write: the open bar is cleared, the line printed on its own, the
    bar redrawn below. (A plain print would glue the line to the bar's unfinished line.)"""
    import io
    from tqdm import tqdm
    out = io.StringIO()  # terminal and log file alike: one stream holding bar and lines
    with tqdm(total=3, file=out, mininterval=0) as bar:
        bar.update()
        models.print0("step 1/3 loss 0.5000 lr 0.01", file=out)
        bar.update()
    segments = out.getvalue().replace("\r", "\n").split("\n")
    assert "step 1/3 loss 0.5000 lr 0.01" in [s.strip() for s in segments]
    assert not any("it/s" in s and "loss" in s for s in segments)  # never on the bar's line
