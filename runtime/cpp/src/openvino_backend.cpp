// The OpenVINO backend: runs the bundle's fp32 ONNX graphs (the same files the Python onnxruntime engine
// runs) with OpenVINO's CPU plugin. No libtorch and no per-model compile step at export: OpenVINO reads
// the ONNX graph and compiles it in process, once per input shape.
//
// Precision is chosen per graph, as in the Python OpenVINO engine: fp32, or bf16 through OpenVINO's
// INFERENCE_PRECISION_HINT on the same fp32 graph (I/O stays float32). bf16 is refused on a CPU whose
// OpenVINO plugin does not report the BF16 capability (AVX512_BF16 or AMX), rather than emulated; "auto"
// is bf16 where the CPU has it and fp32 elsewhere.
//
//   "openvino" | "openvino:fp32"            both graphs fp32 (the default C++ backend when compiled in)
//   "openvino:bf16" | "openvino:auto"       both graphs bf16 / bf16 where the CPU has it
//   "openvino:predictor=fp32,step=bf16"     per graph; "threads=N" caps OpenVINO's CPU threads
//
// Shapes are static per compiled model: the graphs are reshaped to each (batch, tile) the driver feeds and
// compiled on first use; a few recent shapes stay compiled (an image's full batches and its last one).
// One ov::Core serves the process (plugins load once; cores do not share compiled models).
#include <openvino/openvino.hpp>

#include <algorithm>
#include <cstring>
#include <list>
#include <sstream>
#include <tuple>

#include "backends.h"

namespace esrdf::detail {
namespace {

constexpr const char* kDevice = "CPU";
constexpr size_t kCompiledShapes = 6;  // per graph: full batch + last batch of a few tile sizes

// One per process, as OpenVINO recommends: the CPU plugin and its thread pools load once and are shared by
// every compiled model. Destroyed at exit (a leaked Core leaves its stream executors to LeakSanitizer).
ov::Core& core() {
  static ov::Core instance;
  return instance;
}

bool cpu_has_bf16() {
  const auto caps = core().get_property(kDevice, ov::device::capabilities);
  return std::find(caps.begin(), caps.end(), ov::device::capability::BF16) != caps.end();
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

struct Options {
  std::string predictor = "fp32", step = "fp32";
  int threads = 0;  // 0: OpenVINO's default (all cores)
};

[[noreturn]] void bad_option(const std::string& name, const std::string& why) {
  throw Error(ErrorCode::kInvalidArgument,
              "backend '" + name + "': " + why +
                  "; expected openvino, openvino:fp32|bf16|auto or "
                  "openvino:predictor=fp32|bf16|auto,step=fp32|bf16|auto[,threads=N]");
}

std::string precision_value(const std::string& name, const std::string& value) {
  if (value == "auto") return cpu_has_bf16() ? "bf16" : "fp32";
  if (value != "fp32" && value != "bf16") bad_option(name, "precision '" + value + "' is not fp32, bf16 or auto");
  return value;
}

Options parse_options(const std::string& name) {
  Options opts;
  const size_t colon = name.find(':');
  if (colon == std::string::npos) return opts;
  std::stringstream items(name.substr(colon + 1));
  std::string item;
  while (std::getline(items, item, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      opts.predictor = opts.step = precision_value(name, item);
      continue;
    }
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "predictor") opts.predictor = precision_value(name, value);
    else if (key == "step") opts.step = precision_value(name, value);
    else if (key == "threads") {
      char* end = nullptr;
      const long n = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || n < 1 || n > 1024) bad_option(name, "threads must be 1..1024");
      opts.threads = static_cast<int>(n);
    } else {
      bad_option(name, "unknown option '" + key + "'");
    }
  }
  return opts;
}

// One graph: its ONNX model read once, compiled per static input shape, with one infer request each
// (the Upscaler serialises calls, so a request is never shared by two threads).
class Graph {
 public:
  Graph(const Bundle& bundle, const std::string& role, const std::string& precision, int threads)
      : role_(role), precision_(precision), threads_(threads) {
    const FileEntry* entry = bundle.manifest.graph(role, "fp32");
    if (entry == nullptr) {
      throw Error(ErrorCode::kBadBundle, bundle.root + ": no fp32 " + role + " graph; " + reexport_hint(bundle));
    }
    path_ = bundle.root + "/" + entry->file;
    try {
      model_ = core().read_model(path_);
    } catch (const std::exception& exc) {
      throw Error(ErrorCode::kBadBundle, path_ + ": OpenVINO could not read this ONNX graph (" +
                                             first_line(exc.what()) + ")");
    }
  }

