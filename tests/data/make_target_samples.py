"""Writes targets/: every workload's train and inference step at the tiny preset, compiled for an
H100 and a TPU v5e on a machine with neither (fathom_jax.targets), as the tests read them.

  pip install -e '.[targets]'
  python tests/data/make_target_samples.py

targets/<target>/<workload>.<mode>.hlo.txt.gz is the optimised module (compiled.as_text()), the
reference implementation, float32; for the GPU, <workload>.<mode>.unoptimized.hlo.txt.gz is the
module before XLA's passes; conv_kinds.train is a program of strided, dilated and grouped
convolutions and their gradients (the kinds of cuDNN call). targets/xla_flops.json holds XLA's own FLOP count of each:
on the TPU the compiled module's cost analysis; on the GPU, whose compile gives none, that of the
module before XLA's passes; conv_kinds.train is a program of strided, dilated and grouped
convolutions and their gradients (the kinds of cuDNN call). Made with jax and jaxlib 0.10.2, jax-cuda12-plugin 0.10.2 and libtpu
0.0.42.1.
"""

import gzip
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
TARGETS = ("h100", "tpu-v5e")
MODES = ("train", "infer")


def conv_kinds(device, platform):
  """The train step of convolutions cuDNN serves in its different kinds: strided, dilated
  (atrous) and grouped, forward and both gradients."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  def loss(kernels, x):
    h = jax.lax.conv_general_dilated(x, kernels["strided"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.lax.conv_general_dilated(h, kernels["dilated"], (1, 1), "SAME", rhs_dilation=(2, 2),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.lax.conv_general_dilated(h, kernels["grouped"], (1, 1), "SAME",
                                     feature_group_count=4,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(h) ** 2)

  sharding = NamedSharding(Mesh([device], ("data",)), PartitionSpec())
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32, sharding=sharding)
  kernels = {"strided": shape(3, 3, 8, 16), "dilated": shape(3, 3, 16, 16),
             "grouped": shape(3, 3, 4, 16)}
  return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(kernels, shape(4, 16, 16, 8)).lower(
      lowering_platforms=(platform,))


def main():
  from fathom_jax import runner, target_compile, targets
  from fathom_jax.workloads import registry
  targets.prepare_process()
  counts = {}
  for name in TARGETS:
    target = targets.get(name)
    device = targets.devices(target)[0]
    folder = os.path.join(HERE, "targets", name)
    os.makedirs(folder, exist_ok=True)
    programs = [(w, m) for w in registry.expand("all") for m in MODES]
    if target.platform == "cuda":
      programs.append(("conv_kinds", "train"))
    for workload, mode in programs:
      if workload == "conv_kinds":
        lowered = conv_kinds(device, target.platform)
      else:
        spec = runner.RunSpec(workload, mode=mode, preset="tiny", output_dir=None)
        resolved = runner.resolve(spec, platform=target.platform)
        lowered = target_compile.lower_step(resolved.model, mode, resolved.batch_size, device,
                                            target.platform)
      compiled = lowered.compile()
      if target.platform == "tpu":
        flops = compiled.cost_analysis()["flops"]
      else:
        flops = target_compile.unoptimized_flops(lowered)
      counts[f"{name}/{workload}.{mode}"] = float(flops)
      texts = {"hlo.txt.gz": compiled.as_text()}
      if target.platform == "cuda":  # what XLA's count was taken on
        texts["unoptimized.hlo.txt.gz"] = lowered.as_text(dialect="hlo")
      for suffix, text in texts.items():
        path = os.path.join(folder, f"{workload}.{mode}.{suffix}")
        with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:  # same bytes each time
          f.write(text.encode())
      print(path, f"{flops / 1e6:.3f} MFLOP (XLA)", flush=True)
  with open(os.path.join(HERE, "targets", "xla_flops.json"), "w") as f:
    json.dump(counts, f, indent=1, sort_keys=True)
    f.write("\n")


if __name__ == "__main__":
  main()
