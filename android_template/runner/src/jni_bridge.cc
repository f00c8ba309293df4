// JNI bridge: ai.edgedeploy.harness.RunnerBridge.run(String[] args) -> the runner's JSON result line.
// The args are the CLI's (without the program name), so the app and the CLI share every option.
#include <jni.h>

#include <string>
#include <vector>

#include "runner.h"

extern "C" JNIEXPORT jstring JNICALL Java_ai_edgedeploy_harness_RunnerBridge_run(JNIEnv* env, jclass,
                                                                                 jobjectArray jargs) {
  std::vector<std::string> args;
  const jsize n = jargs ? env->GetArrayLength(jargs) : 0;
  for (jsize i = 0; i < n; ++i) {
    auto s = static_cast<jstring>(env->GetObjectArrayElement(jargs, i));
    const char* chars = s ? env->GetStringUTFChars(s, nullptr) : nullptr;
    args.emplace_back(chars ? chars : "");
    if (chars) env->ReleaseStringUTFChars(s, chars);
    env->DeleteLocalRef(s);
  }
  int code = edgedeploy::kExitRuntime;
  std::string line = edgedeploy::RunCommandLine(args, &code);
  // NewStringUTF wants modified UTF-8: the line is ASCII except inside error messages, where any
  // non-ASCII byte is replaced so a bad path can never make the JVM abort.
  for (char& c : line) {
    if (static_cast<unsigned char>(c) >= 0x80) c = '?';
  }
  return env->NewStringUTF(line.c_str());
}
