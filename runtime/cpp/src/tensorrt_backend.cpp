// The TensorRT backend (TensorRT 10 C++ API, CUDA runtime): the bundle's serialized plans, with each batch's
// whole sampler loop (copy-in, predictor, N step calls, copy-out) replayed as one CUDA graph
// (docs/DESIGN.md section 1, "Driver"). Built only when CMake finds TensorRT and the CUDA toolkit.
//
// - Plans are picked like esrdf/engines/tensorrt_engine.py: the EngineKey (TensorRT version, GPU name, SM,
//   ONNX sha256) must match this machine and the bundle; otherwise the error names the rebuild command.
//   fp16 plans are preferred, fp32 ones used when no fp16 pair is usable. A plan is executable code: only
//   load bundles you built or trust.
// - Shapes are the profile's largest (batch, LR tile): the driver pads the last batch, so one shape key and
//   one set of static buffers serve every call.
// - Every TensorRT I/O tensor is bound once, to a static buffer (as the Python engine does): each step copies
//   its noise, t and coefs into the bound inputs and x_prev back into x_t, so a captured graph holds no
//   TensorRT API call but enqueueV3 and depends on no address changed between steps.
// - Noise is copied into static device buffers (one per noise index, N + 1 in all): injected noise keeps the
//   loop bit-identical to the Python runtime's and to non-graph execution. Memory: (N + 1) * B * C * H * W
//   floats on the device and pinned on the host.
// - One graph per step count N. The first call for an N runs as plain stream execution (the warm-up), then
//   the loop is captured; later calls replay it. Growing the buffers (a larger N) destroys every graph
//   captured on the old ones. If capture fails, it is ended and the backend stays on stream execution.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>

#include "backends.h"
#include "engine_keys.h"

namespace esrdf::detail {
namespace {

void cuda_check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw Error(ErrorCode::kBackendFailure, std::string(what) + ": " + cudaGetErrorString(rc));
}

class Logger final : public nvinfer1::ILogger {
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", message);
  }
};

Logger& logger() {
  static Logger instance;  // TensorRT keeps the reference for the runtime's lifetime
  return instance;
}

MachineIdentity machine_identity(int device) {
  cudaDeviceProp props{};
  cuda_check(cudaGetDeviceProperties(&props, device), "cudaGetDeviceProperties");
  // The plan key's format, MAJOR.MINOR.PATCH, shared with the Python build (tensorrt_build.version_key).
  const std::string version = tensorrt_version_key(NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH);
  return {version, props.name, std::to_string(props.major) + "." + std::to_string(props.minor)};
}

template <typename T>
class DeviceBuffer {
 public:
  ~DeviceBuffer() { cudaFree(ptr_); }
  void resize(size_t count) {
    cudaFree(ptr_);
    ptr_ = nullptr;
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&ptr_), sizeof(T) * count), "cudaMalloc");
  }
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

template <typename T>
class PinnedBuffer {  // page-locked host memory: copies from it can be captured into a graph
 public:
  ~PinnedBuffer() { cudaFreeHost(ptr_); }
  void resize(size_t count) {
    cudaFreeHost(ptr_);
    ptr_ = nullptr;
    cuda_check(cudaMallocHost(reinterpret_cast<void**>(&ptr_), sizeof(T) * count), "cudaMallocHost");
  }
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

struct Plan {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
};

}  // namespace

class TensorRtBackend final : public Backend {
 public:
  explicit TensorRtBackend(const Bundle& bundle);
  ~TensorRtBackend() override;
  std::string name() const override { return "tensorrt"; }
  int fixed_batch() const override { return shape_.batch; }
  int fixed_tile() const override { return shape_.lr_height; }
  void sample_batch(const BatchShape& shape, const float* lr, const StepPlan& plan, const NoiseFill& noise,
                    float* hr) override;

 protected:
  void predictor(const BatchShape& shape, const float* lr, float* coarse) override;
  void step(const BatchShape& shape, const float* x_t, const float* cond, const float* t, const float* coefs,
            const float* noise, float* x_prev) override;

 private:
  Plan load_plan(const Bundle& bundle, const EngineEntry& entry);
  void bind();
  void ensure_steps(int num_steps);
  void enqueue_loop(int num_steps);
  void enqueue(Plan& plan, const char* role);
  void check_shape(const BatchShape& shape) const;
  void destroy_graphs();
  void capture_graph(int num_steps);

