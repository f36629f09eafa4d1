// Python binding of the csrc/ kernels: duodiff_fast._C (see duodiff_fast/_cpp_lib.py for the contract).
//
// Each function validates its tensors (device, dtype, shape, strides) with messages that name the
// argument, the value and what is allowed, fills the params struct of csrc/duodiff.h and launches on
// the current CUDA stream of the tensors' device, so the ops trace and capture like the Triton ones.
// Outputs are written in place; nothing is returned. Inputs the kernels cannot take as they are (a
// misaligned view, a per-sample operand of a third dtype) are copied first; the copies are
// stream-ordered allocations, safe inside a CUDA-graph capture.
//
// Narrow includes (not <torch/extension.h>): a third of the compile time, and the offline syntax
// check in bench/csrc_report.py stays quick.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <sstream>
#include <string>

#include "duodiff.h"

// Build metadata for build_info(), passed by setup.py / the JIT build as bare tokens (-DNAME=2.11.0+cu130:
// no quotes, which a shell in the ninja build would eat) and stringified here.
#define DUO_STR2(...) #__VA_ARGS__
#define DUO_STR(...) DUO_STR2(__VA_ARGS__)
#ifdef DUODIFF_CUDA_ARCHS_RAW
#define DUODIFF_CUDA_ARCHS DUO_STR(DUODIFF_CUDA_ARCHS_RAW)
#else
#define DUODIFF_CUDA_ARCHS ""
#endif
#ifdef DUODIFF_TORCH_VERSION_RAW
#define DUODIFF_TORCH_VERSION DUO_STR(DUODIFF_TORCH_VERSION_RAW)
#else
#define DUODIFF_TORCH_VERSION ""
#endif
#ifdef DUODIFF_TORCH_CUDA_RAW
#define DUODIFF_TORCH_CUDA DUO_STR(DUODIFF_TORCH_CUDA_RAW)
#else
#define DUODIFF_TORCH_CUDA ""
#endif

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

std::string dtype_str(at::ScalarType t) { return c10::toString(t); }

void check_cuda(const char* op, const char* name, const Tensor& t, const c10::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the first input is on ", device);
}

void check_last_dim(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": the last dim of ", name,
              " must be contiguous (stride 1), got strides ", t.strides());
}

duo::DType to_dtype(const char* op, const char* name, at::ScalarType t, bool allow_f32) {
  if (t == at::kHalf) return duo::DType::kF16;
  if (t == at::kBFloat16) return duo::DType::kBF16;
  if (t == at::kFloat && allow_f32) return duo::DType::kF32;
  TORCH_CHECK(false, op, ": ", name, " has dtype ", dtype_str(t), "; the cuda backend takes ",
              allow_f32 ? "float16, bfloat16 or float32" : "float16 or bfloat16");
  return duo::DType::kF16;
}

bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

void raise_if(const char* op, const char* err) { TORCH_CHECK(err == nullptr, "duodiff_fast._C.", op, ": ", err); }

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// ------------------------------------------------------------------------------------------------
// attention(qkv [B, L, 3, H, D], scale, out [B, L, H*D])
// ------------------------------------------------------------------------------------------------

bool attention_layout_ok(const Tensor& t, int64_t dims) {
  if (!aligned(t.data_ptr())) return false;
  for (int64_t i = 0; i < dims; ++i) {
    if (t.stride(i) % duo::kAttentionAlignElems != 0) return false;
  }
  return true;
}

