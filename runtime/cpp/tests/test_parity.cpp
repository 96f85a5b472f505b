// C++ runtime vs the Python runtime on data tests/test_cpp_runtime.py wrote into ESRDF_TEST_DATA:
//   noise:   whole fields from numpy's esrdf.runtime.noise, compared bit for bit (ulp distance reported);
//   plans:   t and coefs from esrdf.runtime.sampling.plan_steps on the bundle's schedule, bit for bit;
//   upscale: a real photo through esrdf.runtime.Upscaler (onnxruntime, fp32) with the same seed, and so the
//            same noise field, against every compiled-in CPU backend: the fp32 ones (aoti, openvino) must
//            meet max |C++ - Python| <= cases["max_abs_01"] on [0, 1] images (END_TO_END_FP32), and
//            openvino:bf16, where the CPU has bf16, PSNR >= cases["bf16_min_psnr_db"] against the same
//            fp32 reference.
// Figures and the output files of each backend go to results.json for the pytest driver to report.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "check.h"

using nlohmann::json;

namespace {

int64_t ulp_distance(float a, float b) {
  int32_t ia = 0, ib = 0;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia < 0) ia = INT32_MIN - ia;  // map the float order onto the integers
  if (ib < 0) ib = INT32_MIN - ib;
  return std::llabs(int64_t(ia) - int64_t(ib));
}

json compare_noise(const std::string& dir, const json& c) {
  const auto want = check::read_array<float>(dir + "/" + c["file"].get<std::string>());
  std::vector<float> got(want.size());
  esrdf::noise_field(c["seed"], c["step"], c["y0"], c["x0"], c["height"], c["width"], c["channels"], got.data());
  int64_t differing = 0, max_ulp = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const int64_t d = ulp_distance(got[i], want[i]);
    differing += d != 0;
    max_ulp = std::max(max_ulp, d);
  }
  CHECK_MSG(got.size() == size_t(c["channels"].get<int64_t>() * c["height"].get<int64_t>() * c["width"].get<int64_t>()),
            "noise reference has the wrong size");
  CHECK_MSG(max_ulp <= 1, "noise differs from numpy by " + std::to_string(max_ulp) + " ulp");
  return {{"values", got.size()}, {"differing", differing}, {"max_ulp", max_ulp}};
}

json compare_plan(const std::string& dir, const esrdf::Manifest& m, const json& c) {
  const auto plan = esrdf::plan_steps(m.alphas_cumprod, esrdf::parse_sampler(c["sampler"]), c["steps"], c["eta"],
                                      esrdf::parse_prior(c["prior"]));
  const auto t = check::read_array<float>(dir + "/" + c["t_file"].get<std::string>());
  const auto coefs = check::read_array<float>(dir + "/" + c["coefs_file"].get<std::string>());
  const bool same = t.size() == plan.t.size() && coefs.size() == 3 * plan.coefs.size() &&
                    std::memcmp(t.data(), plan.t.data(), 4 * t.size()) == 0 &&
                    std::memcmp(coefs.data(), plan.coefs.data(), 4 * coefs.size()) == 0 &&
                    plan.init_noise_std == c["init_noise_std"].get<double>();
  CHECK_MSG(same, "step plan " + c.dump() + " differs from Python's");
  return {{"steps", plan.num_steps()}, {"bit_exact", same}};
}

struct Bar {
  double max_abs_01 = 0.0;    // fp32 backends
  double min_psnr_db = 0.0;   // bf16: judged on PSNR instead (its max abs is ~1e-2 by design)
};

