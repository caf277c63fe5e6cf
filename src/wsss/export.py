"""``wsss export``: a trained run's inference network as safetensors, ONNX or TorchScript.

The exported network is the seg path: RGB images (B, 3, H, W) float in [0, 1] in, seg logits
(B, K, H, W) at the input size out; the ImageNet normalisation is inside, so a deployment only scales
its pixels to [0, 1]. ``safetensors`` holds the weights (no pickle) with the run's config and classes as
metadata; ``wsss.load(file)`` rebuilds the method from it. ONNX has a dynamic batch and image size
(the backbone's resize to a patch multiple is part of the graph; it rounds a side of exactly k + 1/2
patches up where eager PyTorch rounds to even, the one place the two can differ). TorchScript is traced: checked against
the eager network at a second image size, and marked valid for any size only when it matches there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from wsss.methods.base import Method
from wsss.utils.files import atomic_write

SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}


class SegNetwork(nn.Module):
    """RGB (B, 3, H, W) in [0, 1] -> seg logits (B, K, H, W): normalisation, then ``method.predict_seg``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, method: Method) -> None:
        super().__init__()
        from wsss.data.transforms import MEAN, STD

        self.method = method.eval()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, K, H, W) logits."""
        return self.method.predict_seg((image - self.mean) / self.std)


def metadata(cfg, classes) -> dict[str, str]:
    """String metadata every export carries: the resolved config, the classes, the method."""
    from wsss.config import dump_config

    return {"format": "wsss", "config": dump_config(cfg), "classes": json.dumps(list(classes.names)),
            "background": json.dumps(classes.background), "seg_classes": json.dumps(list(classes.seg_names)),
            "method": cfg.method_name, "input": "RGB (B, 3, H, W) float in [0, 1]",
            "output": "seg logits (B, K, H, W)"}  # fmt: skip


def export_safetensors(method, cfg, classes, path: Path) -> None:
    """Every weight of ``method`` (its state dict, no optimizer) plus :func:`metadata`, atomically."""
    from safetensors.torch import save_file

    # clones: safetensors refuses tensors that share storage (tied or sliced parameters)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in method.state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata(cfg, classes)))


def read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    """(state dict, metadata) of a :func:`export_safetensors` file; CheckpointError when it is not one."""
    from safetensors import safe_open

    from wsss.engine.checkpoint import CheckpointError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != "wsss":
        raise CheckpointError(f"{path}: a safetensors file without wsss metadata (not written by wsss export)")
    return state, meta


def export_onnx(method, path: Path, size: tuple[int, int], meta: dict[str, str]) -> list[str]:
    """ONNX (opset 18) of :class:`SegNetwork` with batch, height and width dynamic where the graph allows;
    ``meta`` as metadata_props. Returns the names of the input dimensions the exporter left dynamic
    (of ``batch``, ``height``, ``width``): a fixed one accepts only the example's size."""
    import onnx

    net = SegNetwork(method)
    x = torch.rand(2, 3, *size)  # not 1: torch.export fixes a size-1 example dimension
    b = h = w = torch.export.Dim.AUTO  # AUTO: dynamic where the graph allows, as the tests check

    def write(p):
        prog = torch.onnx.export(net, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                 dynamic_shapes={"image": {0: b, 2: h, 3: w}}, opset_version=18)  # fmt: skip
        model = prog.model_proto
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, p)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dynamic.extend(n for n, i in (("batch", 0), ("height", 2), ("width", 3)) if dims[i].dim_param)

    dynamic: list[str] = []
    atomic_write(path, write)
    return dynamic


def export_torchscript(method, path: Path, size: tuple[int, int], meta: dict[str, str]) -> bool:
    """Traced TorchScript of :class:`SegNetwork` at image ``size`` (H, W); ``meta`` as extra files. A trace
    records one path through the code, so the traced module is compared with the eager one at a second
    size off the patch grid (within 1e-4): returns whether it holds there (``any_size`` in the extra
    files); if not, only the traced size is valid."""
    net = SegNetwork(method)
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.rand(2, 3, *size), check_trace=False)
        q = method.backbone.patch_size + 3  # a second size off any patch multiple and half-multiple
        other = torch.rand(1, 3, size[0] + q, size[1] + q, generator=torch.Generator().manual_seed(0))
        try:
            any_size = bool(torch.allclose(traced(other), net(other), atol=1e-4))
        except RuntimeError:
            any_size = False
    extra = {f"{k}.txt": v for k, v in {**meta, "traced_size": json.dumps(list(size)),
                                        "any_size": json.dumps(any_size)}.items()}  # fmt: skip
    atomic_write(path, lambda p: torch.jit.save(traced, p, _extra_files=extra))
    return any_size
