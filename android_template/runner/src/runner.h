// edgedeploy native runner: load a bundle with the TVM runtime, run one pre-tokenized prompt, and
// produce the same JSON result line as `python -m edgedeploy.runtime.runner`.
//
// The CLI (main.cc) and the Android JNI bridge (jni_bridge.cc) both call RunCommandLine().
#pragma once

#include <string>
#include <vector>

namespace edgedeploy {

constexpr int kExitOk = 0;
constexpr int kExitInput = 2;
constexpr int kExitRuntime = 3;

struct RunOptions {
  std::string bundle_dir;
  std::string prompt_file;
  std::string library;       // override of the manifest's library (e.g. an aarch64 model.so linked from model.tar)
  std::string device;        // "cpu" or "opencl"; empty: from the manifest's target
  int max_new_tokens = -1;   // -1: the prompt file's value, else 32
  int threads = 0;           // 0: the runtime's default (all cores)
  bool touch_kv = false;     // write the whole KV cache once after loading
  bool verify = true;        // check the bundle's files exist with their recorded sizes
};

// Run one invocation with the given arguments (argv without the program name).
// Returns the JSON result line (no newline); *exit_code gets 0, 2 (bad input) or 3 (runtime failure).
std::string RunCommandLine(const std::vector<std::string>& args, int* exit_code);

// The same, for already parsed options.
std::string Run(const RunOptions& opts, int* exit_code);

}  // namespace edgedeploy