json compare_upscale(const std::string& dir, esrdf::Upscaler& upscaler, const json& c, const Bar& bar,
                     const std::string& prefix) {
  const int w = c["width"], h = c["height"], s = upscaler.scale();
  const auto rgb = check::read_array<uint8_t>(dir + "/" + c["input"].get<std::string>());
  const auto want = check::read_array<float>(dir + "/" + c["expected"].get<std::string>());
  esrdf::SampleOptions opts;
  opts.steps = c["steps"];  // 0, and each null below: the bundle's default
  if (!c["sampler"].is_null()) opts.sampler = esrdf::parse_sampler(c["sampler"]);
  if (!c["eta"].is_null()) opts.eta = c["eta"].get<double>();
  if (!c["prior"].is_null()) opts.prior = esrdf::parse_prior(c["prior"]);
  opts.seed = c["seed"];
  const auto lr = esrdf::rgb8_to_model_range(rgb.data(), w, h);
  const auto got = upscaler.upscale_chw(lr.data(), h, w, opts);
  CHECK(got.size() == want.size() && got.size() == size_t(3) * h * s * w * s);
  double max_abs = 0.0, sum_abs = 0.0, sum_sq = 0.0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double d = std::abs(double(got[i]) - double(want[i])) / 2.0;  // on [0, 1] images
    max_abs = std::max(max_abs, d);
    sum_abs += d;
    sum_sq += d * d;
  }
  const double mse = sum_sq / double(got.size());
  const double psnr_db = mse > 0.0 ? 10.0 * std::log10(1.0 / mse) : 999.0;
  const std::string output = prefix + c["output"].get<std::string>();
  const std::string output_u8 = prefix + c["output_u8"].get<std::string>();
  check::write_array(dir + "/" + output, got);
  const auto u8 = esrdf::model_range_to_rgb8(got.data(), w * s, h * s);
  check::write_array(dir + "/" + output_u8, u8);
  const std::string what = upscaler.backend_name() + " " + c["name"].get<std::string>();
  if (bar.min_psnr_db > 0.0) CHECK_MSG(psnr_db >= bar.min_psnr_db, what + ": PSNR " + std::to_string(psnr_db));
  else CHECK_MSG(max_abs <= bar.max_abs_01, what + ": max abs " + std::to_string(max_abs));
  return {{"max_abs_01", max_abs}, {"mean_abs_01", sum_abs / double(got.size())}, {"psnr_db", psnr_db},
          {"output", output}, {"output_u8", output_u8}};
}

// Every compiled-in CPU backend, with its bar; tensorrt needs a GPU and plans the test bundle lacks.
std::vector<std::pair<std::string, Bar>> cpu_backends(const json& cases) {
  std::vector<std::pair<std::string, Bar>> out;
  for (const auto& name : esrdf::available_backends()) {
    if (name == "tensorrt") continue;
    out.push_back({name, {cases["max_abs_01"].get<double>(), 0.0}});
    if (name == "openvino") out.push_back({"openvino:bf16", {0.0, cases["bf16_min_psnr_db"].get<double>()}});
  }
  return out;
}

}  // namespace

int main() {
  const char* data = std::getenv("ESRDF_TEST_DATA");
  if (data == nullptr || !*data) return check::skip("ESRDF_TEST_DATA is not set (tests/test_cpp_runtime.py sets it)");
  const std::string dir = data;
  std::ifstream in(dir + "/cases.json");
  const json cases = json::parse(in);
  json results;
  for (const auto& c : cases["noise"]) results["noise"].push_back(compare_noise(dir, c));
  const esrdf::Bundle bundle = esrdf::load_bundle(cases["bundle"]);
  for (const auto& c : cases["plans"]) results["plans"].push_back(compare_plan(dir, bundle.manifest, c));
  results["default_backend"] = esrdf::default_backend();
  const auto backends = cases["upscale"].empty() ? std::vector<std::pair<std::string, Bar>>{} : cpu_backends(cases);
  for (const auto& [name, bar] : backends) {
    json& r = results["backends"][name];
    std::unique_ptr<esrdf::Upscaler> upscaler;
    try {
      esrdf::UpscalerOptions options;
      options.backend = name;
      upscaler = std::make_unique<esrdf::Upscaler>(cases["bundle"].get<std::string>(), options);
    } catch (const esrdf::Error& exc) {
      // Only bf16 may be missing, and only on a CPU without it; every compiled-in backend must open.
      const bool no_bf16 = name == "openvino:bf16" && exc.code() == esrdf::ErrorCode::kBackendUnavailable;
      CHECK_MSG(no_bf16, name + ": " + exc.what());
      r["skipped"] = exc.what();
      continue;
    }
    r["name"] = upscaler->backend_name();
    r["tile"] = upscaler->tile();
    r["batch"] = upscaler->batch();
    std::string prefix = name + ".";
    std::replace(prefix.begin(), prefix.end(), ':', '_');
    for (const auto& c : cases["upscale"]) {
      r["upscale"][c["name"].get<std::string>()] = compare_upscale(dir, *upscaler, c, bar, prefix);
    }
  }
  std::ofstream(dir + "/results.json") << results.dump(2);
  return check::finish("test_parity");
}
