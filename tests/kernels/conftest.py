"""Kernel tests run under the Triton interpreter on CPU (set before any kernel module is imported) and
natively where CUDA is present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
