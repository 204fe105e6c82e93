// taylorshift._C: importing it registers the `taylorshift::` operators
// (their TORCH_LIBRARY blocks live in the other translation units); the
// pybind11 functions below expose build facts and the cost model.
#include <torch/extension.h>
#include <torch/version.h>

#include "taylorshift.h"

#ifndef TAYLORSHIFT_CUDA_ARCH_LIST
#define TAYLORSHIFT_CUDA_ARCH_LIST ""
#endif

namespace {

c10::DeviceType device_type(const std::string& device) {
  return c10::Device(device).type();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of taylorshift and facts about their build";
  m.attr("torch_version") = TORCH_VERSION;
#ifdef TAYLORSHIFT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_arch_list") = std::string(TAYLORSHIFT_CUDA_ARCH_LIST);
  m.def(
      "crossover",
      [](int64_t head_dim, const std::string& device, int order) {
        return taylorshift::crossover(head_dim, head_dim, device_type(device),
                                      order);
      },
      "Sequence length (M = N, e = d) from which mode='auto' picks the "
      "efficient algorithm on this device type, for Taylor order `order`",
      py::arg("head_dim"), py::arg("device") = "cpu", py::arg("order") = 2);
  m.def(
      "flops",
      [](const std::string& mode, int64_t queries, int64_t keys,
         int64_t head_dim, int64_t value_dim, bool backward, int order) {
        TORCH_CHECK_VALUE(mode == "direct" || mode == "efficient",
                          "taylorshift: flops counts mode \"direct\" or "
                          "\"efficient\", got \"",
                          mode, "\"");
        TORCH_CHECK_VALUE(order >= 1, "taylorshift: order must be >= 1, got ",
                          order);
        return taylorshift::flops(mode == "efficient", queries, keys, head_dim,
                                  value_dim, backward, order);
      },
      "FLOPs of one (batch, head) of an algorithm (docs/math.md §4)",
      py::arg("mode"), py::arg("queries"), py::arg("keys"), py::arg("head_dim"),
      py::arg("value_dim"), py::arg("backward") = true, py::arg("order") = 2);
  m.def(
      "prefer_efficient",
      [](int64_t queries, int64_t keys, int64_t head_dim, int64_t value_dim,
         const std::string& device, int order) {
        return taylorshift::prefer_efficient(queries, keys, head_dim, value_dim,
                                             device_type(device), order);
      },
      "Whether mode='auto' picks the efficient algorithm for these sizes",
      py::arg("queries"), py::arg("keys"), py::arg("head_dim"),
      py::arg("value_dim"), py::arg("device") = "cpu", py::arg("order") = 2);
}
