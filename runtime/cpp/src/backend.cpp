// The backend-independent sampler loop over one batch of tiles, and backend selection by name.
#include <utility>

#include "backends.h"
#include "esrdf/esrdf.h"

namespace esrdf {

void scale_initial_noise(const StepPlan& plan, float* x, size_t n) {
  if (plan.init_noise_std == 1.0) return;
  const auto s = static_cast<float>(plan.init_noise_std);  // numpy: float32 field * np.float32(std)
  for (size_t i = 0; i < n; ++i) x[i] *= s;
}

// c = predictor(lr); x = s z_0 (s = plan.init_noise_std); x = step(x, c, t_k, coefs_k, z_{k+1}) for k = 0..N-1; hr = c + x
// (paper Section 3, Eq. 6-7 in the affine form of the step graph; the residual formulation of Section 4).
void Backend::sample_batch(const BatchShape& shape, const float* lr, const StepPlan& plan,
                           const NoiseFill& noise, float* hr) {
  const auto n = static_cast<size_t>(shape.hr_numel());
  std::vector<float> coarse(n), x(n), x_next(n), z(n);
  std::vector<float> t(static_cast<size_t>(shape.batch)), coefs(static_cast<size_t>(shape.batch) * 3);
  predictor(shape, lr, coarse.data());
  noise(0, x.data());
  scale_initial_noise(plan, x.data(), n);
  for (int k = 0; k < plan.num_steps(); ++k) {
    for (int b = 0; b < shape.batch; ++b) {  // every tile of the batch is at the same step
      t[b] = plan.t[k];
      for (int j = 0; j < 3; ++j) coefs[static_cast<size_t>(b) * 3 + j] = plan.coefs[k][j];
    }
    noise(k + 1, z.data());
    step(shape, x.data(), coarse.data(), t.data(), coefs.data(), z.data(), x_next.data());
    std::swap(x, x_next);
  }
  for (size_t i = 0; i < n; ++i) hr[i] = coarse[i] + x[i];
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names;
#ifdef ESRDF_HAVE_OPENVINO
  names.push_back("openvino");
#endif
#ifdef ESRDF_HAVE_AOTI
  names.push_back("aoti");
#endif
#ifdef ESRDF_HAVE_TENSORRT
  names.push_back("tensorrt");
#endif
  return names;
}

std::string default_backend() {
#ifdef ESRDF_HAVE_OPENVINO
  return "openvino";  // no libtorch, no per-bundle compile: the bundle's ONNX graphs as they are
#else
  return "aoti";
#endif
}

namespace {

bool is_openvino(const std::string& name) { return name == "openvino" || name.rfind("openvino:", 0) == 0; }

std::string how_to_build(const std::string& name) {
  if (name == "aoti") {
    return "configure CMake with CMAKE_PREFIX_PATH=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')";
  }
  if (name == "openvino") {
    return "pip install openvino, then configure CMake with -DOpenVINO_DIR=$(python -c 'import openvino, "
           "os; print(os.path.dirname(openvino.__file__))')/cmake";
  }
  return "install TensorRT 10 and the CUDA toolkit, then reconfigure";
}

}  // namespace

std::unique_ptr<Backend> open_backend(const Bundle& bundle, const std::string& requested) {
  const std::string name = requested.empty() ? default_backend() : requested;
#ifdef ESRDF_HAVE_AOTI
  if (name == "aoti") return detail::make_aoti_backend(bundle);
#endif
#ifdef ESRDF_HAVE_OPENVINO
  if (is_openvino(name)) return detail::make_openvino_backend(bundle, name);
#endif
#ifdef ESRDF_HAVE_TENSORRT
  if (name == "tensorrt") return detail::make_tensorrt_backend(bundle);
#endif
  std::string have;
  for (const auto& b : available_backends()) have += (have.empty() ? "" : ", ") + b;
  const std::string family = is_openvino(name) ? "openvino" : name;
  if (family == "aoti" || family == "openvino" || family == "tensorrt") {
    throw Error(ErrorCode::kBackendUnavailable,
                "backend '" + name + "' was not compiled into this library (built with: " +
                    (have.empty() ? std::string("none") : have) + "); " + how_to_build(family));
  }
  throw Error(ErrorCode::kInvalidArgument, "unknown backend '" + name + "'; expected openvino, aoti or tensorrt");
}

}  // namespace esrdf
