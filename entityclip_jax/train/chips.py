"""Peak dense bf16 FLOP/s and memory per accelerator chip, by jax's device_kind.

What a training run's MFU and a plan's step-time floor and fit are measured
against. Each number is the vendor's, from the page named beside it; a device
kind not listed here (a CPU, an unlisted GPU) has no peak, and then no MFU is
reported rather than a made-up one.
"""
import dataclasses

GiB = 2 ** 30
GB = 10 ** 9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # per chip, dense (no sparsity)
    memory_bytes: int       # HBM per chip
    source: str


# v4 and v5p count as one device per chip (megacore: both TensorCores as one device).
CHIPS = {
    "TPU v4": Chip("TPU v4", 275e12, 32 * GiB, "https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16, 32 GiB HBM2)"),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 16 * GiB,
                        "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, 16 GB HBM2)"),
    "TPU v5": Chip("TPU v5p", 459e12, 95 * GiB, "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, 95 GiB HBM)"),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 32 * GiB,
                        "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16, 32 GB HBM)"),
    "NVIDIA A100-SXM4-80GB": Chip("A100 80GB", 312e12, 80 * GB,
                                  "NVIDIA A100 Tensor Core GPU datasheet (312 TFLOPS bf16 dense, 80 GB HBM2e)"),
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 989e12, 80 * GB,
                                  "NVIDIA H100 Tensor Core GPU datasheet, SXM (989 TFLOPS bf16 dense, 80 GB HBM3)"),
    "NVIDIA H200": Chip("H200 SXM", 989e12, 141 * GB,
                        "NVIDIA H200 Tensor Core GPU datasheet, SXM (989 TFLOPS bf16 dense, 141 GB HBM3e)"),
}


def chip(device_kind):
    """The Chip of a jax device_kind, or None when its peak is not known."""
    return CHIPS.get(device_kind)
