// 2-D convolution on CPU through oneDNN, for spp_jax's conv layers (optional,
// XLA FFI). XLA's own CPU convolutions are several times slower than oneDNN's
// on the networks of spp_jax.models, their gradients most of all (conv1's weight
// gradient: 45 ms against 4 ms); PyTorch runs its CPU convolutions on oneDNN.
//
// Three kernels, float32, layouts NHWC (images) and HWIO (kernels), no dilation,
// no groups, the bias left to XLA (it fuses it with the ReLU):
//   SppJaxConv        y  = conv(x, w)              (N, OH, OW, O)
//   SppJaxConvInput   dx = conv^T in x (dy, w)     (N, H, W, I)
//   SppJaxConvKernel  dw = conv^T in w (x, dy)     (KH, KW, I, O)
// The spatial sizes must fit exactly: (H + pad_t + pad_b - KH) % stride_h == 0,
// and the same for W (spp_jax/_onednn.py crops the rows no window reads first).
// spp_jax/_onednn.py makes the three JAX primitives (bilinear, each the
// transpose of the others in one operand) and compiles this file on the first
// CPU lowering, against the headers and library of the `onednn` wheels.
//
// oneDNN primitives are built once per shape and kept (a primitive descriptor
// costs far more to create than the small convolutions take to run); they are
// immutable and may run on several threads at once. oneDNN runs on OpenMP
// threads, as many per call as the caller's `threads` attribute says.
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;

enum Kind : int64_t { kForward = 0, kInput = 1, kKernel = 2 };

// Everything that determines a primitive: the kind, the input and kernel
// shapes, strides and paddings.
using Key = std::array<int64_t, 15>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Conv {
  memory::desc src, weights, dst;
  Dims strides, pad_l, pad_r;
};

Conv Describe(const Key& k) {
  // k: kind, n, h, w, i, kh, kw, o, oh, ow, sh, sw, pt, pl, (unused)
  const int64_t n = k[1], h = k[2], w = k[3], i = k[4], kh = k[5], kw = k[6], o = k[7];
  const int64_t oh = k[8], ow = k[9], sh = k[10], sw = k[11], pt = k[12], pl = k[13];
  const auto f32 = memory::data_type::f32;
  Conv c;
  c.src = memory::desc({n, i, h, w}, f32, memory::format_tag::nhwc);
  c.weights = memory::desc({o, i, kh, kw}, f32, memory::format_tag::hwio);
  c.dst = memory::desc({n, o, oh, ow}, f32, memory::format_tag::nhwc);
  c.strides = {sh, sw};
  c.pad_l = {pt, pl};
  // The exact right padding: the last window ends on the last row it reads.
  c.pad_r = {(oh - 1) * sh + kh - h - pt, (ow - 1) * sw + kw - w - pl};
  return c;
}

// Scratch memory is passed in on every call (not the library's, which primitives
// created on one thread share): XLA runs the devices of a multi-device CPU client on
// several threads at once, each executing the same cached primitives.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Conv& c, dnnl::prop_kind prop) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), prop, dnnl::algorithm::convolution_direct, c.src, c.weights, c.dst, c.strides,
      c.pad_l, c.pad_r, UserScratchpad());
}

// A primitive and, where oneDNN wants the kernel in another layout than HWIO
// (its fastest gradient kernels do), the reorder between the two.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights;  // the layout `conv` reads or writes the kernel in
  dnnl::reorder reorder;  // HWIO -> weights (forward, input gradient), weights -> HWIO (kernel gradient)
  bool reordered = false;
  memory::desc scratchpad, reorder_scratchpad;
};

Plan Create(const Key& k) {
  Conv c = Describe(k);
  Plan plan;
  const memory::desc hwio = c.weights;
  // oneDNN's fastest kernels take the kernel in a blocked layout of their choosing
  // (with HWIO the gradients fall back to GEMM-based kernels, measured 3-4x slower
  // here, and the forward to slower ones): reorder it on every call (cheap).
  c.weights = memory::desc(hwio.get_dims(), memory::data_type::f32, memory::format_tag::any);
  const auto hint = ForwardDesc(c, dnnl::prop_kind::forward_training);
  if (k[0] == kForward) {
    const auto pd = ForwardDesc(c, dnnl::prop_kind::forward_inference);
    plan.conv = dnnl::convolution_forward(pd);
    plan.weights = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  } else if (k[0] == kInput) {
    const dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, c.src, c.weights, c.dst, c.strides,
        c.pad_l, c.pad_r, hint, UserScratchpad());
    plan.conv = dnnl::convolution_backward_data(pd);
    plan.weights = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  } else {
    const dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, c.src, c.weights, c.dst, c.strides,
        c.pad_l, c.pad_r, hint, UserScratchpad());
    plan.conv = dnnl::convolution_backward_weights(pd);
    plan.weights = pd.diff_weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  }
  plan.reordered = plan.weights != hwio;
  if (plan.reordered) {
    const auto pd = k[0] != kKernel
                        ? dnnl::reorder::primitive_desc(Engine(), hwio, Engine(), plan.weights,
                                                        UserScratchpad())
                        : dnnl::reorder::primitive_desc(Engine(), plan.weights, Engine(), hwio,
                                                        UserScratchpad());
    plan.reorder = dnnl::reorder(pd);
    plan.reorder_scratchpad = pd.scratchpad_desc();
  }
  return plan;
}

