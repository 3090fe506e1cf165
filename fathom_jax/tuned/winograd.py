"""Winograd convolutions (Lavin & Gray 2016) for 3x3, stride-1 layers on XLA's CPU backend.

F(m, 3) computes an m x m block of outputs from an (m+2) x (m+2) block of input with (m+2)^2
multiplies per channel pair where the direct form takes 9 m^2: 2.25x fewer with F(2, 3) and 4x
fewer with F(4, 3). The input, kernel and output transforms are sums of a few slices, which XLA
fuses into loops, and the multiplies are (m+2)^2 matmuls over the channels, so the whole layer is
matmuls and loops, which XLA's CPU backend runs near its peak, where its 3x3 convolutions (Eigen)
ran at 40-50% of it. Each of the three passes (forward, input gradient, kernel gradient) is
Winograd: the input gradient is the forward form applied to the output gradient with the kernel
flipped, and the kernel gradient is the transposed product of the forward's tiles.

Every operation runs under the convolution scope of `fathom_jax.scopes`, so the breakdown files
the layer under convolution, its Fathom class, and not under the matmuls and loops it compiles
to. Other platforms get XLA's convolution: their libraries (cuDNN, the TPU compiler) choose their
own algorithms, Winograd among them. Results equal the direct convolution's to float32 rounding
(the transforms' coefficients reach 8 in F(4, 3), so the error is a few times the direct form's).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fathom_jax import scopes

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
CHANNELS_FIRST_DIMENSIONS = ("CHWN", "HWIO", "CHWN")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """F(m, 3): the matrices B^T (input), G (kernel) and A^T (output) of Lavin & Gray's eq. (8),
  Y = A^T [(G g G^T) * (B^T d B)] A, for correlation as convolution layers compute it."""
  output: int  # m, output rows and columns per tile
  input_transform: tuple  # B^T, (m+2) x (m+2)
  kernel_transform: tuple  # G, (m+2) x 3
  output_transform: tuple  # A^T, m x (m+2)

  @property
  def size(self) -> int:  # input rows and columns per tile
    return self.output + 2


F2 = Tiling(2, input_transform=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
            kernel_transform=((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1)),
            output_transform=((1, 1, 1, 0), (0, 1, -1, -1)))
# Interpolation points 0, 1, -1, 2, -2 and infinity.
F4 = Tiling(4, input_transform=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                                (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
            kernel_transform=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                              (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
            output_transform=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
                              (0, 1, -1, 8, -8, 1)))


def _transpose(matrix: tuple) -> tuple:
  return tuple(zip(*matrix))


def _combine(matrix: tuple, parts: list) -> list:
  """matrix @ parts, for a small constant matrix and a list of arrays: each row a sum of the
  parts its non-zero coefficients pick, which XLA fuses into the loops that read the parts."""
  rows = []
  for coefficients in matrix:
    total = None
    for c, part in zip(coefficients, parts):
      if c:
        term = part if c == 1 else -part if c == -1 else c * part
        total = term if total is None else total + term
    rows.append(total)
  return rows


def _apply(matrix: tuple, parts: list):
  """matrix @ parts, stacked on a new leading axis. A 2-D transform is two of these, one per
  axis of the tile; the second stacks its axis in front of the first's, so tile positions are
  ordered (column, row) throughout. Arrays are flattened to three or fewer axes first: XLA's CPU
  backend took up to 10x longer to compile the same loop over five or six."""
  return jnp.stack(_combine(matrix, parts))


def _output_size(size: int, padding: tuple[int, int]) -> int:
  """Output size along one axis of a 3x3 stride-1 convolution."""
  return size + padding[0] + padding[1] - 2


def _tile_counts(size: int, padding: tuple[int, int], tiling: Tiling) -> tuple[int, int]:
  """(output size, tiles along the axis)."""
  out = _output_size(size, padding)
  return out, -(-out // tiling.output)


def _batch_and_channels(x, channels_first: bool):
  """(n, c) of x, NHWC or (channels_first) CHWN. Either is (lead, h, w, trail) to the
  transforms, which move whole rows of `trail` (channels or examples) at a time."""
  return (x.shape[3], x.shape[0]) if channels_first else (x.shape[0], x.shape[3])


def _tiles_by_position(tiles, n: int, c: int, channels_first: bool):
  """(tile positions, lead, tiles, trail) as the operand of the tile matmuls: (positions,
  n * tiles, c) for NHWC, (positions, c, tiles * n) for CHWN."""
  if channels_first:
    return tiles.reshape(tiles.shape[0], c, -1)
  return tiles.reshape(tiles.shape[0], -1, c)


def _input_tiles(x, padding, tiling: Tiling, channels_first: bool):
  """B^T d B for every input tile d: (tile positions, n * tiles, channels), or (tile
  positions, channels, n * tiles) with channels_first, and the output size and tile counts."""
  n, c = _batch_and_channels(x, channels_first)
  lead, h, w, trail = x.shape
  (ho, th), (wo, tw) = (_tile_counts(s, p, tiling) for s, p in zip((h, w), padding))
  m, a = tiling.output, tiling.size
  hp, wp = th * m + 2, tw * m + 2
  xp = jnp.pad(x, ((0, 0), (padding[0][0], hp - h - padding[0][0]),
                   (padding[1][0], wp - w - padding[1][0]), (0, 0))).reshape(lead, hp, wp * trail)
  # Row i of every tile is the strided slice xp[:, i::m]; column j likewise, one axis further.
  rows = _apply(tiling.input_transform, [xp[:, i:i + m * (th - 1) + 1:m] for i in range(a)])
  rows = rows.reshape(a * lead * th, wp, trail)
  tiles = _apply(tiling.input_transform, [rows[:, j:j + m * (tw - 1) + 1:m] for j in range(a)])
  return (_tiles_by_position(tiles.reshape(a * a, -1), n, c, channels_first),
          (n, ho, wo, th, tw))


def _output_from_tiles(products, tiling: Tiling, dims, channels_first: bool):
  """A^T M A for every tile of products, laid out as the (n, ho, wo, channels) output, or
  (channels, n, ho, wo) with channels_first."""
  n, ho, wo, th, tw = dims
  m, a = tiling.output, tiling.size
  products = products.reshape(a, a, -1)
  columns = _apply(tiling.output_transform, list(products))  # (m, a, n * th * tw * c)
  y = _apply(tiling.output_transform, [columns[:, i] for i in range(a)])  # (m, m, ...)
  lead, trail = (-1, n) if channels_first else (n, -1)
  y = y.reshape(m, m, lead, th, tw, trail).transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(lead, th * m, tw * m, trail)[:, :ho, :wo]


def _output_grad_tiles(dy, tiling: Tiling, dims, channels_first: bool):
  """The transpose of _output_from_tiles: A g A^T for every m x m tile g of dy, laid out as
  _input_tiles lays out its tiles."""
  _, ho, wo, th, tw = dims
  m, a = tiling.output, tiling.size
  n, c = _batch_and_channels(dy, channels_first)
  lead, trail = dy.shape[0], dy.shape[3]
  dy = jnp.pad(dy, ((0, 0), (0, th * m - ho), (0, tw * m - wo), (0, 0)))
  dy = dy.reshape(lead * th, m, tw * m * trail)
  a_matrix = _transpose(tiling.output_transform)
  rows = _apply(a_matrix, [dy[:, i] for i in range(m)]).reshape(a * lead * th * tw, m, trail)
  tiles = _apply(a_matrix, [rows[:, j] for j in range(m)])
  return _tiles_by_position(tiles.reshape(a * a, -1), n, c, channels_first)


def _kernel_tiles(kernel, tiling: Tiling):
  """G g G^T for the HWIO kernel: (tile positions, in, out)."""
  a = tiling.size
  rows = _apply(tiling.kernel_transform, list(kernel.reshape(3, 3, -1)))  # (a, 3, in * out)
  tiles = _apply(tiling.kernel_transform, [rows[:, j] for j in range(3)])
  return tiles.reshape(a * a, *kernel.shape[2:])


def _kernel_from_tiles(grads, tiling: Tiling):
  """The transpose of _kernel_tiles: G^T t G for (tile positions, in, out) gradients."""
  a = tiling.size
  g_matrix = _transpose(tiling.kernel_transform)
  columns = _apply(g_matrix, list(grads.reshape(a, a, -1)))  # (3, a, in * out)
  kernel = _apply(g_matrix, [columns[:, i] for i in range(a)])  # (3 rows, 3 columns, ...)
  return kernel.reshape(3, 3, *grads.shape[1:])


def _correlate(x, kernel_tiles, padding, tiling: Tiling, kernel_in_axis: int,
               channels_first: bool):
  """The convolution from the transformed kernel; its input channels are on kernel_in_axis
  (1, or 2 for the transposed kernel of the input gradient)."""
  tiles, dims = _input_tiles(x, padding, tiling, channels_first)
  if channels_first:  # (positions, out, tiles)
    products = jax.lax.dot_general(kernel_tiles, tiles,
                                   (((kernel_in_axis,), (1,)), ((0,), (0,))))
  else:  # (positions, tiles, out)
    products = jax.lax.dot_general(tiles, kernel_tiles,
                                   (((2,), (kernel_in_axis,)), ((0,), (0,))))
  return _output_from_tiles(products, tiling, dims, channels_first)


def _forward(x, kernel, padding, tiling, channels_first):
  with jax.named_scope(scopes.CONVOLUTION):
    return _correlate(x, _kernel_tiles(kernel, tiling), padding, tiling, 1, channels_first)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def tiled_conv3x3(x, kernel, padding, tiling: Tiling, channels_first: bool = False):
  """conv3x3 by Winograd's algorithm with this tiling, on any platform."""
  return _forward(x, kernel, padding, tiling, channels_first)


