// torch.ops.ard_kernels.kv_append / qkv_split_append / qkv_append: checks, then the launchers of kv_cache.cu.
//
// Built as a plain C++ extension so that it compiles against a CPU-only torch as well as a CUDA
// one: no c10/cuda header is used. The caller passes the CUDA stream (torch.cuda.current_stream()
// .cuda_stream, or -1 for "torch's current stream", looked up through c10's device-generic
// interface); the device is taken from the tensors. CPU tensors get a clear error; the fake
// (meta) implementations are registered from Python (ard_kernels/_ext.py).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "kv_cache.h"

namespace {

using at::Tensor;

// Error messages are assembled with std::string and std::to_string, never streamed. On the GPU
// image (torch 2.11+cu130; g++ 13.3 headers, GCC 14's libstdc++ at run time) a TORCH_CHECK whose
// message streamed an integer or a shape from this library through c10::str's ostringstream killed
// the process (SIGSEGV), while messages of strings and dtypes alone raised cleanly; the root cause was
// not pinned down there. TORCH_CHECK(cond, one std::string) passes the string through unstreamed.
std::string text(const char* s) { return s; }
std::string text(int64_t v) { return std::to_string(v); }
std::string text(at::ScalarType t) { return c10::toString(t); }
std::string text(const c10::Device& d) { return d.str(); }
std::string text(c10::IntArrayRef values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s + "]";
}

// "ard_kernels.<op>: " followed by the pieces, each converted by text().
template <typename... Pieces>
std::string message(const char* op, const Pieces&... pieces) {
  std::string s = std::string("ard_kernels.") + op + ": ";
  ((s += text(pieces)), ...);
  return s;
}

void check_cuda(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), message(op, "expected CUDA tensors; use the PyTorch path (", name, " is on ",
                                   t.device(), ")"));
  TORCH_CHECK(t.device() == like.device(), message(op, name, " is on ", t.device(), ", expected ", like.device()));
}

void check_float(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat,
              message(op, name, " must be bfloat16, float16 or float32, got ", dt));
  TORCH_CHECK(dt == like.scalar_type(), message(op, name, " has dtype ", dt, ", expected ", like.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), message(op, name, " must be contiguous (shape ", t.sizes(), ", strides ",
                                         t.strides(), ")"));
}

// Checks offset/status (their types and the host offset's range; their devices: check_devices) and
// returns the device pointer of the offset (nullptr when absent).
const int64_t* check_position(const char* op, const std::optional<Tensor>& offset, int64_t offset_host,
                              const Tensor& status, int64_t n, int64_t capacity) {
  TORCH_CHECK(status.scalar_type() == at::kInt && status.numel() >= 1 && status.is_contiguous(),
              message(op, "status must be a contiguous int32 tensor with at least 1 element, got ",
                      status.scalar_type(), " of shape ", status.sizes()));
  if (!offset.has_value()) {
    TORCH_CHECK_VALUE(offset_host >= 0 && offset_host + n <= capacity,
                      message(op, "appending ", n, " tokens at offset ", offset_host,
                              " overflows the cache capacity ", capacity));
    return nullptr;
  }
  TORCH_CHECK(offset->scalar_type() == at::kLong && offset->numel() == 1,
              message(op, "offset must be an int64 tensor with 1 element, got ", offset->scalar_type(),
                      " of shape ", offset->sizes()));
  return offset->data_ptr<int64_t>();
}

// Every tensor on the CUDA device of the first, after every other check.
void check_devices(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> tensors,
                   const std::optional<Tensor>& offset) {
  const Tensor& like = *tensors.begin()->second;
  for (const auto& [name, t] : tensors) check_cuda(op, name, *t, like);
  if (offset.has_value()) check_cuda(op, "offset", *offset, like);
}

// Shapes and dtypes of the caches; their device is checked by the caller (after every shape, so that
// a CPU build's tests reach these messages too).
void check_cache(const char* op, const Tensor& k_cache, const Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4, message(op, "k_cache must be (B, H, capacity, D), got shape ", k_cache.sizes()));
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(),
              message(op, "v_cache has shape ", v_cache.sizes(), ", expected k_cache's ", k_cache.sizes()));
  TORCH_CHECK(k_cache.size(3) % 8 == 0, message(op, "head dim D must be a multiple of 8, got ", k_cache.size(3)));
  check_float(op, "k_cache", k_cache, k_cache);
  check_float(op, "v_cache", v_cache, k_cache);
}

// stream == -1: torch's current stream on the tensors' device, asked through c10's device-generic
// interface (no CUDA header needed). Lets traced code (torch.compile) avoid baking a stream in.
int64_t resolve_stream(const char* op, int64_t stream, const Tensor& like) {
  if (stream != -1) return stream;
  try {
    const c10::Stream current = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(like.device());
    return reinterpret_cast<int64_t>(current.native_handle());
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, message(op, "this torch cannot report its current CUDA stream (", e.what_without_backtrace(),
                               "); pass stream=torch.cuda.current_stream().cuda_stream"));
  }
}

void raise_on_error(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, message(op, "CUDA launch failed: ", err ? err : ""));
}

