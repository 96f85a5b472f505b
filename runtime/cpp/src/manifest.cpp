// manifest.json -> esrdf::Manifest, and bundle loading with sha256 checks (esrdf/runtime/bundle.py), format 2.
//
// The decoder is strict like the Python one: a missing, mistyped or unknown key is an error naming it, and
// the format version is checked first so a newer bundle says so instead of "unknown key".
// JSON numbers: nlohmann parses floats with strtod, which rounds correctly, and Python writes the shortest
// round-tripping repr, so the float64 schedule reloads bit-exact.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <set>
#include <sstream>
#include <sys/stat.h>

#include "esrdf/esrdf.h"

namespace esrdf {
namespace {

using nlohmann::json;

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  throw Error(ErrorCode::kBadBundle, "manifest: " + where + ": " + what);
}

// ``added_later``: keys a manifest written before they existed may lack (ADDED_LATER in esrdf/config.py).
void check_keys(const json& obj, const std::string& where, const std::set<std::string>& expected,
                const std::set<std::string>& added_later = {}) {
  if (!obj.is_object()) bad(where, "expected an object");
  std::string unknown, missing;
  for (const auto& item : obj.items()) {
    if (!expected.count(item.key()) && !added_later.count(item.key())) unknown += " " + item.key();
  }
  for (const auto& key : expected) {
    if (!obj.contains(key)) missing += " " + key;
  }
  if (!unknown.empty() || !missing.empty()) {
    bad(where, "unknown key(s) [" + unknown + " ], missing key(s) [" + missing + " ]");
  }
}

std::string str(const json& obj, const std::string& key, const std::string& where) {
  const json& v = obj.at(key);
  if (!v.is_string()) bad(where + "." + key, "expected a string");
  return v.get<std::string>();
}

int64_t integer(const json& obj, const std::string& key, const std::string& where) {
  const json& v = obj.at(key);
  if (!v.is_number_integer()) bad(where + "." + key, "expected an integer");
  return v.get<int64_t>();
}

std::vector<double> numbers(const json& v, const std::string& where) {
  if (!v.is_array()) bad(where, "expected a list of numbers");
  std::vector<double> out;
  for (const auto& x : v) {
    if (!x.is_number()) bad(where, "expected a list of numbers");
    out.push_back(x.get<double>());
  }
  return out;
}

std::string relative_file(const json& obj, const std::string& where) {
  const std::string file = str(obj, "file", where);
  if (file.empty() || file[0] == '/' || file.find("..") != std::string::npos) {
    bad(where + ".file", "'" + file + "' must be a relative path inside the bundle");
  }
  return file;
}

FileEntry file_entry(const json& obj, const std::string& where) {
  FileEntry e{str(obj, "role", where), str(obj, "precision", where), relative_file(obj, where),
              str(obj, "sha256", where)};
  if (e.role != "predictor" && e.role != "step") bad(where + ".role", "'" + e.role + "' is not predictor|step");
  if (e.precision != "fp32" && e.precision != "fp16") bad(where + ".precision", "not fp32|fp16");
  return e;
}

std::vector<std::string> tensor_names(const json& list, const std::string& where) {
  if (!list.is_array()) bad(where, "expected a list");
  std::vector<std::string> names;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string at = where + "[" + std::to_string(i) + "]";
    check_keys(list[i], at, {"name", "dims", "dtype"});
    names.push_back(str(list[i], "name", at));
  }
  return names;
}

// The graph contract of esrdf/runtime/graph_spec.py: engines bind tensors by these names.
void check_contract(const FileEntry& g, const json& obj, const std::string& where) {
  static const std::map<std::string, std::pair<std::vector<std::string>, std::vector<std::string>>> contract =
      {{"predictor", {{"lr"}, {"coarse"}}}, {"step", {{"x_t", "cond", "t", "coefs", "noise"}, {"x_prev"}}}};
  const auto& want = contract.at(g.role);
  if (tensor_names(obj.at("inputs"), where + ".inputs") != want.first ||
      tensor_names(obj.at("outputs"), where + ".outputs") != want.second) {
    bad(where, g.file + ": I/O names differ from the " + g.role + " graph contract");
  }
}

EngineKey engine_key(const json& obj, const std::string& where) {
  check_keys(obj, where,
             {"tensorrt_version", "gpu_name", "compute_capability", "precision", "profile", "onnx_sha256"});
  EngineKey k{str(obj, "tensorrt_version", where), str(obj, "gpu_name", where),
              str(obj, "compute_capability", where), str(obj, "precision", where),
              str(obj, "onnx_sha256", where), {}};
  for (const auto& [level, axes] : obj.at("profile").items()) {
    for (const auto& [axis, size] : axes.items()) {
      if (!size.is_number_integer()) bad(where + ".profile." + level + "." + axis, "expected an integer");
      k.profile[level][axis] = size.get<int64_t>();
    }
  }
  return k;
}

