// Minimal assertions for the ctest executables: ctest needs only an exit status, and a test framework
// (GoogleTest, Catch2) would add a dependency and minutes of compile time on a 2-core machine.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "esrdf/esrdf.h"

namespace check {

inline int failures = 0;

inline void expect(bool ok, const char* expr, const char* file, int line, const std::string& note = "") {
  if (!ok) {
    std::fprintf(stderr, "%s:%d: FAILED: %s %s\n", file, line, expr, note.c_str());
    ++failures;
  }
}

// Runs fn, which must throw esrdf::Error with `code` and a message containing `needle`.
template <typename Fn>
void expect_error(Fn&& fn, esrdf::ErrorCode code, const std::string& needle, const char* file, int line) {
  try {
    fn();
    std::fprintf(stderr, "%s:%d: FAILED: no esrdf::Error thrown (wanted '%s')\n", file, line, needle.c_str());
    ++failures;
  } catch (const esrdf::Error& exc) {
    const bool ok = exc.code() == code && std::string(exc.what()).find(needle) != std::string::npos;
    if (!ok) {
      std::fprintf(stderr, "%s:%d: FAILED: error %d '%s', wanted %d containing '%s'\n", file, line,
                   static_cast<int>(exc.code()), exc.what(), static_cast<int>(code), needle.c_str());
      ++failures;
    }
  }
}

inline int finish(const char* name) {
  if (failures) std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures);
  else std::printf("%s: all checks passed\n", name);
  return failures ? 1 : 0;
}

inline int skip(const char* why) {
  std::printf("SKIPPED: %s\n", why);
  return 77;
}

}  // namespace check

#define CHECK(expr) ::check::expect(static_cast<bool>(expr), #expr, __FILE__, __LINE__)
#define CHECK_MSG(expr, note) ::check::expect(static_cast<bool>(expr), #expr, __FILE__, __LINE__, note)
#define CHECK_ERROR(stmt, code, needle) \
  ::check::expect_error([&] { stmt; }, code, needle, __FILE__, __LINE__)

#include <fstream>
#include <iterator>
#include <vector>

namespace check {

// Raw little-endian arrays exchanged with tests/test_cpp_runtime.py (numpy's tofile/fromfile).
template <typename T>
std::vector<T> read_array(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw esrdf::Error(esrdf::ErrorCode::kNotFound, path + ": cannot read test data");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<T> out(bytes.size() / sizeof(T));
  std::copy(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(out.size() * sizeof(T)),
            reinterpret_cast<char*>(out.data()));
  return out;
}

template <typename T>
void write_array(const std::string& path, const std::vector<T>& data) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(T)));
}

}  // namespace check