  std::unique_ptr<nvinfer1::IRuntime> runtime_;  // declared first: it must outlive its engines
  Plan predictor_, step_;
  BatchShape shape_;
  cudaStream_t stream_ = nullptr;
  int capacity_steps_ = -1;
  bool graphs_disabled_ = false;
  std::map<int, cudaGraphExec_t> graphs_;  // by step count
  std::map<int, bool> warmed_;
  // Bound to the plans' I/O once: lr, coarse (= cond), x_t, x_prev, noise, t, coefs.
  DeviceBuffer<float> lr_, coarse_, x_t_, x_prev_, noise_in_, t_in_, coefs_in_;
  DeviceBuffer<float> noise_, t_, coefs_;  // every step's inputs of one call, copied in from the host
  PinnedBuffer<float> lr_host_, coarse_host_, x_host_, noise_host_, t_host_, coefs_host_;
};

TensorRtBackend::TensorRtBackend(const Bundle& bundle) {
  if (getInferLibVersion() != NV_TENSORRT_VERSION) {
    throw Error(ErrorCode::kBackendUnavailable, "the TensorRT library (" + std::to_string(getInferLibVersion()) +
                                                    ") is not the one these headers describe (" +
                                                    std::to_string(NV_TENSORRT_VERSION) + "); rebuild libesrdf");
  }
  int device = 0;
  const cudaError_t found = cudaGetDevice(&device);
  if (found != cudaSuccess) {
    throw Error(ErrorCode::kBackendUnavailable,
                std::string("the tensorrt backend needs a CUDA device: ") + cudaGetErrorString(found));
  }
  const EnginePair entries = select_engines(bundle, machine_identity(device));
  const auto& max = entries.step->key.profile.at("max");
  shape_ = BatchShape{static_cast<int>(max.at("batch")), bundle.manifest.channels, static_cast<int>(max.at("lr_height")),
                      static_cast<int>(max.at("lr_width")), bundle.manifest.scale};
  if (shape_.lr_height != shape_.lr_width) throw Error(ErrorCode::kBadBundle, "TensorRT profile has non-square tiles");
  runtime_.reset(nvinfer1::createInferRuntime(logger()));
  if (!runtime_) throw Error(ErrorCode::kBackendUnavailable, "TensorRT could not create a runtime");
  predictor_ = load_plan(bundle, *entries.predictor);
  step_ = load_plan(bundle, *entries.step);
  cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  const size_t lr_n = static_cast<size_t>(shape_.lr_numel()), hr_n = static_cast<size_t>(shape_.hr_numel());
  lr_.resize(lr_n);
  coarse_.resize(hr_n);
  x_t_.resize(hr_n);
  x_prev_.resize(hr_n);
  noise_in_.resize(hr_n);
  t_in_.resize(static_cast<size_t>(shape_.batch));
  coefs_in_.resize(static_cast<size_t>(shape_.batch) * 3);
  lr_host_.resize(lr_n);
  coarse_host_.resize(hr_n);
  x_host_.resize(hr_n);
  bind();
}

