"""torchvision: resnet18 training step, transforms v2 on the GPU, and the detection ops
(``nms``, ``roi_align``) a Faster R-CNN head uses, then a tiny Faster R-CNN forward.

requires: torchvision"""

import torch
import torchvision
from _compat import DEVICE, checksum, report, seed
from torchvision.ops import nms, roi_align
from torchvision.transforms import v2

seed(0)
model = torchvision.models.resnet18(weights=None, num_classes=4).to(DEVICE)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
images = torch.rand(4, 3, 40, 40)
transform = v2.Compose(
    [v2.Resize(32, antialias=True), v2.CenterCrop(32), v2.Normalize([0.5] * 3, [0.25] * 3)]
)
batch = transform(images.to(DEVICE))
loss = torch.nn.functional.cross_entropy(model(batch), torch.tensor([0, 1, 2, 3]).to(DEVICE))
loss.backward()
optimizer.step()

boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float)
scores = torch.tensor([0.9, 0.8, 0.7])
keep = nms(boxes.to(DEVICE), scores.to(DEVICE), iou_threshold=0.5)
feats = torch.randn(1, 8, 16, 16)
rois = torch.tensor([[0, 0, 0, 8, 8], [0, 4, 4, 15, 15]], dtype=torch.float)
pooled = roi_align(feats.to(DEVICE), rois.to(DEVICE), output_size=(2, 2), spatial_scale=1.0)

seed(0)
detector = (
    torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64
    )
    .to(DEVICE)
    .eval()
)
with torch.no_grad():
    detections = detector([torch.rand(3, 64, 64).to(DEVICE)])

report(
    {
        "device": str(batch.device),
        "transformed_sum": batch.sum().item(),
        "loss": loss.item(),
        "checksum": checksum(model),
        "nms_keep": keep.tolist(),
        "roi_align": pooled.sum().item(),
        "detection_keys": sorted(detections[0]),
    },
    rtol=1e-3,
    atol=1e-4,
)
