// Sparse backward for MISA's module-bearing Linear layers (paper Table 15, App. E.2).
//
// For y = x W^T + b with W of shape (out, in), flattened over batch and sequence
// (X2d: (N, in), dY2d: (N, out)):
//   dX = dY W                    needed by every module that has an active one below it
//   dW = dY2d^T X2d (out, in)    only for an active module, accumulated in fp32
//   db = sum_rows dY2d           likewise
// A frozen module runs only the first GEMM and keeps only W (a parameter) for it.
//
// The ops are device-generic ATen code. On CUDA, bf16/fp16 operands go straight into
// the fp32 buffer through addmm's out_dtype overload (cuBLAS/cublasLt with fp32 output;
// torch >= 2.9, the supported range for it); elsewhere (CPU, older torch) the operands are
// upcast to fp32 and addmm_'d into the buffer (misa_kernels warns about that on CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
#endif

// mm/addmm with out_dtype (bf16/fp16 operands, fp32 result) exist in recent torch only.
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 9)
#define MISA_HAS_OUT_DTYPE_GEMM 1
#endif

namespace misa {
namespace {

std::atomic<int64_t> weight_grad_gemms{0};
// Some torch versions reject an fp32 `self` next to bf16 operands in addmm.dtype_out;
// after the first refusal the GEMM-then-add path is used.
std::atomic<bool> fp32_out_gemm_refused{false};

at::Tensor rows(const at::Tensor& t) {
  return t.reshape({-1, t.size(-1)});
}

void check_weight_grad_args(const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK(grad_out.dim() >= 1 && input.dim() >= 1, "misa: grad_out and input must have at least one dim");
  TORCH_CHECK(grad_out.numel() / grad_out.size(-1) == input.numel() / input.size(-1),
              "misa: grad_out and input must have the same number of rows, got ", grad_out.sizes(),
              " and ", input.sizes());
  TORCH_CHECK(grad_out.device() == input.device(), "misa: grad_out and input on different devices");
}

void check_buffer(const at::Tensor& buffer, at::IntArrayRef shape, const at::Tensor& like, const char* name) {
  TORCH_CHECK(buffer.scalar_type() == at::kFloat, "misa: ", name, " must be float32, got ", buffer.scalar_type());
  TORCH_CHECK(buffer.sizes() == shape, "misa: ", name, " has shape ", buffer.sizes(), ", expected ", shape);
  TORCH_CHECK(buffer.device() == like.device(), "misa: ", name, " is on ", buffer.device(), ", expected ",
              like.device());
}

bool low_precision_on_cuda(const at::Tensor& buffer, const at::Tensor& operand) {
  const auto dtype = operand.scalar_type();
  return buffer.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf);
}

// buffer += a @ b with fp32 accumulation and no low-precision intermediate.
void addmm_fp32_(const at::Tensor& buffer, const at::Tensor& a, const at::Tensor& b) {
#ifdef MISA_HAS_OUT_DTYPE_GEMM
  if (low_precision_on_cuda(buffer, a)) {
    if (!fp32_out_gemm_refused.load(std::memory_order_relaxed)) {
      try {  // one GEMM with beta=1 into the fp32 buffer (cublasLt epilogue)
        at::Tensor out = buffer;
        at::addmm_out(out, buffer, a, b, at::kFloat);
        return;
      } catch (const c10::OutOfMemoryError&) {
        throw;  // not a refusal of the dtypes: the caller must see it, and the path stays on
      } catch (const c10::Error& err) {
        // Only a refusal of these dtypes switches to the fallback (for the whole process).
        if (std::string(err.what_without_backtrace()).find("dtype") == std::string::npos) {
          throw;
        }
        fp32_out_gemm_refused.store(true, std::memory_order_relaxed);
      }
    }
    // fp32 (out, in) temporary instead of upcasting the (rows, in) activations.
    buffer.add_(at::mm(a, b, at::kFloat));
    return;
  }
#endif
  buffer.addmm_(a.to(at::kFloat), b.to(at::kFloat));
}

}  // namespace