void attention(const Tensor& qkv_in, double scale, Tensor out) {
  const char* op = "attention";
  TORCH_CHECK(qkv_in.dim() == 5 && qkv_in.size(2) == 3, op, ": qkv must be [B, L, 3, H, D], got shape ",
              shape_str(qkv_in));
  const c10::Device device = qkv_in.device();
  check_cuda(op, "qkv", qkv_in, device);
  check_cuda(op, "out", out, device);
  const duo::DType dtype = to_dtype(op, "qkv", qkv_in.scalar_type(), false);
  const int64_t B = qkv_in.size(0), L = qkv_in.size(1), H = qkv_in.size(3), D = qkv_in.size(4);
  TORCH_CHECK(duo::attention_head_dim_supported(D), op, ": head dim D = ", D,
              " is not supported (32, 48, 64, 72, 80, 96, 128)");
  check_last_dim(op, "qkv", qkv_in);
  TORCH_CHECK(out.scalar_type() == qkv_in.scalar_type(), op, ": out has dtype ", dtype_str(out.scalar_type()),
              ", qkv ", dtype_str(qkv_in.scalar_type()), "; they must match");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == L && out.size(2) == H * D, op,
              ": out must be [B, L, H*D] = [", B, ", ", L, ", ", H * D, "], got ", shape_str(out));
  check_last_dim(op, "out", out);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be a positive finite number, got ", scale);
  if (B * L * H == 0) return;
  const c10::cuda::CUDAGuard guard(device);

  // The kernel copies 16-byte rows: strides must be multiples of 8 elements and pointers aligned.
  Tensor qkv = qkv_in;
  if (!attention_layout_ok(qkv, 4)) qkv = qkv_in.is_contiguous() ? qkv_in.clone() : qkv_in.contiguous();
  Tensor dst = attention_layout_ok(out, 2) ? out : at::empty({B, L, H * D}, out.options());

  duo::AttentionParams p;
  p.qkv = qkv.data_ptr();
  p.out = dst.data_ptr();
  p.dtype = dtype;
  p.B = B;
  p.L = L;
  p.H = H;
  p.D = D;
  p.stride_qb = qkv.stride(0);
  p.stride_ql = qkv.stride(1);
  p.stride_q3 = qkv.stride(2);
  p.stride_qh = qkv.stride(3);
  p.stride_ob = dst.stride(0);
  p.stride_ol = dst.stride(1);
  p.scale = static_cast<float>(scale);
  raise_if(op, duo::attention_fwd(p, stream_of(qkv)));
  if (!dst.is_same(out)) out.copy_(dst);
}

// ------------------------------------------------------------------------------------------------
// norm(x, weight, bias, update, gate, shift, scale, eps, out, residual_out)
// ------------------------------------------------------------------------------------------------

// A per-channel / per-sample operand as the kernel takes it: x's dtype or fp32 (other float dtypes
// are converted to fp32, exactly), last dim contiguous.
Tensor norm_operand(const char* name, const Tensor& t, const Tensor& x, c10::IntArrayRef shape,
                    const char* shape_name, const c10::Device& device) {
  const char* op = "norm";
  check_cuda(op, name, t, device);
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ",
              dtype_str(t.scalar_type()));
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must be ", shape_name, " = ", shape, ", got ", shape_str(t));
  Tensor r = t;
  if (r.scalar_type() != x.scalar_type() && r.scalar_type() != at::kFloat) r = r.to(at::kFloat);
  if (r.stride(-1) != 1) r = r.contiguous();
  return r;
}