void read_schedule(Manifest& m, const json& obj) {
  check_keys(obj, "schedule", {"kind", "timesteps", "alphas_cumprod"});
  m.schedule_kind = str(obj, "kind", "schedule");
  m.alphas_cumprod = numbers(obj.at("alphas_cumprod"), "schedule.alphas_cumprod");
  if (integer(obj, "timesteps", "schedule") != static_cast<int64_t>(m.alphas_cumprod.size())) {
    bad("schedule", "alphas_cumprod has " + std::to_string(m.alphas_cumprod.size()) + " values for " +
                        std::to_string(integer(obj, "timesteps", "schedule")) + " timesteps");
  }
  for (size_t i = 0; i < m.alphas_cumprod.size(); ++i) {
    const double a = m.alphas_cumprod[i];
    if (!(a >= 0.0 && a <= 1.0) || (i > 0 && a > m.alphas_cumprod[i - 1])) {
      bad("schedule", "alphas_cumprod must be non-increasing values in [0, 1]");
    }
  }
}

double number(const json& obj, const std::string& key, const std::string& where) {
  const json& v = obj.at(key);
  if (!v.is_number()) bad(where + "." + key, "expected a number");
  return v.get<double>();
}

// "sampling": sampler, steps, eta, prior and x_T's std, checked as esrdf/runtime/bundle.py does.
void read_sampling(Manifest& m, const json& doc) {
  if (!doc.contains("sampling") || doc.at("sampling").is_null()) return;
  const json& s = doc.at("sampling");
  check_keys(s, "sampling", {"sampler", "steps", "eta", "prior", "init_noise_std"});
  SamplingDefaults d;
  const std::string sampler = str(s, "sampler", "sampling"), prior = str(s, "prior", "sampling");
  if (sampler != "ddim" && sampler != "ddpm") bad("sampling.sampler", "'" + sampler + "' is not ddim|ddpm");
  if (prior != "matched" && prior != "paper") bad("sampling.prior", "'" + prior + "' is not matched|paper");
  d.sampler = parse_sampler(sampler);
  d.prior = parse_prior(prior);
  d.steps = static_cast<int>(integer(s, "steps", "sampling"));
  d.eta = number(s, "eta", "sampling");
  d.init_noise_std = number(s, "init_noise_std", "sampling");
  const int t = static_cast<int>(m.alphas_cumprod.size());
  if (d.steps < 1 || d.steps > t || (d.sampler == Sampler::kDdpm && d.steps != t)) {
    bad("sampling.steps", std::to_string(d.steps) + " is not a step count this schedule (T=" + std::to_string(t) +
                              ") runs with " + sampler);
  }
  if (!(d.eta >= 0.0 && d.eta <= 1.0)) bad("sampling.eta", "must be in [0, 1]");
  const double expected = init_noise_std(m.alphas_cumprod, d.prior);
  if (!(std::abs(d.init_noise_std - expected) <= 1e-12 * expected)) {
    bad("sampling.init_noise_std", "is not the " + prior + " prior's std for this schedule");
  }
  m.sampling = d;
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

int Manifest::lr_multiple_of() const { return hr_multiple_of / std::gcd(hr_multiple_of, scale); }

SamplingDefaults Manifest::sampling_defaults() const {
  if (sampling) return *sampling;
  SamplingDefaults d;  // the built-in rule: DDIM, min(50, T) steps, eta 0, matched prior
  d.steps = std::min<int>(kBuiltinSteps, static_cast<int>(alphas_cumprod.size()));
  d.init_noise_std = init_noise_std(alphas_cumprod, d.prior);
  return d;
}

const FileEntry* Manifest::graph(const std::string& role, const std::string& precision) const {
  for (const auto& g : graphs) {
    if (g.role == role && g.precision == precision) return &g;
  }
  return nullptr;
}

namespace {

void read_export(Manifest& m, const json& doc) {
  const json& e = doc.at("export");
  check_keys(e, "export", {"checkpoint", "tile", "batch"});
  m.exported = {str(e, "checkpoint", "export"), static_cast<int>(integer(e, "tile", "export")),
                static_cast<int>(integer(e, "batch", "export"))};
  if (m.exported.tile < 1 || m.exported.batch < 1) bad("export", "tile and batch must be >= 1");
  const json& w = doc.at("torch_weights");
  if (!w.is_null()) {
    check_keys(w, "torch_weights", {"file", "sha256"});
    m.torch_weights = WeightsEntry{relative_file(w, "torch_weights"), str(w, "sha256", "torch_weights")};
  }
  if (!doc.at("provenance").is_object()) bad("provenance", "expected an object");
}

Manifest decode_manifest(const json& doc) {
  if (!doc.is_object()) bad("top level", "expected an object");
  if (!doc.contains("format_version") || doc["format_version"] != kFormatVersion) {
    throw Error(ErrorCode::kBadBundle, "bundle format version " +
                                           (doc.contains("format_version") ? doc["format_version"].dump()
                                                                           : std::string("(none)")) +
                                           "; this runtime reads version " + std::to_string(kFormatVersion));
  }
  check_keys(doc, "manifest",
             {"format_version", "model_name", "scale", "channels", "hr_multiple_of", "value_range", "schedule",
              "graphs", "export", "engines", "parity", "torch_weights", "provenance", "model_config"},
             {"sampling"});
  Manifest m;
  m.format_version = kFormatVersion;
  m.model_name = str(doc, "model_name", "manifest");
  m.scale = static_cast<int>(integer(doc, "scale", "manifest"));
  m.channels = static_cast<int>(integer(doc, "channels", "manifest"));
  m.hr_multiple_of = static_cast<int>(integer(doc, "hr_multiple_of", "manifest"));
  if (m.scale < 1 || m.channels < 1 || m.hr_multiple_of < 1) bad("manifest", "scale/channels/multiple < 1");
  m.value_range = numbers(doc.at("value_range"), "value_range");
  read_schedule(m, doc.at("schedule"));
  for (size_t i = 0; i < doc.at("graphs").size(); ++i) {
    const std::string where = "graphs[" + std::to_string(i) + "]";
    const json& g = doc["graphs"][i];
    check_keys(g, where, {"role", "precision", "file", "sha256", "inputs", "outputs", "opset"});
    m.graphs.push_back(file_entry(g, where));
    check_contract(m.graphs.back(), g, where);
  }
  for (size_t i = 0; i < doc.at("engines").size(); ++i) {
    const std::string where = "engines[" + std::to_string(i) + "]";
    const json& e = doc["engines"][i];
    check_keys(e, where, {"role", "precision", "file", "sha256", "key"});
    EngineEntry entry;
    static_cast<FileEntry&>(entry) = file_entry(e, where);
    entry.key = engine_key(e.at("key"), where + ".key");
    m.engines.push_back(entry);
  }
  read_export(m, doc);
  read_sampling(m, doc);
  return m;
}

}  // namespace

Manifest parse_manifest(const std::string& json_text) {
  json doc = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) throw Error(ErrorCode::kBadBundle, "manifest is not valid JSON");
  try {
    return decode_manifest(doc);
  } catch (const json::exception& exc) {  // e.g. a list where an object belongs
    throw Error(ErrorCode::kBadBundle, std::string("manifest: malformed (") + exc.what() + ")");
  }
}

