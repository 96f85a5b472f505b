// Internal: the factories of the compiled-in backends (open_backend in backend.cpp picks one by name).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "esrdf/esrdf.h"

namespace esrdf::detail {

std::string sha256_bytes(const void* data, size_t size);  // lowercase hex (sha256.cpp)

#ifdef ESRDF_HAVE_AOTI
std::unique_ptr<Backend> make_aoti_backend(const Bundle& bundle);
#endif
#ifdef ESRDF_HAVE_OPENVINO
// name: "openvino" or "openvino:<options>" (openvino_backend.cpp lists them).
std::unique_ptr<Backend> make_openvino_backend(const Bundle& bundle, const std::string& name);
#endif
#ifdef ESRDF_HAVE_TENSORRT
std::unique_ptr<Backend> make_tensorrt_backend(const Bundle& bundle);
#endif

}  // namespace esrdf::detail
