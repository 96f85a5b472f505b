// TensorRT plan selection by EngineKey, without TensorRT: a plan for another TensorRT version, GPU, SM or
// ONNX graph is refused with what differs and the rebuild command; fp16 plans are preferred over fp32.
#include "check.h"
#include "engine_keys.h"

namespace {

using esrdf::detail::MachineIdentity;
using esrdf::detail::select_engines;

const MachineIdentity kH100{"10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0"};

esrdf::EngineEntry engine(const std::string& role, const std::string& precision, const std::string& onnx_sha,
                          const MachineIdentity& built_on, int max_batch = 2, int min_batch = 2) {
  esrdf::EngineEntry e;
  e.role = role;
  e.precision = precision;
  e.file = role + "." + precision + ".plan";
  e.sha256 = "plan";
  e.key = {built_on.tensorrt_version, built_on.gpu_name, built_on.compute_capability, precision, onnx_sha, {}};
  e.key.profile["min"] = {{"batch", min_batch}, {"lr_height", 8}};
  e.key.profile["opt"] = e.key.profile["max"] = {{"batch", max_batch}, {"lr_height", 8}};
  return e;
}

esrdf::Bundle bundle_with(std::vector<esrdf::EngineEntry> engines) {
  esrdf::Bundle b;
  b.root = "/srv/bundle";
  for (const char* role : {"predictor", "step"}) {
    b.manifest.graphs.push_back({role, "fp32", std::string(role) + ".onnx", std::string(role) + "-fp32-sha"});
    b.manifest.graphs.push_back({role, "fp16", std::string(role) + ".fp16.onnx", std::string(role) + "-fp16-sha"});
  }
  b.manifest.exported = {"ckpt/", 8, 2};
  b.manifest.engines = std::move(engines);
  return b;
}

void picks_matching_fp16_plans() {
  const auto b = bundle_with({engine("predictor", "fp16", "predictor-fp16-sha", kH100),
                              engine("step", "fp16", "step-fp16-sha", kH100)});
  const auto pair = select_engines(b, kH100);
  CHECK(pair.predictor == &b.manifest.engines[0] && pair.step == &b.manifest.engines[1]);
}

void refuses_stale_plans_naming_the_difference() {
  using esrdf::ErrorCode;
  const auto b = bundle_with({engine("predictor", "fp16", "predictor-fp16-sha", kH100),
                              engine("step", "fp16", "step-fp16-sha", kH100)});
  const MachineIdentity newer{"10.14.1.48", kH100.gpu_name, "9.0"};
  CHECK_ERROR(select_engines(b, newer), ErrorCode::kStale, "TensorRT 10.13.3.9 (here 10.14.1.48)");
  CHECK_ERROR(select_engines(b, newer), ErrorCode::kStale,
              "rebuild it with: python -m esrdf.engines.tensorrt_build /srv/bundle --tile 8 --batch 2");
  const MachineIdentity l4{"10.13.3.9", "NVIDIA L4", "8.9"};
  CHECK_ERROR(select_engines(b, l4), ErrorCode::kStale, "GPU 'NVIDIA H100 80GB HBM3' (here 'NVIDIA L4'); SM 9.0 (here 8.9)");

  auto re_exported = bundle_with({engine("predictor", "fp16", "old-sha", kH100), engine("step", "fp16", "step-fp16-sha", kH100)});
  CHECK_ERROR(select_engines(re_exported, kH100), ErrorCode::kStale, "predictor.fp16.plan: this predictor engine was built for another ONNX graph");

  auto dynamic = bundle_with({engine("predictor", "fp16", "x", kH100, 4, 1), engine("step", "fp16", "x", kH100, 4, 1)});
  CHECK_ERROR(select_engines(dynamic, kH100), ErrorCode::kStale, "--tile 8 --batch 4 --dynamic");
}

void falls_back_to_fp32_plans() {
  const MachineIdentity old_gpu{"10.13.3.9", "Tesla T4", "7.5"};
  const auto b = bundle_with({engine("predictor", "fp16", "predictor-fp16-sha", old_gpu),
                              engine("step", "fp16", "step-fp16-sha", old_gpu),
                              engine("predictor", "fp32", "predictor-fp32-sha", kH100),
                              engine("step", "fp32", "step-fp32-sha", kH100)});
  const auto pair = select_engines(b, kH100);
  CHECK(pair.predictor == &b.manifest.engines[2] && pair.step == &b.manifest.engines[3]);
}

void says_how_to_build_missing_plans() {
  CHECK_ERROR(select_engines(bundle_with({}), kH100), esrdf::ErrorCode::kNotFound,
              "/srv/bundle: no fp16 TensorRT engine for the predictor graph; build one with: python -m "
              "esrdf.engines.tensorrt_build /srv/bundle --tile 8 --batch 2");
}

}  // namespace

// The same cases as tests/test_tensorrt.py::test_plan_version_keys_are_major_minor_patch.
void version_keys_are_major_minor_patch() {
  using esrdf::detail::tensorrt_version_key;
  using esrdf::detail::version_key;
  CHECK(tensorrt_version_key(10, 13, 3) == "10.13.3" && tensorrt_version_key(11, 1, 0) == "11.1.0");
  CHECK(version_key("10.13.3.9") == "10.13.3" && version_key("10.13.3") == "10.13.3");
  CHECK(version_key("11.1.0.12") == "11.1.0" && version_key("10.13") == "10.13");
  // A plan keyed by an older manifest's 4-part string runs where the 3-part key matches, not elsewhere.
  const auto b = bundle_with({engine("predictor", "fp16", "predictor-fp16-sha", kH100),
                              engine("step", "fp16", "step-fp16-sha", kH100)});
  const MachineIdentity same{tensorrt_version_key(10, 13, 3), kH100.gpu_name, kH100.compute_capability};
  CHECK(select_engines(b, same).step == &b.manifest.engines[1]);
  const MachineIdentity patch{tensorrt_version_key(10, 13, 4), kH100.gpu_name, kH100.compute_capability};
  CHECK_ERROR(select_engines(b, patch), esrdf::ErrorCode::kStale, "TensorRT 10.13.3.9 (here 10.13.4)");
}

int main() {
  version_keys_are_major_minor_patch();
  picks_matching_fp16_plans();
  refuses_stale_plans_naming_the_difference();
  falls_back_to_fp32_plans();
  says_how_to_build_missing_plans();
  return check::finish("test_engine_keys");
}
