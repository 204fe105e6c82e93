"""Mixed precision on GPU: bf16 autocast, or fp16 autocast with a gradient scaler; CPU uses fp32."""

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
        if device.type != "cuda":
            if name in ("bf16", "fp16"):
                raise ValueError(f"--precision {name} needs a GPU; CPU runs use fp32")
            name = "fp32"
        elif name == "auto":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        self.name, self.device = name, device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)
