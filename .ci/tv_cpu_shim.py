# torchvision 0.29.1 from the package index is a CUDA build. Its compiled ops do not load next to
# torch+cpu, and torchvision then calls register_fake on torchvision::nms / ::qnms without checking.
# Defining the two schemas first lets `import torchvision.transforms` work (pure-Python parts only).
import torch

try:
    _tv_lib = torch.library.Library("torchvision", "DEF")  # keep the reference alive
    _tv_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _tv_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # already defined by a working torchvision build
    pass