namespace {

std::string reexport_command(const std::string& root, const std::string& checkpoint, const std::string& flags) {
  const std::string ckpt = checkpoint.empty() ? "CKPT_DIR" : checkpoint;
  return "re-export with: esrdf-export --ckpt " + ckpt + " --out " + root + " --force" + flags;
}

// The checkpoint a manifest of any format version names (version 1 kept it in "export_info"), so that the
// error for an old bundle names the command that renews it.
std::string checkpoint_named_in(const std::string& json_text) {
  json doc = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) return "";
  for (const char* section : {"export", "export_info"}) {
    if (doc.contains(section) && doc[section].is_object() && doc[section].contains("checkpoint") &&
        doc[section]["checkpoint"].is_string()) {
      return doc[section]["checkpoint"].get<std::string>();
    }
  }
  return "";
}

}  // namespace

std::string reexport_hint(const Bundle& bundle, const std::string& extra_flags) {
  return reexport_command(bundle.root, bundle.manifest.exported.checkpoint, extra_flags);
}

Bundle load_bundle(const std::string& dir, bool verify) {
  const std::string path = dir + "/manifest.json";
  if (!is_file(path)) {
    throw Error(ErrorCode::kNotFound, dir + ": not an ESRDF bundle (no manifest.json)");
  }
  Bundle bundle{dir, {}};
  const std::string text = read_text(path);
  try {
    bundle.manifest = parse_manifest(text);
  } catch (const Error& exc) {
    throw Error(exc.code(), path + ": " + exc.what() + "; " + reexport_command(dir, checkpoint_named_in(text), ""));
  }
  if (!bundle.manifest.sampling) {
    const SamplingDefaults d = bundle.manifest.sampling_defaults();
    std::fprintf(stderr,
                 "esrdf: %s: the manifest has no sampling defaults (exported before they were recorded); using "
                 "the built-in ones: ddim, %d steps, eta 0, matched prior (x_T std %.4f); %s\n",
                 dir.c_str(), d.steps, d.init_noise_std, reexport_hint(bundle).c_str());
  }
  std::vector<std::pair<std::string, std::string>> files;  // (file, sha256) of every listed file
  for (const auto& g : bundle.manifest.graphs) files.emplace_back(g.file, g.sha256);
  for (const auto& e : bundle.manifest.engines) files.emplace_back(e.file, e.sha256);
  if (bundle.manifest.torch_weights) files.emplace_back(bundle.manifest.torch_weights->file,
                                                        bundle.manifest.torch_weights->sha256);
  for (const auto& [name, sha256] : files) {
    const std::string file = dir + "/" + name;
    if (!is_file(file)) {
      throw Error(ErrorCode::kNotFound, file + ": listed in the manifest but missing; " + reexport_hint(bundle));
    }
    if (verify && sha256_file(file) != sha256) {
      throw Error(ErrorCode::kHashMismatch, file + ": sha256 does not match the manifest (modified or "
                                                   "corrupted); " + reexport_hint(bundle));
    }
  }
  return bundle;
}

}  // namespace esrdf
