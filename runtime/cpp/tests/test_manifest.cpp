// Manifest decoding and hash checks on a hand-made bundle (runs without Python): a tampered file is refused
// with ErrorCode::kHashMismatch and a message naming it, through the C++ API and the C API.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "check.h"
#include "esrdf/esrdf_c.h"

namespace fs = std::filesystem;

namespace {

const char* kAbcSha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";  // FIPS 180-2 "abc"

std::string tensor(const std::string& name) { return R"({"name": ")" + name + R"(", "dims": ["batch"], "dtype": "float32"})"; }

std::string graph(const std::string& role, const std::string& file) {
  const bool step = role == "step";
  const std::string inputs = step ? tensor("x_t") + "," + tensor("cond") + "," + tensor("t") + "," + tensor("coefs") +
                                        "," + tensor("noise")
                                  : tensor("lr");
  return R"({"role": ")" + role + R"(", "precision": "fp32", "file": ")" + file + R"(", "sha256": ")" + kAbcSha256 +
         R"(", "inputs": [)" + inputs + R"(], "outputs": [)" + tensor(step ? "x_prev" : "coarse") + R"(], "opset": 18})";
}

std::string manifest_text(const std::string& extra = "", int version = 2) {
  return R"({"format_version": )" + std::to_string(version) + extra + R"(, "model_name": "hand", "scale": 4,
    "channels": 3, "hr_multiple_of": 4, "value_range": [-1.0, 1.0],
    "schedule": {"kind": "linear", "timesteps": 3, "alphas_cumprod": [0.9, 0.5, 0.1]},
    "graphs": [)" + graph("predictor", "predictor.onnx") + "," + graph("step", "step.onnx") + R"(],
    "export": {"checkpoint": "ckpt/", "tile": 8, "batch": 2}, "engines": [], "parity": {},
    "torch_weights": null, "provenance": {"opset": 18}, "model_config": {}})";
}

std::string replaced(std::string text, const std::string& from, const std::string& to) {
  return text.replace(text.find(from), from.size(), to);
}

void write(const fs::path& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

void decodes_a_valid_manifest() {
  const auto m = esrdf::parse_manifest(manifest_text());
  CHECK(m.scale == 4 && m.lr_multiple_of() == 1 && m.alphas_cumprod.size() == 3);
  CHECK(m.exported.tile == 8 && m.exported.batch == 2 && m.exported.checkpoint == "ckpt/" && !m.torch_weights);
  CHECK(m.graph("step", "fp32") != nullptr && !m.graph("step", "fp16"));
}

// std of x_T under the matched prior for the hand schedule, as Python's json writes it (shortest repr)
const char* kMatched = R"(, "sampling": {"sampler": "ddim", "steps": 2, "eta": 0.5, "prior": "matched",
    "init_noise_std": 0.9486832980505138})";

void reads_the_sampling_section() {
  using esrdf::ErrorCode;
  const auto m = esrdf::parse_manifest(manifest_text(kMatched));
  CHECK(m.sampling && m.sampling->steps == 2 && m.sampling->eta == 0.5 && m.sampling->prior == esrdf::Prior::kMatched);
  CHECK(m.sampling_defaults().init_noise_std == std::sqrt(1.0 - 0.1));
  // Without the section (an older bundle) and with null: the built-in defaults, min(50, T) DDIM steps.
  for (const std::string& extra : {std::string(), std::string(R"(, "sampling": null)")}) {
    const auto old = esrdf::parse_manifest(manifest_text(extra));
    const auto d = old.sampling_defaults();
    CHECK(!old.sampling && d.steps == 3 && d.eta == 0.0 && d.prior == esrdf::Prior::kMatched &&
          d.sampler == esrdf::Sampler::kDdim && d.init_noise_std == std::sqrt(0.9));
  }
  CHECK_ERROR(esrdf::parse_manifest(manifest_text(replaced(kMatched, "0.9486832980505138", "1.0"))),
              ErrorCode::kBadBundle, "sampling.init_noise_std");
  CHECK_ERROR(esrdf::parse_manifest(manifest_text(replaced(kMatched, R"("steps": 2)", R"("steps": 9)"))),
              ErrorCode::kBadBundle, "sampling.steps");
  CHECK_ERROR(esrdf::parse_manifest(manifest_text(replaced(kMatched, "matched", "uniform"))), ErrorCode::kBadBundle,
              "sampling.prior");
  CHECK_ERROR(esrdf::parse_manifest(manifest_text(replaced(kMatched, R"("eta": 0.5, )", ""))), ErrorCode::kBadBundle,
              "missing key(s) [ eta ]");
}

