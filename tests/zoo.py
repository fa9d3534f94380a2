"""Architectures the capture and simulation are tested on (random init, small inputs)."""

from __future__ import annotations

TIMM = [
    "efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_b0", "tf_efficientnet_b0", "efficientnet_es",
    "mobilenetv2_050", "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_050",
    "tf_mobilenetv3_small_100", "mnasnet_100", "fbnetc_100", "spnasnet_100", "mixnet_s", "tf_mixnet_s",
    "lcnet_050", "ghostnet_100", "repvgg_a0", "repvgg_a2", "resnet18", "resnet26d", "regnetx_002", "regnety_002",
    "rexnet_100", "dla34", "densenet121", "vgg11_bn", "tinynet_e", "hardcorenas_a", "semnasnet_050",
    "convnext_atto", "cspresnet50", "mobileone_s0", "deit_tiny_patch16_224", "mobilevit_xxs",
]
#: what a model needs to run at the zoo's small inputs (a ViT's patch grid is fixed at creation)
KWARGS = {"deit_tiny_patch16_224": {"img_size": 64}}
#: the input side each model is tested at: 64 unless the model cannot take it (VGG's classifier pools its
#: feature map into 7x7 cells, which ONNX cannot export from a smaller map)
SIZE = {"vgg11_bn": 224}
TORCHVISION = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf",
    "squeezenet1_1", "efficientnet_b0", "googlenet",
]


def build(source: str, name: str):
    import torch

    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **KWARGS.get(name, {})).eval()
    import torchvision

    kwargs = {"init_weights": True, "aux_logits": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


ZOO = [("timm", n) for n in TIMM] + [("torchvision", n) for n in TORCHVISION]
