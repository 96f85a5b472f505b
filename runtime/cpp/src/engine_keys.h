// Internal: which TensorRT plans of a bundle this machine may run (the EngineKey check of
// esrdf/engines/tensorrt_engine.py). Plain C++, compiled and tested without TensorRT or CUDA.
#pragma once

#include <string>

#include "esrdf/esrdf.h"

namespace esrdf::detail {

struct MachineIdentity {
  std::string tensorrt_version;    // MAJOR.MINOR.PATCH (tensorrt_version_key), as Python's version_key
  std::string gpu_name;            // cudaDeviceProp::name
  std::string compute_capability;  // "major.minor"
};

struct EnginePair {
  const EngineEntry* predictor = nullptr;
  const EngineEntry* step = nullptr;
};

// The plan key of a TensorRT version, MAJOR.MINOR.PATCH: "10.13.3" (esrdf.engines.tensorrt_build.version_key
// makes the same string from trt.__version__; the build number is not part of the key).
std::string tensorrt_version_key(int major, int minor, int patch);

// A version string's key: its first three dot-separated parts ("10.13.3.9" -> "10.13.3"), so plans of older
// manifests, keyed with four parts, still match; a string with fewer parts is returned as it is.
std::string version_key(const std::string& version);

// What differs between a plan's key and this machine + the bundle's ONNX graph; empty when usable.
std::string key_mismatches(const EngineKey& key, const MachineIdentity& here, const FileEntry* onnx_graph);

// The one command that rebuilds plans for this machine (of key's profile, else the bundle's tile/batch).
std::string tensorrt_rebuild_command(const Bundle& bundle, const EngineKey* key);

// Usable fp16 plans of both graphs, else fp32 ones; Error(kStale) naming what differs and the rebuild
// command, or Error(kNotFound) when the bundle has no plans at all.
EnginePair select_engines(const Bundle& bundle, const MachineIdentity& here);

}  // namespace esrdf::detail
