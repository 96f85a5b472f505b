// The exported tiny bundle with AOTInductor packages (ESRDF_TEST_BUNDLE, set by tests/test_cpp_runtime.py):
// it opens and upscales deterministically per seed on every compiled-in CPU backend, and a tampered or stale
// copy is refused with a code and a message naming the file.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "check.h"
#include "esrdf/esrdf_c.h"

namespace fs = std::filesystem;

namespace {

void flip_byte(const fs::path& file, std::streamoff offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(offset);
  char byte = 0;
  f.get(byte);
  f.seekp(offset);
  f.put(static_cast<char>(byte ^ 0x5a));
}

// A structured 12x10 image (gradients and texture, not flat or random): a smoke test of the whole loop.
std::vector<uint8_t> pattern(int w, int h) {
  std::vector<uint8_t> rgb(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c)
        rgb[(static_cast<size_t>(y) * w + x) * 3 + c] = uint8_t(128 + 100 * std::sin(0.5 * x + c) * std::cos(0.3 * y));
  return rgb;
}

void opens_and_upscales(const fs::path& bundle, const std::string& backend) {
  esrdf::UpscalerOptions options;
  options.backend = backend;
  esrdf::Upscaler upscaler(bundle.string(), options);
  CHECK_MSG(upscaler.backend_name().rfind(backend, 0) == 0 && upscaler.batch() > 0 && upscaler.tile() > 0, backend);
  const auto rgb = pattern(12, 10);
  esrdf::SampleOptions opts;
  opts.steps = 3;
  opts.eta = 1.0;
  opts.seed = 3;
  const auto a = upscaler.upscale_rgb8(rgb.data(), 12, 10, opts);
  const auto b = upscaler.upscale_rgb8(rgb.data(), 12, 10, opts);
  opts.seed = 4;
  const auto c = upscaler.upscale_rgb8(rgb.data(), 12, 10, opts);
  const size_t n = static_cast<size_t>(12) * upscaler.scale() * 10 * upscaler.scale() * 3;
  CHECK(a.size() == n && a == b);  // same seed, same image
  CHECK(a != c);                   // eta = 1 draws noise each step: another seed, another image
}

int open_status(const fs::path& bundle, std::string& message) {
  esrdf_handle* handle = nullptr;
  char err[1024];
  const int rc = esrdf_open(bundle.c_str(), "aoti", &handle, err, sizeof err);
  esrdf_close(handle);
  message = err;
  return rc;
}

void refuses_tampering(const fs::path& bundle) {
  std::string msg;
  flip_byte(bundle / "aoti" / "step.pt2", 4096);
  CHECK_MSG(open_status(bundle, msg) == ESRDF_ERR_HASH_MISMATCH && msg.find("aoti/step.pt2") != std::string::npos, msg);
  CHECK_MSG(msg.find("--aoti") != std::string::npos, msg);  // says how to rebuild
  flip_byte(bundle / "aoti" / "step.pt2", 4096);             // restored
  CHECK_MSG(open_status(bundle, msg) == ESRDF_OK, msg);

  flip_byte(bundle / "predictor.onnx", 100);
  CHECK_MSG(open_status(bundle, msg) == ESRDF_ERR_HASH_MISMATCH && msg.find("predictor.onnx") != std::string::npos, msg);
  flip_byte(bundle / "predictor.onnx", 100);

  const fs::path sidecar = bundle / "aoti" / "aoti.json";
  std::ifstream in(sidecar);
  nlohmann::json doc = nlohmann::json::parse(in);
  in.close();
  doc["torch_weights_sha256"] = std::string(64, '0');  // packages from other weights than the bundle's
  std::ofstream(sidecar) << doc.dump();
  CHECK_MSG(open_status(bundle, msg) == ESRDF_ERR_STALE && msg.find("other weights") != std::string::npos, msg);

  fs::remove_all(bundle / "aoti");
  CHECK_MSG(open_status(bundle, msg) == ESRDF_ERR_NOT_FOUND && msg.find("no AOTInductor packages") != std::string::npos,
            msg);
}

}  // namespace

int main() {
  const char* source = std::getenv("ESRDF_TEST_BUNDLE");
  if (source == nullptr || !*source) return check::skip("ESRDF_TEST_BUNDLE is not set (tests/test_cpp_runtime.py sets it)");
  const auto backends = esrdf::available_backends();
  const bool aoti = std::find(backends.begin(), backends.end(), "aoti") != backends.end();
  const bool openvino = std::find(backends.begin(), backends.end(), "openvino") != backends.end();
  if (!aoti && !openvino) return check::skip("no CPU backend compiled in (neither Torch nor OpenVINO found by CMake)");
  const fs::path copy = fs::temp_directory_path() / ("esrdf-bundle-test-" + std::to_string(::getpid()));
  fs::remove_all(copy);
  fs::copy(source, copy, fs::copy_options::recursive);
  if (openvino) opens_and_upscales(copy, "openvino");
  if (aoti) {
    opens_and_upscales(copy, "aoti");
    refuses_tampering(copy);  // the aoti/ packages' hashes and provenance
  }
  fs::remove_all(copy);
  return check::finish("test_bundle");
}