// dX = dY @ W for W in (out, in) layout; leading dims of grad_out are kept.
at::Tensor linear_input_grad(const at::Tensor& grad_out, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "misa: weight must be 2-D (out, in), got ", weight.sizes());
  TORCH_CHECK(grad_out.size(-1) == weight.size(0), "misa: grad_out last dim ", grad_out.size(-1),
              " does not match weight rows ", weight.size(0));
  return at::matmul(grad_out, weight);
}

// dW = dY2d^T X2d in the operands' dtype (an active weight without an fp32 buffer).
at::Tensor linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& input) {
  check_weight_grad_args(grad_out, input);
  weight_grad_gemms.fetch_add(1, std::memory_order_relaxed);
  return at::mm(rows(grad_out).t(), rows(input));
}

// grad_buffer (out, in) += dY2d^T X2d and bias_buffer (out) += sum_rows dY2d, in fp32.
void linear_weight_grad_accumulate_(const at::Tensor& grad_buffer, const at::Tensor& grad_out,
                                    const at::Tensor& input, const std::optional<at::Tensor>& bias_buffer) {
  check_weight_grad_args(grad_out, input);
  const auto dy = rows(grad_out);
  check_buffer(grad_buffer, {dy.size(1), input.size(-1)}, grad_out, "grad_buffer");
  if (bias_buffer.has_value()) {
    check_buffer(*bias_buffer, {dy.size(1)}, grad_out, "bias_buffer");
  }
  weight_grad_gemms.fetch_add(1, std::memory_order_relaxed);
  addmm_fp32_(grad_buffer, dy.t(), rows(input));
  if (bias_buffer.has_value()) {
    bias_buffer->add_(dy.sum(0, /*keepdim=*/false, at::kFloat));
  }
}

int64_t weight_grad_gemm_count() {
  return weight_grad_gemms.load(std::memory_order_relaxed);
}

void reset_weight_grad_gemm_count() {
  weight_grad_gemms.store(0, std::memory_order_relaxed);
}

}  // namespace misa

TORCH_LIBRARY(misa, m) {
  m.def("linear_input_grad(Tensor grad_out, Tensor weight) -> Tensor");
  m.def("linear_weight_grad(Tensor grad_out, Tensor input) -> Tensor");
  m.def(
      "linear_weight_grad_accumulate_(Tensor(a!) grad_buffer, Tensor grad_out, Tensor input, "
      "Tensor(b!)? bias_buffer) -> ()");
  m.def("weight_grad_gemm_count() -> int", &misa::weight_grad_gemm_count);
  m.def("reset_weight_grad_gemm_count() -> ()", &misa::reset_weight_grad_gemm_count);
}

// Implicit autograd: dX stays differentiable and works on every device through matmul.
TORCH_LIBRARY_IMPL(misa, CompositeImplicitAutograd, m) {
  m.impl("linear_input_grad", &misa::linear_input_grad);
}

// Device-generic ATen code; runs inside backward, where nothing needs its derivative.
TORCH_LIBRARY_IMPL(misa, CompositeExplicitAutograd, m) {
  m.impl("linear_weight_grad", &misa::linear_weight_grad);
  m.impl("linear_weight_grad_accumulate_", &misa::linear_weight_grad_accumulate_);
}

#ifdef TORCH_EXTENSION_NAME
// Lets setup.py build this file as the importable module misa_kernels._C; the JIT build
// loads it as a plain library and never calls this.
#define MISA_CONCAT_(a, b) a##b
#define MISA_CONCAT(a, b) MISA_CONCAT_(a, b)
#define MISA_STR_(a) #a
#define MISA_STR(a) MISA_STR_(a)
PyMODINIT_FUNC MISA_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, MISA_STR(TORCH_EXTENSION_NAME),
                               "MISA sparse-backward ops, registered as torch.ops.misa", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