TensorRtBackend::~TensorRtBackend() {
  destroy_graphs();
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

Plan TensorRtBackend::load_plan(const Bundle& bundle, const EngineEntry& entry) {
  const std::string path = bundle.root + "/" + entry.file;
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Hash the bytes that are deserialised, not the file load_bundle saw: the file may change in between.
  if (sha256_bytes(blob.data(), blob.size()) != entry.sha256) {
    throw Error(ErrorCode::kHashMismatch, path + ": sha256 does not match the manifest (modified or corrupted); " +
                                              tensorrt_rebuild_command(bundle, &entry.key));
  }
  Plan plan;
  plan.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
  if (!plan.engine) {
    throw Error(ErrorCode::kStale, path + ": TensorRT could not deserialise this plan; rebuild it with: " +
                                       tensorrt_rebuild_command(bundle, &entry.key));
  }
  for (int i = 0; i < plan.engine->getNbIOTensors(); ++i) {
    const char* tensor = plan.engine->getIOTensorName(i);
    if (plan.engine->getTensorDataType(tensor) != nvinfer1::DataType::kFLOAT) {
      throw Error(ErrorCode::kBadBundle, path + ": I/O tensor '" + tensor + "' is not float32 (the graph contract)");
    }
  }
  plan.context.reset(plan.engine->createExecutionContext());
  if (!plan.context) throw Error(ErrorCode::kOutOfMemory, path + ": no execution context (device memory?)");
  return plan;
}

void TensorRtBackend::bind() {
  const int64_t b = shape_.batch, c = shape_.channels, s = shape_.scale;
  const nvinfer1::Dims4 lr{b, c, shape_.lr_height, shape_.lr_width};
  const nvinfer1::Dims4 image{b, c, shape_.lr_height * s, shape_.lr_width * s};
  nvinfer1::Dims batch{};
  batch.nbDims = 1;
  batch.d[0] = b;
  nvinfer1::Dims coefs{};
  coefs.nbDims = 2;
  coefs.d[0] = b;
  coefs.d[1] = 3;
  bool ok = predictor_.context->setInputShape("lr", lr);
  for (const char* name : {"x_t", "cond", "noise"}) ok = ok && step_.context->setInputShape(name, image);
  ok = ok && step_.context->setInputShape("t", batch) && step_.context->setInputShape("coefs", coefs);
  const std::pair<const char*, float*> predictor_io[] = {{"lr", lr_.get()}, {"coarse", coarse_.get()}};
  const std::pair<const char*, float*> step_io[] = {{"x_t", x_t_.get()},         {"cond", coarse_.get()},
                                                    {"t", t_in_.get()},          {"coefs", coefs_in_.get()},
                                                    {"noise", noise_in_.get()},  {"x_prev", x_prev_.get()}};
  for (const auto& [tensor, ptr] : predictor_io) ok = ok && predictor_.context->setTensorAddress(tensor, ptr);
  for (const auto& [tensor, ptr] : step_io) ok = ok && step_.context->setTensorAddress(tensor, ptr);
  if (!ok) throw Error(ErrorCode::kBadBundle, "TensorRT refused the graph contract's I/O names or the profile's shapes");
}

void TensorRtBackend::destroy_graphs() {
  for (auto& [steps, exec] : graphs_) cudaGraphExecDestroy(exec);
  graphs_.clear();
  warmed_.clear();
}

void TensorRtBackend::ensure_steps(int num_steps) {
  if (num_steps <= capacity_steps_) return;
  destroy_graphs();  // the graphs were captured on the buffers about to be freed
  const size_t hr_n = static_cast<size_t>(shape_.hr_numel()), n = static_cast<size_t>(num_steps);
  const size_t b = static_cast<size_t>(shape_.batch);
  noise_.resize((n + 1) * hr_n);
  noise_host_.resize((n + 1) * hr_n);
  t_.resize(std::max<size_t>(n, 1) * b);
  t_host_.resize(std::max<size_t>(n, 1) * b);
  coefs_.resize(std::max<size_t>(n, 1) * b * 3);
  coefs_host_.resize(std::max<size_t>(n, 1) * b * 3);
  capacity_steps_ = num_steps;
}

void TensorRtBackend::enqueue(Plan& plan, const char* role) {
  if (!plan.context->enqueueV3(stream_)) {
    throw Error(ErrorCode::kBackendFailure, std::string("TensorRT enqueueV3 failed for the ") + role + " graph");
  }
}

// Everything one batch needs, in stream order: copy-in, predictor, N steps, copy-out. Step k copies noise
// field k + 1, t_k and coefs_k into the bound inputs, and x_prev back into x_t; x_T is noise field 0.
void TensorRtBackend::enqueue_loop(int num_steps) {
  const size_t lr_n = static_cast<size_t>(shape_.lr_numel()), hr_n = static_cast<size_t>(shape_.hr_numel());
  const size_t b = static_cast<size_t>(shape_.batch), n = static_cast<size_t>(num_steps);
  auto copy = [&](float* dst, const float* src, size_t count, cudaMemcpyKind kind) {
    cuda_check(cudaMemcpyAsync(dst, src, count * sizeof(float), kind, stream_), "cudaMemcpyAsync");
  };
  copy(lr_.get(), lr_host_.get(), lr_n, cudaMemcpyHostToDevice);
  copy(noise_.get(), noise_host_.get(), (n + 1) * hr_n, cudaMemcpyHostToDevice);
  copy(t_.get(), t_host_.get(), n * b, cudaMemcpyHostToDevice);
  copy(coefs_.get(), coefs_host_.get(), n * b * 3, cudaMemcpyHostToDevice);
  enqueue(predictor_, "predictor");
  copy(x_t_.get(), noise_.get(), hr_n, cudaMemcpyDeviceToDevice);
  for (size_t k = 0; k < n; ++k) {
    copy(noise_in_.get(), noise_.get() + (k + 1) * hr_n, hr_n, cudaMemcpyDeviceToDevice);
    copy(t_in_.get(), t_.get() + k * b, b, cudaMemcpyDeviceToDevice);
    copy(coefs_in_.get(), coefs_.get() + k * b * 3, b * 3, cudaMemcpyDeviceToDevice);
    enqueue(step_, "step");
    copy(x_t_.get(), x_prev_.get(), hr_n, cudaMemcpyDeviceToDevice);
  }
  copy(coarse_host_.get(), coarse_.get(), hr_n, cudaMemcpyDeviceToHost);
  copy(x_host_.get(), x_t_.get(), hr_n, cudaMemcpyDeviceToHost);
}

void TensorRtBackend::check_shape(const BatchShape& s) const {
  if (s.batch != shape_.batch || s.lr_height != shape_.lr_height || s.lr_width != shape_.lr_width ||
      s.channels != shape_.channels || s.scale != shape_.scale) {
    throw Error(ErrorCode::kInvalidArgument, "the TensorRT backend runs its profile's batch and tile only");
  }
}

void TensorRtBackend::sample_batch(const BatchShape& shape, const float* lr, const StepPlan& plan,
                                   const NoiseFill& noise, float* hr) {
  check_shape(shape);
  const int n = plan.num_steps();
  ensure_steps(n);
  const size_t hr_n = static_cast<size_t>(shape_.hr_numel()), b = static_cast<size_t>(shape_.batch);
  std::memcpy(lr_host_.get(), lr, sizeof(float) * static_cast<size_t>(shape_.lr_numel()));
  for (int k = 0; k <= n; ++k) noise(k, noise_host_.get() + static_cast<size_t>(k) * hr_n);
  scale_initial_noise(plan, noise_host_.get(), hr_n);  // field 0 is x_T
  for (size_t k = 0; k < static_cast<size_t>(n); ++k) {
    for (size_t i = 0; i < b; ++i) {
      t_host_.get()[k * b + i] = plan.t[k];
      std::memcpy(coefs_host_.get() + (k * b + i) * 3, plan.coefs[k].data(), 3 * sizeof(float));
    }
  }
  auto graph = graphs_.find(n);
  if (graph != graphs_.end()) {
    cuda_check(cudaGraphLaunch(graph->second, stream_), "cudaGraphLaunch");
  } else {
    enqueue_loop(n);  // stream execution: the warm-up before capture, or the fallback
  }
  cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  for (size_t i = 0; i < hr_n; ++i) hr[i] = coarse_host_.get()[i] + x_host_.get()[i];
  if (graph == graphs_.end() && !graphs_disabled_ && !warmed_[n]) {
    warmed_[n] = true;  // this call was the warm-up: capture now, replay from the next call on
    capture_graph(n);
  }
}

// Capture enqueue_loop(n) into a graph; on any failure end the capture and stay on stream execution.
void TensorRtBackend::capture_graph(int n) {
  cudaGraph_t captured = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool ok = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (ok) {
    try {
      enqueue_loop(n);
    } catch (const Error&) {
      ok = false;
    }
    // Always end a begun capture, even a failed one, or the stream stays unusable.
    ok = cudaStreamEndCapture(stream_, &captured) == cudaSuccess && ok && captured != nullptr;
  }
  ok = ok && cudaGraphInstantiateWithFlags(&exec, captured, 0) == cudaSuccess;
  if (captured != nullptr) cudaGraphDestroy(captured);
  if (ok) {
    graphs_[n] = exec;
    return;
  }
  cudaGetLastError();  // clear the (non-sticky) error a failed capture leaves behind
  graphs_disabled_ = true;
  std::fprintf(stderr, "esrdf: CUDA graph capture failed; staying on stream execution\n");
}

void TensorRtBackend::predictor(const BatchShape& shape, const float* lr, float* coarse) {
  check_shape(shape);
  const size_t lr_n = static_cast<size_t>(shape_.lr_numel()), hr_n = static_cast<size_t>(shape_.hr_numel());
  cuda_check(cudaMemcpyAsync(lr_.get(), lr, lr_n * sizeof(float), cudaMemcpyHostToDevice, stream_), "copy-in");
  enqueue(predictor_, "predictor");
  cuda_check(cudaMemcpyAsync(coarse, coarse_.get(), hr_n * sizeof(float), cudaMemcpyDeviceToHost, stream_), "copy-out");
  cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
}

void TensorRtBackend::step(const BatchShape& shape, const float* x_t, const float* cond, const float* t,
                           const float* coefs, const float* noise, float* x_prev) {
  check_shape(shape);
  const size_t hr_n = static_cast<size_t>(shape_.hr_numel()), b = static_cast<size_t>(shape_.batch);
  auto h2d = [&](float* dst, const float* src, size_t count) {
    cuda_check(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyHostToDevice, stream_), "copy-in");
  };
  h2d(x_t_.get(), x_t, hr_n);
  h2d(coarse_.get(), cond, hr_n);
  h2d(t_in_.get(), t, b);
  h2d(coefs_in_.get(), coefs, b * 3);
  h2d(noise_in_.get(), noise, hr_n);
  enqueue(step_, "step");
  cuda_check(cudaMemcpyAsync(x_prev, x_prev_.get(), hr_n * sizeof(float), cudaMemcpyDeviceToHost, stream_),
             "copy-out");
  cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
}

std::unique_ptr<Backend> make_tensorrt_backend(const Bundle& bundle) {
  return std::make_unique<TensorRtBackend>(bundle);
}

}  // namespace esrdf::detail
