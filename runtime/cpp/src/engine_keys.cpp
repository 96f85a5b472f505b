// EngineKey checks: a TensorRT plan runs only on the TensorRT version, GPU model and SM it was built for,
// and only for the ONNX graph (by sha256) the bundle still has (STYLE.md: key artifacts by what they depend
// on). Messages follow esrdf/engines/tensorrt_engine.py and name the one command that rebuilds the plan.
#include "engine_keys.h"

namespace esrdf::detail {

std::string tensorrt_version_key(int major, int minor, int patch) {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

std::string version_key(const std::string& version) {
  size_t dot = 0;
  for (int dots = 0; dots < 3; ++dots) {  // the third dot ends MAJOR.MINOR.PATCH
    dot = version.find('.', dots == 0 ? 0 : dot + 1);
    if (dot == std::string::npos) return version;
  }
  return version.substr(0, dot);
}

std::string key_mismatches(const EngineKey& key, const MachineIdentity& here, const FileEntry* onnx_graph) {
  std::string found;
  auto add = [&](const std::string& what) { found += (found.empty() ? "" : "; ") + what; };
  if (version_key(key.tensorrt_version) != version_key(here.tensorrt_version)) {
    add("TensorRT " + key.tensorrt_version + " (here " + here.tensorrt_version + ")");
  }
  if (key.gpu_name != here.gpu_name) add("GPU '" + key.gpu_name + "' (here '" + here.gpu_name + "')");
  if (key.compute_capability != here.compute_capability) {
    add("SM " + key.compute_capability + " (here " + here.compute_capability + ")");
  }
  if (onnx_graph == nullptr) add("a " + key.precision + " ONNX graph the bundle no longer has");
  else if (key.onnx_sha256 != onnx_graph->sha256) add("another ONNX graph than the bundle's (sha256 differs)");
  return found;
}

std::string tensorrt_rebuild_command(const Bundle& bundle, const EngineKey* key) {
  int tile = bundle.manifest.exported.tile, batch = bundle.manifest.exported.batch;
  bool dynamic = false;
  if (key != nullptr && key->profile.count("min") && key->profile.count("max")) {
    const auto& max = key->profile.at("max");
    if (max.count("lr_height")) tile = static_cast<int>(max.at("lr_height"));
    if (max.count("batch")) batch = static_cast<int>(max.at("batch"));
    dynamic = key->profile.at("min") != max;
  }
  return "python -m esrdf.engines.tensorrt_build " + bundle.root + " --tile " + std::to_string(tile) +
         " --batch " + std::to_string(batch) + (dynamic ? " --dynamic" : "");
}

namespace {

// The usable plan of one role at one precision; else null, with `why` set.
const EngineEntry* usable(const Bundle& bundle, const std::string& role, const std::string& precision,
                          const MachineIdentity& here, std::string& why, bool& stale) {
  const EngineEntry* mismatched = nullptr;
  const FileEntry* graph = bundle.manifest.graph(role, precision);
  for (const auto& e : bundle.manifest.engines) {
    if (e.role != role || e.precision != precision) continue;
    if (key_mismatches(e.key, here, graph).empty()) return &e;
    mismatched = &e;
  }
  stale = mismatched != nullptr;
  why = mismatched == nullptr
            ? bundle.root + ": no " + precision + " TensorRT engine for the " + role +
                  " graph; build one with: " + tensorrt_rebuild_command(bundle, nullptr)
            : bundle.root + "/" + mismatched->file + ": this " + role + " engine was built for " +
                  key_mismatches(mismatched->key, here, graph) +
                  "; rebuild it with: " + tensorrt_rebuild_command(bundle, &mismatched->key);
  return nullptr;
}

}  // namespace

EnginePair select_engines(const Bundle& bundle, const MachineIdentity& here) {
  std::string first_why;
  bool first_stale = false;
  for (const char* precision : {"fp16", "fp32"}) {  // the fp16 plans are the ones export builds
    std::string why;
    bool stale = false;
    EnginePair pair{usable(bundle, "predictor", precision, here, why, stale), nullptr};
    if (pair.predictor != nullptr) pair.step = usable(bundle, "step", precision, here, why, stale);
    if (pair.step != nullptr) return pair;
    if (first_why.empty()) {
      first_why = why;
      first_stale = stale;
    }
  }
  throw Error(first_stale ? ErrorCode::kStale : ErrorCode::kNotFound, first_why);
}

}  // namespace esrdf::detail