  // inputs: (name, shape, data) in the graph contract's order; the single output lands in `out`.
  void run(const std::vector<std::tuple<std::string, ov::Shape, const float*>>& inputs, float* out,
           int64_t out_numel) {
    std::vector<ov::Shape> shapes;
    for (const auto& in : inputs) shapes.push_back(std::get<1>(in));
    ov::InferRequest& request = compiled(inputs, shapes);
    try {
      for (const auto& [name, shape, data] : inputs) {
        // Wraps the caller's buffer (no copy); OpenVINO only reads inputs.
        request.set_tensor(name, ov::Tensor(ov::element::f32, shape, const_cast<float*>(data)));
      }
      const ov::Shape shape = request.get_compiled_model().output(0).get_shape();
      if (ov::shape_size(shape) != static_cast<size_t>(out_numel)) {
        throw Error(ErrorCode::kBackendFailure,
                    path_ + ": OpenVINO output " + shape.to_string() + " does not match the graph contract");
      }
      request.set_output_tensor(0, ov::Tensor(ov::element::f32, shape, out));  // written in place
      request.infer();
    } catch (const ov::Exception& exc) {
      throw Error(ErrorCode::kBackendFailure, path_ + ": OpenVINO inference failed: " + first_line(exc.what()));
    }
  }

 private:
  struct Entry {
    std::vector<ov::Shape> shapes;
    ov::InferRequest request;
  };

  ov::InferRequest& compiled(const std::vector<std::tuple<std::string, ov::Shape, const float*>>& inputs,
                             const std::vector<ov::Shape>& shapes) {
    for (auto it = cache_.begin(); it != cache_.end(); ++it) {
      if (it->shapes == shapes) {
        cache_.splice(cache_.begin(), cache_, it);  // most recent first
        return cache_.front().request;
      }
    }
    std::map<std::string, ov::PartialShape> static_shapes;
    for (const auto& in : inputs) static_shapes[std::get<0>(in)] = ov::PartialShape(std::get<1>(in));
    ov::AnyMap config{{ov::hint::inference_precision.name(),
                       precision_ == "bf16" ? ov::element::bf16 : ov::element::f32},
                      {ov::hint::performance_mode.name(), ov::hint::PerformanceMode::LATENCY},
                      {ov::hint::num_requests.name(), 1u}};
    if (threads_ > 0) config[ov::inference_num_threads.name()] = threads_;
    try {
      std::shared_ptr<ov::Model> model = model_->clone();
      model->reshape(static_shapes);
      ov::CompiledModel compiled = core().compile_model(model, kDevice, config);
      cache_.push_front({shapes, compiled.create_infer_request()});
    } catch (const ov::Exception& exc) {
      throw Error(ErrorCode::kBackendFailure, path_ + ": OpenVINO could not compile the " + role_ + " graph (" +
                                                  precision_ + "): " + first_line(exc.what()));
    }
    if (cache_.size() > kCompiledShapes) cache_.pop_back();
    return cache_.front().request;
  }

  std::string role_, precision_, path_;
  int threads_;
  std::shared_ptr<ov::Model> model_;
  std::list<Entry> cache_;
};

class OpenVinoBackend final : public Backend {
 public:
  OpenVinoBackend(const Bundle& bundle, const std::string& name) {
    try {
      const Options opts = parse_options(name);
      if ((opts.predictor == "bf16" || opts.step == "bf16") && !cpu_has_bf16()) {
        throw Error(ErrorCode::kBackendUnavailable,
                    "backend '" + name + "': OpenVINO's CPU plugin reports no bf16 on this CPU (it needs "
                    "AVX512_BF16 or AMX); use openvino:fp32");
      }
      predictor_ = std::make_unique<Graph>(bundle, "predictor", opts.predictor, opts.threads);
      step_ = std::make_unique<Graph>(bundle, "step", opts.step, opts.threads);
      name_ = "openvino:predictor=" + opts.predictor + ",step=" + opts.step;
      if (opts.threads > 0) name_ += ",threads=" + std::to_string(opts.threads);
    } catch (const ov::Exception& exc) {  // the Core or its CPU plugin failed to load
      throw Error(ErrorCode::kBackendUnavailable, "OpenVINO CPU plugin unavailable: " + first_line(exc.what()));
    }
  }

  std::string name() const override { return name_; }

 protected:
  void predictor(const BatchShape& s, const float* lr, float* coarse) override {
    predictor_->run({{"lr", image(s, 1), lr}}, coarse, s.hr_numel());
  }

  void step(const BatchShape& s, const float* x_t, const float* cond, const float* t, const float* coefs,
            const float* noise, float* x_prev) override {
    const ov::Shape hr = image(s, s.scale), batch{size_t(s.batch)}, coef_shape{size_t(s.batch), 3};
    step_->run({{"x_t", hr, x_t}, {"cond", hr, cond}, {"t", batch, t}, {"coefs", coef_shape, coefs},
                {"noise", hr, noise}},
               x_prev, s.hr_numel());
  }

 private:
  static ov::Shape image(const BatchShape& s, int scale) {
    return {size_t(s.batch), size_t(s.channels), size_t(s.lr_height) * scale, size_t(s.lr_width) * scale};
  }

  std::unique_ptr<Graph> predictor_, step_;
  std::string name_;
};

}  // namespace

std::unique_ptr<Backend> make_openvino_backend(const Bundle& bundle, const std::string& name) {
  return std::make_unique<OpenVinoBackend>(bundle, name);
}

}  // namespace esrdf::detail
