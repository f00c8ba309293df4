// edgedeploy-runner BUNDLE_DIR --prompt-file F [--max-new-tokens N] [--threads N] [--touch-kv]
//                   [--no-verify] [--library PATH] [--device cpu|opencl]
// Prints one JSON result line on stdout; exit code 0 (ok), 2 (bad input) or 3 (runtime failure).
#include <cstdio>
#include <string>
#include <vector>

#include "runner.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int code = edgedeploy::kExitRuntime;
  std::string line = edgedeploy::RunCommandLine(args, &code);
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  return code;
}