void norm(const Tensor& x_in, const OptTensor& weight_in, const OptTensor& bias_in, const OptTensor& update_in,
          const OptTensor& gate_in, const OptTensor& shift_in, const OptTensor& scale_in, double eps, Tensor out,
          const OptTensor& residual_in) {
  const char* op = "norm";
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) >= 1, op, ": x must have a non-empty last dim C, got shape ",
              shape_str(x_in));
  const c10::Device device = x_in.device();
  check_cuda(op, "x", x_in, device);
  const duo::DType dtype = to_dtype(op, "x", x_in.scalar_type(), true);
  check_last_dim(op, "x", x_in);
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(C <= duo::kNormMaxC, op, ": C = ", C, " exceeds the ", duo::kNormMaxC, " the kernel supports");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const bool per_sample = gate_in.has_value() || shift_in.has_value() || scale_in.has_value();
  TORCH_CHECK(shift_in.has_value() == scale_in.has_value(), op, ": shift and scale come together (got ",
              shift_in.has_value() ? "shift" : "scale", " only)");
  TORCH_CHECK(!gate_in.has_value() || update_in.has_value(), op, ": gate needs update");
  TORCH_CHECK(update_in.has_value() == residual_in.has_value(), op,
              ": update and residual_out come together (the residual x + update is written to residual_out)");
  TORCH_CHECK(!per_sample || x_in.dim() == 3, op, ": with gate / shift / scale x must be [B, L, C], got shape ",
              shape_str(x_in));

  // Rows view [B, L, C]: 3-D as is, 1-D / 2-D as one sample, more dims flattened (copied if need be).
  const auto as_rows = [&](const Tensor& t) -> Tensor {
    if (t.dim() == 3) return t;
    if (t.dim() == 2) return t.unsqueeze(0);
    if (t.dim() == 1) return t.view({1, 1, C});
    return t.reshape({1, -1, C});
  };
  auto check_like_x = [&](const char* name, const Tensor& t) {
    check_cuda(op, name, t, device);
    TORCH_CHECK(t.scalar_type() == x_in.scalar_type(), op, ": ", name, " has dtype ", dtype_str(t.scalar_type()),
                ", x ", dtype_str(x_in.scalar_type()), "; they must match");
    TORCH_CHECK(t.sizes() == x_in.sizes(), op, ": ", name, " must have x's shape ", shape_str(x_in), ", got ",
                shape_str(t));
    check_last_dim(op, name, t);
  };
  check_like_x("out", out);
  if (update_in) check_like_x("update", *update_in);
  if (residual_in) check_like_x("residual_out", *residual_in);

  const Tensor x = as_rows(x_in);
  const int64_t B = x.size(0), L = x.size(1);
  Tensor weight, bias, gate, shift, scale, update;
  if (weight_in) weight = norm_operand("weight", *weight_in, x_in, {C}, "[C]", device);
  if (bias_in) bias = norm_operand("bias", *bias_in, x_in, {C}, "[C]", device);
  if (gate_in) gate = norm_operand("gate", *gate_in, x_in, {B, C}, "[B, C]", device);
  if (shift_in) shift = norm_operand("shift", *shift_in, x_in, {B, C}, "[B, C]", device);
  if (scale_in) scale = norm_operand("scale", *scale_in, x_in, {B, C}, "[B, C]", device);
  if (update_in) update = as_rows(*update_in);
  if (B * L == 0) return;
  const c10::cuda::CUDAGuard guard(device);

  // Outputs with more than 3 dims that cannot be viewed as rows get a temporary, copied back after.
  auto out_rows = [&](const Tensor& t) -> Tensor {
    if (t.dim() <= 3 || t.is_contiguous()) return as_rows(t);
    return at::empty({1, B * L, C}, t.options());
  };
  Tensor y = out_rows(out);
  Tensor r = residual_in ? out_rows(*residual_in) : Tensor();

  duo::NormParams p;
  p.x = x.data_ptr();
  p.out = y.data_ptr();
  p.dtype = dtype;
  p.B = B;
  p.L = L;
  p.C = C;
  p.stride_xb = x.stride(0);
  p.stride_xl = x.stride(1);
  p.stride_ob = y.stride(0);
  p.stride_ol = y.stride(1);
  if (update.defined()) {
    p.update = update.data_ptr();
    p.residual_out = r.data_ptr();
    p.stride_ub = update.stride(0);
    p.stride_ul = update.stride(1);
    p.stride_rb = r.stride(0);
    p.stride_rl = r.stride(1);
  }
  auto fill = [&](duo::NormOperand& o, const Tensor& t) {
    if (!t.defined()) return;
    o.ptr = t.data_ptr();
    o.dtype = t.scalar_type() == at::kFloat ? duo::DType::kF32 : dtype;
    o.stride_b = t.dim() == 2 ? t.stride(0) : 0;
  };
  fill(p.weight, weight);
  fill(p.bias, bias);
  fill(p.gate, gate);
  fill(p.shift, shift);
  fill(p.scale, scale);
  p.eps = static_cast<float>(eps);
  raise_if(op, duo::norm_fwd(p, stream_of(x)));
  if (!y.is_same(out) && y.data_ptr() != out.data_ptr()) out.copy_(y.view(out.sizes()));
  if (residual_in && r.data_ptr() != residual_in->data_ptr()) {
    Tensor dst = *residual_in;
    dst.copy_(r.view(dst.sizes()));
  }
}

// ------------------------------------------------------------------------------------------------
// exit_confidence(h [B, L, C], weight [C, K], bias [K], start, out [B] fp32)
// ------------------------------------------------------------------------------------------------

