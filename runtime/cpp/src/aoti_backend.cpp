// The libtorch backend: AOTInductor packages of the predictor and step graphs (export/aoti.py), loaded with
// torch::inductor::AOTIModelPackageLoader. The packages are compiled at the bundle's tile/batch shape, so
// the driver feeds fixed-shape batches (padding the last one).
//
// The packages sit in <bundle>/aoti/ beside a sidecar aoti.json (the manifest format has no slot for them):
// each package's sha256, the torch version that compiled it, and the sha256 of the torch weights it was
// compiled from. A package whose hash differs is refused (modified or corrupted); one built from other
// weights than the bundle's, or by another torch major.minor, is refused as stale with the rebuild command.
// A package is a shared object that runs in this process: only load bundles you built or trust.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <sstream>

#include "backends.h"

namespace esrdf::detail {
namespace {

using nlohmann::json;

constexpr const char* kSidecar = "aoti/aoti.json";
constexpr int kSidecarVersion = 1;

std::string rebuild(const Bundle& bundle) { return reexport_hint(bundle, " --aoti"); }

json read_sidecar(const Bundle& bundle) {
  const std::string path = bundle.root + "/" + kSidecar;
  std::ifstream in(path);
  if (!in) {
    throw Error(ErrorCode::kNotFound, path + ": this bundle has no AOTInductor packages; " + rebuild(bundle));
  }
  std::stringstream text;
  text << in.rdbuf();
  json doc = json::parse(text.str(), nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || doc.value("format_version", 0) != kSidecarVersion) {
    throw Error(ErrorCode::kBadBundle, path + ": not a version-1 aoti.json; " + rebuild(bundle));
  }
  return doc;
}

void check_provenance(const Bundle& bundle, const json& doc) {
  const std::string path = bundle.root + "/" + kSidecar;
  const std::string torch_version = doc.at("torch_version").get<std::string>();
  const std::string here = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  if (torch_version.rfind(here + ".", 0) != 0) {
    throw Error(ErrorCode::kStale, path + ": packages compiled by torch " + torch_version + ", this library links "
                                          "libtorch " + here + "; " + rebuild(bundle));
  }
  const auto& weights = bundle.manifest.torch_weights;
  if (!weights || weights->sha256 != doc.at("torch_weights_sha256")) {
    throw Error(ErrorCode::kStale, path + ": packages were compiled from other weights than this bundle's "
                                          "torch/ weights; " + rebuild(bundle));
  }
  if (doc.at("device") != "cpu" || doc.at("precision") != "fp32") {
    throw Error(ErrorCode::kBackendUnavailable, path + ": packages for " + doc.at("device").dump() + " " +
                                                    doc.at("precision").dump() + "; this backend runs cpu fp32");
  }
}

at::Tensor wrap(const float* data, std::vector<int64_t> sizes) {
  // The packages only read their inputs: wrapping the caller's buffer avoids a copy.
  return at::from_blob(const_cast<float*>(data), sizes, at::TensorOptions().dtype(at::kFloat));
}

class AotiBackend final : public Backend {
 public:
  explicit AotiBackend(const Bundle& bundle) {
    const json doc = read_sidecar(bundle);
    try {
      check_provenance(bundle, doc);
      batch_ = doc.at("batch").get<int>();
      tile_ = doc.at("tile").get<int>();
      for (const auto& pkg : doc.at("packages")) load(bundle, pkg);
    } catch (const json::exception& exc) {
      throw Error(ErrorCode::kBadBundle, bundle.root + "/" + kSidecar + ": malformed (" + exc.what() + ")");
    }
    if (!predictor_ || !step_) {
      throw Error(ErrorCode::kBadBundle, bundle.root + "/" + kSidecar + ": needs a predictor and a step package");
    }
  }

  std::string name() const override { return "aoti"; }
  int fixed_batch() const override { return batch_; }
  int fixed_tile() const override { return tile_; }

 protected:
  void predictor(const BatchShape& s, const float* lr, float* coarse) override {
    run(*predictor_, {wrap(lr, {s.batch, s.channels, s.lr_height, s.lr_width})}, coarse, s.hr_numel());
  }

  void step(const BatchShape& s, const float* x_t, const float* cond, const float* t, const float* coefs,
            const float* noise, float* x_prev) override {
    const std::vector<int64_t> image{s.batch, s.channels, s.lr_height * s.scale, s.lr_width * s.scale};
    run(*step_, {wrap(x_t, image), wrap(cond, image), wrap(t, {s.batch}), wrap(coefs, {s.batch, 3}),
                 wrap(noise, image)},
        x_prev, s.hr_numel());
  }

 private:
  void load(const Bundle& bundle, const json& pkg) {
    const std::string role = pkg.at("role").get<std::string>();
    const std::string file = pkg.at("file").get<std::string>();
    if (file.empty() || file[0] == '/' || file.find("..") != std::string::npos) {
      throw Error(ErrorCode::kBadBundle, bundle.root + "/" + kSidecar + ": package path '" + file + "' leaves the bundle");
    }
    const std::string path = bundle.root + "/" + file;
    if (sha256_file(path) != pkg.at("sha256").get<std::string>()) {
      throw Error(ErrorCode::kHashMismatch,
                  path + ": sha256 does not match aoti.json (modified or corrupted); " + rebuild(bundle));
    }
    auto& slot = role == "predictor" ? predictor_ : step_;
    try {
      slot = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
    } catch (const std::exception& exc) {
      throw Error(ErrorCode::kStale, path + ": libtorch could not load this package (" + first_line(exc.what()) +
                                         "); " + rebuild(bundle));
    }
  }

  static std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

  static void run(torch::inductor::AOTIModelPackageLoader& loader, const std::vector<at::Tensor>& inputs,
                  float* out, int64_t numel) {
    std::vector<at::Tensor> outputs;
    try {
      outputs = loader.run(inputs);
    } catch (const std::exception& exc) {
      throw Error(ErrorCode::kBackendFailure, "AOTInductor package failed: " + first_line(exc.what()));
    }
    if (outputs.size() != 1 || outputs[0].numel() != numel) {
      throw Error(ErrorCode::kBackendFailure, "AOTInductor package returned an unexpected output shape");
    }
    const at::Tensor result = outputs[0].to(at::kFloat).contiguous();
    std::memcpy(out, result.data_ptr<float>(), sizeof(float) * static_cast<size_t>(numel));
  }

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> predictor_, step_;
  int batch_ = 0, tile_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_aoti_backend(const Bundle& bundle) { return std::make_unique<AotiBackend>(bundle); }

}  // namespace esrdf::detail