void refuses_malformed_manifests() {
  using esrdf::ErrorCode;
  CHECK_ERROR(esrdf::parse_manifest("{not json"), ErrorCode::kBadBundle, "not valid JSON");
  CHECK_ERROR(esrdf::parse_manifest(manifest_text("", 1)), ErrorCode::kBadBundle, "this runtime reads version 2");
  CHECK_ERROR(esrdf::parse_manifest(manifest_text(R"(, "surprise": 1)")), ErrorCode::kBadBundle, "surprise");
  std::string wrong_io = manifest_text();
  wrong_io.replace(wrong_io.find("\"lr\""), 4, "\"img\"");
  CHECK_ERROR(esrdf::parse_manifest(wrong_io), ErrorCode::kBadBundle, "graph contract");
  std::string rising = manifest_text();
  rising.replace(rising.find("0.5, 0.1"), 8, "0.5, 0.7");
  CHECK_ERROR(esrdf::parse_manifest(rising), ErrorCode::kBadBundle, "non-increasing");
  const std::string no_tile = replaced(manifest_text(), R"("tile": 8, )", "");
  CHECK_ERROR(esrdf::parse_manifest(no_tile), ErrorCode::kBadBundle, "missing key(s) [ tile ]");
}

std::string with_torch_weights(const std::string& text) {
  return replaced(text, R"("torch_weights": null)",
                  std::string(R"("torch_weights": {"file": "torch/model.safetensors", "sha256": ")") + kAbcSha256 +
                      R"("})");
}

void refuses_tampered_and_missing_files(const fs::path& dir) {
  using esrdf::ErrorCode;
  write(dir / "manifest.json", manifest_text());
  write(dir / "predictor.onnx", "abc");
  write(dir / "step.onnx", "abc");
  CHECK(esrdf::load_bundle(dir.string()).manifest.model_name == "hand");
  write(dir / "step.onnx", "abd");  // one byte changed
  CHECK_ERROR(esrdf::load_bundle(dir.string()), ErrorCode::kHashMismatch, "step.onnx: sha256 does not match");
  CHECK(esrdf::load_bundle(dir.string(), /*verify=*/false).manifest.graphs.size() == 2);

  esrdf_handle* handle = reinterpret_cast<esrdf_handle*>(0x1);  // must be reset to NULL on failure
  char err[256];
  const int rc = esrdf_open(dir.c_str(), "aoti", &handle, err, sizeof err);
  CHECK_MSG(rc == ESRDF_ERR_HASH_MISMATCH && std::string(err).find("step.onnx") != std::string::npos, err);
  CHECK(handle == nullptr);
  char tiny[12];  // messages are truncated, never overflow
  esrdf_open(dir.c_str(), "aoti", &handle, tiny, sizeof tiny);
  CHECK(std::string(tiny).size() == sizeof tiny - 1);

  // The torch weights are hash-checked like the graphs.
  write(dir / "step.onnx", "abc");
  write(dir / "manifest.json", with_torch_weights(manifest_text()));
  fs::create_directories(dir / "torch");
  write(dir / "torch" / "model.safetensors", "abc");
  CHECK(esrdf::load_bundle(dir.string()).manifest.torch_weights->file == "torch/model.safetensors");
  write(dir / "torch" / "model.safetensors", "abd");
  CHECK_ERROR(esrdf::load_bundle(dir.string()), ErrorCode::kHashMismatch, "model.safetensors: sha256 does not match");

  // A version-1 bundle: one line, naming the re-export command with the checkpoint it came from.
  write(dir / "manifest.json",
        replaced(manifest_text("", 1), R"("export": {"checkpoint": "ckpt/")", R"("export_info": {"checkpoint": "old/ckpt")"));
  CHECK_ERROR(esrdf::load_bundle(dir.string()), ErrorCode::kBadBundle,
              "reads version 2; re-export with: esrdf-export --ckpt old/ckpt --out " + dir.string() + " --force");
  write(dir / "manifest.json", manifest_text());

  fs::remove(dir / "step.onnx");
  CHECK_ERROR(esrdf::load_bundle(dir.string()), ErrorCode::kNotFound, "step.onnx: listed in the manifest but missing");
  CHECK_ERROR(esrdf::load_bundle((dir / "nowhere").string()), ErrorCode::kNotFound, "not an ESRDF bundle");
}

}  // namespace

int main() {
  decodes_a_valid_manifest();
  reads_the_sampling_section();
  refuses_malformed_manifests();
  const fs::path dir = fs::temp_directory_path() / ("esrdf-manifest-test-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  refuses_tampered_and_missing_files(dir);
  fs::remove_all(dir);
  return check::finish("test_manifest");
}