void exit_confidence(const Tensor& h, const Tensor& weight_in, const Tensor& bias, int64_t start, Tensor out) {
  const char* op = "exit_confidence";
  TORCH_CHECK(h.dim() == 3, op, ": h must be [B, L, C], got shape ", shape_str(h));
  const c10::Device device = h.device();
  check_cuda(op, "h", h, device);
  check_cuda(op, "weight", weight_in, device);
  check_cuda(op, "bias", bias, device);
  check_cuda(op, "out", out, device);
  const int64_t B = h.size(0), L = h.size(1), C = h.size(2);
  const duo::DType h_dtype = to_dtype(op, "h", h.scalar_type(), true);
  check_last_dim(op, "h", h);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == C, op, ": weight must be [C, K] with C = ", C, ", got ",
              shape_str(weight_in), " (a Linear(C, K).weight is [K, C]: pass its .t())");
  const int64_t K = weight_in.size(1);
  TORCH_CHECK(K >= 1 && C >= 1, op, ": need C >= 1 and K >= 1, got C = ", C, ", K = ", K);
  const duo::DType w_dtype = to_dtype(op, "weight", weight_in.scalar_type(), true);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == K, op, ": bias must be [K] = [", K, "], got ", shape_str(bias));
  const duo::DType b_dtype = to_dtype(op, "bias", bias.scalar_type(), true);
  TORCH_CHECK(0 <= start && start < L, op, ": start must be in [0, L) = [0, ", L, "), got ", start);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 1 && out.size(0) == B, op,
              ": out must be a float32 [B] = [", B, "] tensor, got ", dtype_str(out.scalar_type()), " ",
              shape_str(out));
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(device);

  duo::ExitParams p;
  p.h = h.data_ptr();
  p.h_dtype = h_dtype;
  p.weight = weight_in.data_ptr();
  p.w_dtype = w_dtype;
  p.bias = bias.data_ptr();
  p.bias_dtype = b_dtype;
  p.out = out.data_ptr<float>();
  p.B = B;
  p.L = L;
  p.C = C;
  p.K = K;
  p.start = start;
  p.stride_hb = h.stride(0);
  p.stride_hl = h.stride(1);
  p.stride_wc = weight_in.stride(0);
  p.stride_wk = weight_in.stride(1);
  p.stride_bias = bias.stride(0);
  p.stride_out = out.stride(0);
  // The tensor-core path reads w^T rows ([K, C], C contiguous) with 16-byte copies.
  Tensor wt;
  if (duo::exit_confidence_uses_mma(p) && !duo::exit_confidence_weight_ok_for_mma(p)) {
    wt = weight_in.t().contiguous();  // [K, C]
    p.weight = wt.data_ptr();
    p.stride_wc = 1;
    p.stride_wk = C;
  }
  const Tensor workspace = at::empty({std::max<int64_t>(duo::exit_confidence_workspace(p), 1)},
                                     h.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  raise_if(op, duo::exit_confidence_fwd(p, stream_of(h)));
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["torch"] = DUODIFF_TORCH_VERSION;
  const std::string cuda = DUODIFF_TORCH_CUDA;
  d["cuda"] = cuda == "none" ? pybind11::object(pybind11::none()) : pybind11::object(pybind11::str(cuda));
  d["archs"] = DUODIFF_CUDA_ARCHS;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "duodiff-fast CUDA kernels (csrc/): attention, norm family, exit confidence";
  m.def("build_info", &build_info, "torch / CUDA versions and archs this extension was built for");
  m.def("attention", &attention, "softmax(q k^T * scale) v: packed qkv [B, L, 3, H, D] -> out [B, L, H*D]",
        pybind11::arg("qkv"), pybind11::arg("scale"), pybind11::arg("out"));
  m.def("norm", &norm,
        "r = x [+ gate * update] -> residual_out; LN(r) [* weight] [+ bias] [* (1 + scale) + shift] -> out",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("update"),
        pybind11::arg("gate"), pybind11::arg("shift"), pybind11::arg("scale"), pybind11::arg("eps"),
        pybind11::arg("out"), pybind11::arg("residual_out"));
  m.def("exit_confidence", &exit_confidence,
        "mean over l >= start and k of sigmoid(h[b, l] @ weight + bias) -> out [B] float32", pybind11::arg("h"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("start"), pybind11::arg("out"));
}