void kv_append(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
               const std::optional<Tensor>& offset, int64_t offset_host, const Tensor& status, int64_t stream) {
  const char* op = "kv_append";
  check_cache(op, k_cache, v_cache);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == k_cache.size(0) && k.size(1) == k_cache.size(1) &&
                  k.size(3) == k_cache.size(3),
              message(op, "k must be (B, H, n, D) = (", k_cache.size(0), ", ", k_cache.size(1), ", n, ",
                      k_cache.size(3), "), got ", k.sizes()));
  TORCH_CHECK(v.sizes() == k.sizes(), message(op, "v has shape ", v.sizes(), ", expected k's ", k.sizes()));
  check_float(op, "k", k, k_cache);
  check_float(op, "v", v, k_cache);
  const int64_t n = k.size(2), capacity = k_cache.size(2);
  const int64_t* off = check_position(op, offset, offset_host, status, n, capacity);
  check_devices(op, {{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"k", &k}, {"v", &v}, {"status", &status}},
                offset);
  raise_on_error(op, ard_kv_append_launch(k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(), off,
                                          offset_host, status.data_ptr<int32_t>(), k.size(0) * k.size(1), n,
                                          capacity, k.size(3) * k.element_size(), k_cache.get_device(),
                                          resolve_stream(op, stream, k_cache)));
}

// Checks of qkv_split_append and qkv_append; returns the device pointer of the offset (nullptr when absent).
const int64_t* check_qkv(const char* op, const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                         const std::optional<Tensor>& offset, int64_t offset_host, const Tensor& status,
                         int64_t num_heads) {
  check_cache(op, k_cache, v_cache);
  TORCH_CHECK(num_heads == k_cache.size(1),
              message(op, "num_heads is ", num_heads, ", expected the cache's H = ", k_cache.size(1)));
  const int64_t b = k_cache.size(0), d = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(0) == b && qkv.size(2) == 3 * num_heads * d,
              message(op, "qkv must be (B, n, 3·H·D) = (", b, ", n, ", 3 * num_heads * d, "), got ", qkv.sizes()));
  check_float(op, "qkv", qkv, k_cache);
  const int64_t* off = check_position(op, offset, offset_host, status, qkv.size(1), k_cache.size(2));
  check_devices(op, {{"qkv", &qkv}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"status", &status}}, offset);
  return off;
}

// q (nullptr: not written) and the caches from qkv, after check_qkv.
void launch_qkv(const char* op, const Tensor& qkv, void* q, const Tensor& k_cache, const Tensor& v_cache,
                const int64_t* off, int64_t offset_host, const Tensor& status, int64_t num_heads, int64_t stream) {
  raise_on_error(op, ard_qkv_split_append_launch(qkv.data_ptr(), q, k_cache.data_ptr(), v_cache.data_ptr(), off,
                                                 offset_host, status.data_ptr<int32_t>(), k_cache.size(0),
                                                 qkv.size(1), num_heads, k_cache.size(2),
                                                 k_cache.size(3) * qkv.element_size(), k_cache.get_device(),
                                                 resolve_stream(op, stream, k_cache)));
}

Tensor qkv_split_append(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                        const std::optional<Tensor>& offset, int64_t offset_host, const Tensor& status,
                        int64_t num_heads, int64_t stream) {
  const char* op = "qkv_split_append";
  const int64_t* off = check_qkv(op, qkv, k_cache, v_cache, offset, offset_host, status, num_heads);
  Tensor q = at::empty({k_cache.size(0), num_heads, qkv.size(1), k_cache.size(3)}, qkv.options());
  launch_qkv(op, qkv, q.data_ptr(), k_cache, v_cache, off, offset_host, status, num_heads, stream);
  return q;
}

// qkv_split_append without q: the caller reads q in place, in qkv (2/3 of the bytes moved).
void qkv_append(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, const std::optional<Tensor>& offset,
                int64_t offset_host, const Tensor& status, int64_t num_heads, int64_t stream) {
  const char* op = "qkv_append";
  const int64_t* off = check_qkv(op, qkv, k_cache, v_cache, offset, offset_host, status, num_heads);
  launch_qkv(op, qkv, nullptr, k_cache, v_cache, off, offset_host, status, num_heads, stream);
}

}  // namespace

// FRAGMENT, not TORCH_LIBRARY: the Triton ops of ard_kernels.ops live in the same namespace and
// are registered from Python; a fragment never competes with another definition of the library.
TORCH_LIBRARY_FRAGMENT(ard_kernels, m) {
  m.def(
      "kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor? offset, int offset_host, "
      "Tensor(c!) status, int stream) -> ()");
  m.def(
      "qkv_split_append(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? offset, int offset_host, "
      "Tensor(c!) status, int num_heads, int stream) -> Tensor");
  m.def(
      "qkv_append(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? offset, int offset_host, "
      "Tensor(c!) status, int num_heads, int stream) -> ()");
}

// The same function serves CPU, where (after the shape and dtype checks) it raises the "use the
// PyTorch path" error.
TORCH_LIBRARY_IMPL(ard_kernels, CUDA, m) {
  m.impl("kv_append", &kv_append);
  m.impl("qkv_split_append", &qkv_split_append);
  m.impl("qkv_append", &qkv_append);
}

TORCH_LIBRARY_IMPL(ard_kernels, CPU, m) {
  m.impl("kv_append", &kv_append);
  m.impl("qkv_split_append", &qkv_split_append);
  m.impl("qkv_append", &qkv_append);
}

// A minimal Python module, so that `import ard_kernels._C` loads the library and runs the
// registrations above; it exports nothing else.
static PyModuleDef ard_kernels_c_module = {PyModuleDef_HEAD_INIT, "_C", "ard_kernels CUDA ops (torch.ops.ard_kernels)",
                                           -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ard_kernels_c_module); }
