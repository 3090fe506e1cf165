"""Devices to compile for without having them: `run.py --target=NAME`.

XLA compiles for a GPU from a description of it (a GpuTargetConfigProto, kept here as text) and
for a TPU from libtpu's own topologies, on a machine with neither. Nothing is autotuned: on a GPU
dots become Triton GEMM fusions and cuDNN keeps its default algorithms, as a first compile on the
device would before autotuning.

Peaks are the vendors' dense figures (no sparsity); a float32 program's matrix work is held to
the TF32 tensor-core peak on GPUs and to the bfloat16 peak on TPUs, the precisions XLA uses for
float32 products at JAX's default matmul precision.

  h100     NVIDIA H100 SXM 80 GB: 132 SMs at 1.98 GHz, 3.35 TB/s HBM3 (h100_sxm.txtpb; NVIDIA H100
           datasheet: 67 TFLOP/s FP32, 494.7 TF32 and 989.4 BF16 tensor, dense)
  h200     NVIDIA H200 SXM 141 GB: the H100 SXM's SMs and clocks, 4.8 TB/s HBM3e (h200_sxm.txtpb;
           NVIDIA H200 datasheet, the same compute figures)
  tpu-v4   Google TPU v4 chip: 275 TFLOP/s BF16, 1.2 TB/s HBM2, 32 GiB
  tpu-v5e  Google TPU v5e chip: 197 TFLOP/s BF16, 819 GB/s HBM2e, 16 GiB
  tpu-v5p  Google TPU v5p chip: 459 TFLOP/s BF16, 2.76 TB/s HBM2e, 95 GiB
  tpu-v6e  Google TPU v6e (Trillium) chip: 918 TFLOP/s BF16, 1.64 TB/s HBM, 32 GiB
(Google Cloud's TPU system architecture pages; vector-unit peaks are not published, so a TPU
estimate holds only matrix work to a FLOP peak and everything else to memory bandwidth.)
"""

import dataclasses
import importlib.util
import os
from typing import Optional

from fathom_jax import native_logs
from fathom_jax.analysis import static
from fathom_jax.errors import UsageError

_HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL = "pip install 'fathom_jax[targets]' (jax[cuda12-local,tpu] at this jax's version)"


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # 'cuda' or 'tpu'
  description: str
  matrix_flops_per_s: dict  # by dtype of the program
  memory_bytes_per_s: float
  memory_bytes: int
  vector_flops_per_s: Optional[float] = None
  gpu_config: Optional[str] = None  # file of the GpuTargetConfigProto, beside this module
  tpu_topology: Optional[str] = None  # libtpu's name for a topology with such chips

  def peaks(self, dtype: str) -> static.Peaks:
    return static.Peaks(self.matrix_flops_per_s[dtype], self.memory_bytes_per_s,
                        self.vector_flops_per_s)

  def describe(self) -> dict:
    return dataclasses.asdict(self)


_HOPPER = {"float32": 494.7e12, "bfloat16": 989.4e12}
TARGETS = {t.name: t for t in (
    Target("h100", "cuda", "NVIDIA H100 SXM 80 GB", _HOPPER, 3.35e12, 84_929_347_584,
           vector_flops_per_s=66.9e12, gpu_config="h100_sxm.txtpb"),
    Target("h200", "cuda", "NVIDIA H200 SXM 141 GB", _HOPPER, 4.8e12, 150_754_820_096,
           vector_flops_per_s=66.9e12, gpu_config="h200_sxm.txtpb"),
    Target("tpu-v4", "tpu", "Google TPU v4", {"float32": 275e12, "bfloat16": 275e12}, 1.2e12,
           32 * 2**30, tpu_topology="v4:2x2x1"),
    Target("tpu-v5e", "tpu", "Google TPU v5e", {"float32": 197e12, "bfloat16": 197e12}, 819e9,
           16 * 2**30, tpu_topology="v5e:2x2"),
    Target("tpu-v5p", "tpu", "Google TPU v5p", {"float32": 459e12, "bfloat16": 459e12}, 2.765e12,
           95 * 2**30, tpu_topology="v5p:2x2x1"),
    Target("tpu-v6e", "tpu", "Google TPU v6e", {"float32": 918e12, "bfloat16": 918e12}, 1.64e12,
           32 * 2**30, tpu_topology="v6e:2x2"),
)}


def get(name: str) -> Target:
  if name not in TARGETS:
    raise UsageError(f"unknown target {name!r}; targets are: {', '.join(TARGETS)}")
  return TARGETS[name]


# The package each platform's compiles need: (import name, distribution name).
_PLUGIN = {"cuda": ("jax_cuda12_plugin", "jax-cuda12-plugin"), "tpu": ("libtpu", "libtpu")}


def plugin_present(platform: str) -> bool:
  return importlib.util.find_spec(_PLUGIN[platform][0]) is not None


def require_plugin(target: Target, flag: str) -> None:
  """A UsageError naming what to install when `target`'s plugin is missing."""
  if not plugin_present(target.platform):
    raise UsageError(f"--{flag}={target.name} needs {_PLUGIN[target.platform][1]}: {INSTALL}")


def prepare_process() -> None:
  """Settings a target compile needs before JAX starts a backend: this process runs on the CPU
  (a GPU or TPU plugin must not look for devices), the CUDA plugin skips its check of CUDA
  libraries that a machine without a GPU lacks, and libtpu does not ask a cloud metadata server
  which TPU VM it is on (it warns, at length, when there is none)."""
  jax = native_logs.import_jax()
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # the topology is given apart
  jax.config.update("jax_platforms", "cpu")
  native_logs.start_backends()


def devices(target: Target) -> list:
  """Devices of the target to compile for, from a topology description (no hardware needed)."""
  from jax.experimental import topologies
  require_plugin(target, "target")
  with native_logs.silenced():  # the plugins' start-up log lines about absent hardware
    return _topology_devices(target, topologies)


def _topology_devices(target: Target, topologies) -> list:
  if target.platform == "cuda":
    with open(os.path.join(_HERE, target.gpu_config)) as f:
      config = f.read()
    topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology="1x1x1")
  else:
    topology = topologies.get_topology_desc(target.tpu_topology, "tpu")
  return list(topology.devices)
