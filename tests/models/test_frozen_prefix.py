"""The frozen lower layers on ONNX Runtime while the rest trains: the same logits and the same
gradients as the whole network in PyTorch, for each family that splits."""

import pytest
import timm
import torch

from xferlearn.models.frozen_prefix import frozen_prefix, sequence
from xferlearn.models.inference import normalize
from xferlearn.training.finetune import unfreeze

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def whole(net, pixels):
    return net(normalize(pixels, MEAN, STD))


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "resnet18", "vgg11"])
def test_the_sequence_is_the_networks_own_forward(arch):
    torch.manual_seed(0)
    net = timm.create_model(arch, num_classes=2, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = x
        for unit in sequence(net):
            features = unit(features)
        torch.testing.assert_close(net.forward_head(features), net(x))


# Not VGG here: at random weights half its activations are ReLU zeros that tie in its max pools,
# so a rounding-sized change moves which input a pool's gradient goes to (its forward is above).
@pytest.mark.parametrize("arch,depth", [("tf_efficientnet_lite0", 4), ("tf_efficientnet_lite0", 9), ("resnet18", 2)])
def test_logits_and_gradients_match_the_whole_network(arch, depth):
    torch.manual_seed(0)
    net = timm.create_model(arch, num_classes=2, pretrained=False, drop_rate=0.0)
    trainable = unfreeze(net, depth)
    net.eval()  # frozen layers are in eval mode in a stage; the check compares like with like
    pixels = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 0, 1, 1, 0])
    split = frozen_prefix(net, MEAN, STD, 64, 2, 4)  # a batch of 6 on an engine fixed at 4: padded
    assert 0 < split.count < split.total and "ONNX Runtime" in split.describe()

    def gradients(forward):
        net.zero_grad()
        logits = forward(pixels)
        torch.nn.functional.cross_entropy(logits, targets).backward()
        return logits.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.requires_grad}

    expected_logits, expected = gradients(lambda p: whole(net, p))
    logits, got = gradients(split)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert set(got) == set(expected) == set(trainable)
    for name in expected:  # rounding only
        difference = torch.linalg.vector_norm(got[name] - expected[name]).item()
        assert difference <= 1e-2 * torch.linalg.vector_norm(expected[name]).item(), name
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)


def test_no_split_where_nothing_leading_is_frozen_or_the_network_does_not_split():
    net = timm.create_model("resnet18", num_classes=2, pretrained=False)
    unfreeze(net, None)  # every layer trains
    assert frozen_prefix(net, MEAN, STD, 32, 1, 2) is None
    other = timm.create_model("vit_tiny_patch16_224", num_classes=2, pretrained=False, img_size=32, patch_size=8)
    unfreeze(other, 1)
    assert sequence(other) is None and frozen_prefix(other, MEAN, STD, 32, 1, 2) is None