def _winograd_fwd(x, kernel, padding, tiling, channels_first):
  return _forward(x, kernel, padding, tiling, channels_first), (x, kernel)


def _winograd_bwd(padding, tiling, channels_first, residuals, dy):
  x, kernel = residuals
  with jax.named_scope(scopes.CONVOLUTION):
    # Input gradient: dy correlated with the kernel flipped in space, in and out exchanged (the
    # exchange is the matmul's contraction axis, so the kernel is never transposed).
    flipped = _kernel_tiles(kernel[::-1, ::-1], tiling)
    dx = _correlate(dy, flipped, tuple((2 - lo, 2 - hi) for lo, hi in padding), tiling, 2,
                    channels_first)
    # Kernel gradient: sum over tiles of (B^T d B)^T (A g A^T), then back through G. The input
    # tiles are recomputed rather than kept from the forward pass, where they would hold 2.25x
    # the input's memory per layer (F(4, 3)) until the backward pass reached it.
    tiles, dims = _input_tiles(x, padding, tiling, channels_first)
    over_tiles = 2 if channels_first else 1
    products = jax.lax.dot_general(tiles, _output_grad_tiles(dy, tiling, dims, channels_first),
                                   (((over_tiles,), (over_tiles,)), ((0,), (0,))))
    return dx, _kernel_from_tiles(products, tiling)