// The plan for a key, created on first use and kept.
const Plan& GetPlan(const Key& k) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plan>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[k];
  if (!slot) slot = std::make_unique<Plan>(Create(k));
  return *slot;
}

// Runs kind `kind` on raw buffers: x (N, H, W, I), w (KH, KW, I, O), y (N, OH, OW, O);
// the kernel writes one of them (y, x or w) and reads the other two.
ffi::Error Run(Kind kind, const ffi::Span<const int64_t> x_dims,
               const ffi::Span<const int64_t> w_dims, const ffi::Span<const int64_t> y_dims,
               float* x, float* w, float* y, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
               int64_t threads) {
  // oneDNN's OpenMP team for this call (a per-thread setting): with several XLA CPU
  // devices running at once, all-core teams each would oversubscribe the cores (and
  // starve XLA's collectives), so the caller passes cores / devices.
  omp_set_num_threads(static_cast<int>(threads < 1 ? 1 : threads));
  if (x_dims.size() != 4 || w_dims.size() != 4 || y_dims.size() != 4) {
    return ffi::Error::InvalidArgument("spp_jax conv: operands must have rank 4");
  }
  const Key k = {kind,      x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[0], w_dims[1],
                 w_dims[3], y_dims[1], y_dims[2], sh,        sw,        pt,        pl,
                 0};
  if (w_dims[2] != x_dims[3] || y_dims[0] != x_dims[0] || y_dims[3] != w_dims[3]) {
    return ffi::Error::InvalidArgument("spp_jax conv: operand shapes do not match");
  }
  try {
    const Plan& plan = GetPlan(k);
    const Conv c = Describe(k);
    memory src(c.src, Engine(), x), hwio(c.weights, Engine(), w), dst(c.dst, Engine(), y);
    memory weights = plan.reordered ? memory(plan.weights, Engine()) : hwio;
    // This call's own scratch memory (allocated by oneDNN, freed on return).
    memory scratch(plan.scratchpad, Engine());
    thread_local dnnl::stream stream(Engine());
    auto reorder = [&](memory& from, memory& to) {
      memory reorder_scratch(plan.reorder_scratchpad, Engine());
      plan.reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                    {DNNL_ARG_SCRATCHPAD, reorder_scratch}});
    };
    switch (kind) {
      case kForward:
        if (plan.reordered) reorder(hwio, weights);
        plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                                   {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      case kInput:
        if (plan.reordered) reorder(hwio, weights);
        plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                                   {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
        break;
      case kKernel:
        plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, weights},
                                   {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
        if (plan.reordered) reorder(weights, hwio);
        break;
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("spp_jax conv (oneDNN): ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pl, int64_t threads) {
  return Run(kForward, x.dimensions(), w.dimensions(), y->dimensions(), x.typed_data(),
             w.typed_data(), y->typed_data(), sh, sw, pt, pl, threads);
}

ffi::Error Input(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                 ffi::Result<ffi::Buffer<ffi::F32>> dx, int64_t sh, int64_t sw, int64_t pt,
                 int64_t pl, int64_t threads) {
  return Run(kInput, dx->dimensions(), w.dimensions(), dy.dimensions(), dx->typed_data(),
             w.typed_data(), dy.typed_data(), sh, sw, pt, pl, threads);
}

ffi::Error Kernel(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                  ffi::Result<ffi::Buffer<ffi::F32>> dw, int64_t sh, int64_t sw, int64_t pt,
                  int64_t pl, int64_t threads) {
  return Run(kKernel, x.dimensions(), dw->dimensions(), dy.dimensions(), x.typed_data(),
             dw->typed_data(), dy.typed_data(), sh, sw, pt, pl, threads);
}

}  // namespace

#define SPP_JAX_CONV_ATTRS                                                              \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr< \
      int64_t>("pad_left").Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppJaxConv, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (N, H, W, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (KH, KW, I, O)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (N, OH, OW, O)
                                  SPP_JAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppJaxConvInput, Input,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (N, OH, OW, O)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w (KH, KW, I, O)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx (N, H, W, I)
                                  SPP_JAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppJaxConvKernel, Kernel,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (N, H, W, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (N, OH, OW, O)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw (KH, KW, I, O)
                                  SPP_JAX_CONV_ATTRS);