tiled_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


def choose_tiling(height: int, width: int, in_channels: int, out_channels: int) -> Tiling | None:
  """The tiling for a layer with this output size, or None for the direct convolution; the
  rule that ran fastest over the 3x3 layers of VGG-19, ResNet-50 and AlexNet (benchmarks/
  NOTES.md). With fewer than 64 x 64 channel pairs the tile matmuls are too thin to pay for the
  transforms (VGG's first layer has 3 input channels); F(4, 3) pads the output to multiples of 4
  and transforms the kernel into 36 tiles, which cost more than they save below 28 x 28."""
  if in_channels * out_channels < 64 * 64:
    return None
  return F4 if min(height, width) >= 28 else F2


def conv3x3(x, kernel, padding: tuple[tuple[int, int], tuple[int, int]], direct=None,
            channels_first: bool = False):
  """NHWC (or, with channels_first, CHWN) x HWIO 3x3 stride-1 convolution with (low, high)
  padding (each 0-2) per spatial axis: in float32 on CPU by Winograd's algorithm with
  choose_tiling's tiling, otherwise by direct(x, kernel) (default: XLA's convolution)."""
  if kernel.shape[:2] != (3, 3) or any(not 0 <= p <= 2 for pair in padding for p in pair):
    raise ValueError(f"conv3x3 takes a 3x3 kernel and padding 0-2, got {kernel.shape[:2]} "
                     f"and {padding}")
  dimensions = CHANNELS_FIRST_DIMENSIONS if channels_first else DIMENSIONS
  direct = direct or (lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), padding, dimension_numbers=dimensions))
  out = [_output_size(s, p) for s, p in zip(x.shape[1:3], padding)]
  tiling = choose_tiling(*out, *kernel.shape[2:])
  # In bfloat16 the transforms' sums would lose what the direct form keeps.
  if tiling is None or jnp.result_type(x, kernel) != jnp.float32:
    return direct(x, kernel)
  return jax.lax.platform_dependent(
      x, kernel, cpu=lambda x, k: tiled_conv3x3(x, k, padding, tiling, channels_first),
      default=direct)
