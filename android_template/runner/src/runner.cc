// The native runner: the C++ twin of edgedeploy/runtime/engine.py + runner.py.
//
// Uses only the tvm-ffi C++ API and global functions of libtvm_runtime:
//   model library -> vm_load_executable -> vm_initialization -> _metadata / create_paged_kv_cache /
//   prefill / decode, the vm.builtin.kv_state_* sequence protocol, runtime.TVMTensor* for arrays.
// Weights are read tensor by tensor with pread() straight into the runtime's arrays (as the Python
// engine does), so the peak RSS is weights + KV cache + activations, never a second copy of a shard.
#include "runner.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace edgedeploy {
namespace {

namespace ffi = tvm::ffi;
using JObj = ffi::Map<ffi::Any, ffi::Any>;
using JArr = ffi::Array<ffi::Any>;
using Clock = std::chrono::steady_clock;

constexpr int kResultSchema = 1;
constexpr int kManifestSchema = 1;

// Errors of the two kinds the Python runner reports (error_kind "input" / "runtime").
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct RuntimeFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// ---- JSON in (through tvm-ffi's parser) ------------------------------------------------------------

std::string ReadFile(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot read " + what + " (" + std::strerror(errno) + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

ffi::Any ParseJson(const std::string& text, const std::string& where) {
  ffi::String err;
  ffi::Any v = ffi::json::Parse(ffi::String(text), &err);
  if (!err.empty()) throw InputError(where + ": not valid JSON (" + std::string(err) + ")");
  return v;
}

JObj AsObj(const ffi::Any& v, const std::string& where) {
  if (auto o = v.as<JObj>()) return *o;
  throw InputError(where + ": expected a JSON object");
}

std::optional<ffi::Any> Find(const JObj& o, const char* key) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) return std::nullopt;
  return (*it).second;
}

ffi::Any Need(const JObj& o, const char* key, const std::string& where) {
  auto v = Find(o, key);
  if (!v) throw InputError(where + ": missing field '" + key + "'");
  return *v;
}

int64_t AsInt(const ffi::Any& v, const std::string& what) {
  if (auto i = v.as<int64_t>()) return *i;
  throw InputError(what + " must be an integer");
}

std::string AsStr(const ffi::Any& v, const std::string& what) {
  if (auto s = v.as<ffi::String>()) return std::string(*s);
  throw InputError(what + " must be a string");
}

std::vector<int64_t> AsIntList(const ffi::Any& v, const std::string& what) {
  auto a = v.as<JArr>();
  if (!a) throw InputError(what + " must be a list of integers");
  std::vector<int64_t> out;
  for (const ffi::Any& x : *a) out.push_back(AsInt(x, what + " item"));
  return out;
}

// ---- JSON out: an ordered object of raw JSON values ------------------------------------------------

std::string Quote(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\r': o += "\\r"; break;
      case '\t': o += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          o += buf;
        } else {
          o += static_cast<char>(c);  // UTF-8 passes through unchanged
        }
    }
  }
  return o + "\"";
}

std::string Num(double x) {
  if (!std::isfinite(x)) return "0.0";
  char buf[32];
  for (int precision = 15; precision <= 17; ++precision) {  // the shortest form that reads back exactly
    std::snprintf(buf, sizeof(buf), "%.*g", precision, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";  // keep it a float, as Python's json does
  return s;
}

std::string IntList(const std::vector<int64_t>& v) {
  std::string o = "[";
  for (size_t i = 0; i < v.size(); ++i) o += (i ? ", " : "") + std::to_string(v[i]);
  return o + "]";
}

class JsonLine {
 public:
  void Set(const std::string& key, const std::string& raw) {
    for (auto& kv : fields_) {
      if (kv.first == key) {
        kv.second = raw;
        return;
      }
    }
    fields_.emplace_back(key, raw);
  }
  void Str(const std::string& key, const std::string& v) { Set(key, Quote(v)); }
  void Int(const std::string& key, int64_t v) { Set(key, std::to_string(v)); }
  void Float(const std::string& key, double v) { Set(key, Num(v)); }
  void Bool(const std::string& key, bool v) { Set(key, v ? "true" : "false"); }
  void Null(const std::string& key) { Set(key, "null"); }
  std::string Dump() const {
    std::string o = "{";
    for (size_t i = 0; i < fields_.size(); ++i) o += (i ? ", " : "") + Quote(fields_[i].first) + ": " + fields_[i].second;
    return o + "}";
  }

 private:
  std::vector<std::pair<std::string, std::string>> fields_;
};

// ---- process facts ---------------------------------------------------------------------------------

// Seconds since boot, suspend included (CLOCK_BOOTTIME; 0 where the clock is missing).
double BootSeconds() {
  timespec ts{};
  if (clock_gettime(CLOCK_BOOTTIME, &ts) != 0) return 0.0;
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// VmRSS now, in bytes (0 when /proc cannot be read).
int64_t CurrentRss() {
  int64_t rss = 0;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long long kb = 0;
    while (std::fgets(line, sizeof(line), f))
      if (std::sscanf(line, "VmRSS: %lld kB", &kb) == 1) rss = kb * 1024;
    std::fclose(f);
  }
  return rss;
}

void AddMemoryFields(JsonLine* out) {
  int64_t hwm = 0, rss = 0;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof(line), f)) {
      long long kb = 0;
      if (std::sscanf(line, "VmHWM: %lld kB", &kb) == 1) hwm = kb * 1024;
      if (std::sscanf(line, "VmRSS: %lld kB", &kb) == 1) rss = kb * 1024;
    }
    std::fclose(f);
  }
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  out->Int("peak_rss_bytes", hwm);
  out->Int("rss_bytes", rss);
  out->Int("maxrss_bytes", static_cast<int64_t>(ru.ru_maxrss) * 1024);  // Linux: KiB
}

std::string MachineName() {
  struct utsname u {};
  return uname(&u) == 0 ? std::string(u.machine) : "unknown";
}

std::string JoinPath(const std::string& dir, const std::string& rel) {
  if (!rel.empty() && rel[0] == '/') return rel;
  return dir.empty() || dir.back() == '/' ? dir + rel : dir + "/" + rel;
}

bool IsFile(const std::string& path, int64_t* size = nullptr) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  if (size) *size = st.st_size;
  return true;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A file name from a manifest or weights index must stay inside the bundle: relative, no "." or ".."
// component, no backslash or control character (edgedeploy.bundle.safe_relative_name's rules).
std::string SafeName(const std::string& name, const std::string& where) {
  bool ok = !name.empty() && name[0] != '/' && name.size() <= 1024;
  for (char c : name) ok = ok && c != '\\' && static_cast<unsigned char>(c) >= 32 && c != 0x7f;
  std::stringstream parts(name);
  std::string part;
  while (ok && std::getline(parts, part, '/')) ok = !part.empty() && part != "." && part != ".." && part.size() <= 255;
  if (!ok || name.back() == '/') throw InputError(where + ": file name '" + name + "' is not a plain relative name inside the folder");
  return name;
}

// Every entry below `dir` (relative names), links not followed.
void ListTree(const std::string& root, const std::string& rel, std::map<std::string, mode_t>* out) {
  std::string dir = rel.empty() ? root : JoinPath(root, rel);
  DIR* d = opendir(dir.c_str());
  if (!d) throw InputError(dir + ": cannot list (" + std::strerror(errno) + ")");
  std::vector<std::string> subdirs;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    std::string child = rel.empty() ? name : rel + "/" + name;
    struct stat st {};
    if (lstat(JoinPath(root, child).c_str(), &st) != 0) continue;
    (*out)[child] = st.st_mode;
    if (S_ISDIR(st.st_mode)) subdirs.push_back(child);
    if (out->size() > 100000) break;
  }
  closedir(d);
  for (const auto& sub : subdirs) ListTree(root, sub, out);
}

// ---- the bundle ------------------------------------------------------------------------------------

struct Manifest {
  std::string target, dtype, library, weights_index;
  std::set<std::string> files;  // what bundle.json lists: the only files the runner may read
  int64_t context_window = 0, kv_bytes_per_token = 0;
  std::vector<int64_t> stop_token_ids;
};

Manifest ReadManifest(const std::string& bundle, bool verify) {
  struct stat st {};
  if (stat(bundle.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) throw InputError(bundle + ": no such bundle folder");
  const std::string path = JoinPath(bundle, "bundle.json");
  if (!IsFile(path)) throw InputError(bundle + ": not a bundle (no bundle.json); make one with `edgedeploy build`");
  JObj m = AsObj(ParseJson(ReadFile(path, "manifest"), path), path);
  auto schema = Find(m, "schema_version");
  if (!schema || schema->as<int64_t>() != std::optional<int64_t>(kManifestSchema)) {
    throw InputError(path + ": schema_version is not " + std::to_string(kManifestSchema) +
                     "; rebuild the bundle with this edgedeploy");
  }
  Manifest man;
  man.target = AsStr(Need(m, "target", path), path + ": target");
  man.dtype = AsStr(Need(m, "dtype", path), path + ": dtype");
  man.library = AsStr(Need(m, "library", path), path + ": library");
  man.weights_index = AsStr(Need(m, "weights_index", path), path + ": weights_index");
  man.context_window = AsInt(Need(m, "context_window", path), path + ": context_window");
  man.stop_token_ids = AsIntList(Need(m, "stop_token_ids", path), path + ": stop_token_ids");
  JObj cfg = AsObj(Need(m, "config", path), path + ": config");
  // ModelConfig.kv_bytes_per_token (FP16 K and V over all layers), doubled for FP32 bundles.
  man.kv_bytes_per_token = 2 * AsInt(Need(cfg, "num_layers", path), "num_layers") *
                           AsInt(Need(cfg, "num_kv_heads", path), "num_kv_heads") *
                           AsInt(Need(cfg, "head_dim", path), "head_dim") * 2 * (man.dtype == "float32" ? 2 : 1);
  // Names, existence and sizes always; sha256 is the host's job (the push verifies every file on the
  // device, and re-hashes any that changed since), so `verify` has nothing more to add here.
  (void)verify;
  for (const auto& kv : AsObj(Need(m, "files", path), path + ": files")) {
    std::string rel = SafeName(AsStr(kv.first, "file name"), path);
    if (rel == "bundle.json") throw InputError(path + ": the manifest cannot list itself");
    struct stat st {};
    if (lstat(JoinPath(bundle, rel).c_str(), &st) != 0) throw InputError(bundle + ": file " + rel + " is missing from the bundle");
    if (!S_ISREG(st.st_mode)) throw InputError(bundle + ": file " + rel + " is not a regular file (a link or a folder)");
    auto want = Find(AsObj(kv.second, rel), "bytes");
    if (!want || want->as<int64_t>() != std::optional<int64_t>(st.st_size)) {
      throw InputError(bundle + ": file " + rel + " was altered (size differs from bundle.json)");
    }
    man.files.insert(rel);
  }
  for (const std::string* name : {&man.library, &man.weights_index}) {
    if (!man.files.count(SafeName(*name, path))) throw InputError(path + ": '" + *name + "' is not among the files the manifest lists");
  }
  // A library linked on the host from the listed .tar sits beside it; the push verified its hash.
  std::set<std::string> allowed = man.files;
  allowed.insert("bundle.json");
  if (EndsWith(man.library, ".tar")) allowed.insert(man.library.substr(0, man.library.size() - 4) + ".so");
  std::map<std::string, mode_t> tree;
  ListTree(bundle, "", &tree);
  for (const auto& [rel, mode] : tree) {
    bool parent_of_listed = S_ISDIR(mode) && std::any_of(allowed.begin(), allowed.end(), [&](const std::string& f) {
      return f.compare(0, rel.size() + 1, rel + "/") == 0;
    });
    if (!allowed.count(rel) && !parent_of_listed) {
      throw InputError(bundle + ": file " + rel + " is not listed in bundle.json; a bundle holds only the files its manifest lists");
    }
  }
  return man;
}

struct Prompt {
  std::vector<int64_t> token_ids;
  std::optional<int64_t> max_new_tokens;
  std::optional<std::vector<int64_t>> stop_token_ids;
};

Prompt ReadPrompt(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot read prompt file (" + std::strerror(errno) + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  ffi::String err;
  ffi::Any v = ffi::json::Parse(ffi::String(ss.str()), &err);
  if (!err.empty()) throw InputError(path + ": prompt file is not valid JSON (" + std::string(err) + ")");
  Prompt p;
  std::optional<ffi::Any> ids;
  if (auto arr = v.as<JArr>()) {
    ids = v;
  } else if (auto obj = v.as<JObj>()) {
    ids = Find(*obj, "token_ids");
    if (auto mx = Find(*obj, "max_new_tokens")) p.max_new_tokens = AsInt(*mx, path + ": max_new_tokens");
    if (auto st = Find(*obj, "stop_token_ids")) p.stop_token_ids = AsIntList(*st, path + ": stop_token_ids");
  }
  const std::string bad = path + ": 'token_ids' must be a non-empty list of non-negative integers";
  auto list = ids ? ids->as<JArr>() : std::nullopt;
  if (!list || list->empty()) throw InputError(bad);
  for (const ffi::Any& x : *list) {
    auto i = x.as<int64_t>();
    if (!i || *i < 0) throw InputError(bad);
    p.token_ids.push_back(*i);
  }
  return p;
}

// ---- the engine ------------------------------------------------------------------------------------

ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f) throw RuntimeFailure(std::string("the TVM runtime lacks ") + name + " (libtvm_runtime.so not linked?)");
  return *f;
}

ffi::Function ModuleFunc(const ffi::Module& mod, const char* name) {
  auto f = mod->GetFunction(name);
  if (!f) throw InputError(std::string("the model library has no function ") + name);
  return *f;
}

class Engine {
 public:
  static constexpr int64_t kSeqId = 0;

  Engine(std::string bundle_dir, std::string library_path, DLDevice dev)
      : bundle_(std::move(bundle_dir)), library_(std::move(library_path)), dev_(dev) {}

  // `files`: the manifest's list; the weights index may name only shards among them.
  double Load(const std::string& weights_index, const std::set<std::string>& files) {
    auto t0 = Clock::now();
    if (!IsFile(library_)) throw InputError(library_ + ": no such model library");
    std::optional<ffi::Module> lib;
    try {
      lib = ffi::Module::LoadFromFile(library_);
    } catch (const ffi::Error& e) {
      throw InputError(library_ + ": cannot load model library (" + e.message() + ")");
    }
    vm_ = ModuleFunc(*lib, "vm_load_executable")().cast<ffi::Module>();
    // (device type, id, allocator: 2 = pooled) for the model's device, then the host CPU if different.
    if (dev_.device_type == kDLCPU) {
      ModuleFunc(*vm_, "vm_initialization")(static_cast<int>(dev_.device_type), dev_.device_id, 2);
    } else {
      ModuleFunc(*vm_, "vm_initialization")(static_cast<int>(dev_.device_type), dev_.device_id, 2,
                                           static_cast<int>(kDLCPU), 0, 2);
    }
    std::string meta_text;
    try {
      meta_text = std::string(ModuleFunc(*vm_, "_metadata")().cast<ffi::String>());
    } catch (const std::exception& e) {
      throw InputError(library_ + ": not an edgedeploy model library (no _metadata: " + e.what() + ")");
    }
    meta_ = AsObj(ParseJson(meta_text, "_metadata"), "_metadata");
    context_window_ = AsInt(Need(meta_, "context_window", "_metadata"), "context_window");
    prefill_chunk_ = AsInt(Need(meta_, "prefill_chunk", "_metadata"), "prefill_chunk");
    page_size_ = AsInt(Need(meta_, "page_size", "_metadata"), "page_size");
    vocab_size_ = AsInt(Need(meta_, "vocab_size", "_metadata"), "vocab_size");
    alloc_ = Global("runtime.TVMTensorAllocWithScope");
    copy_from_ = Global("runtime.TVMTensorCopyFromBytes");
    copy_to_ = Global("runtime.TVMTensorCopyToBytes");
    LoadParams(weights_index, files);
    using S = ffi::Shape;
    cache_ = ModuleFunc(*vm_, "create_paged_kv_cache")(S({1}), S({context_window_}), S({prefill_chunk_}),
                                                      S({page_size_}), S({0}));
    add_seq_ = Global("vm.builtin.kv_state_add_sequence");
    remove_seq_ = Global("vm.builtin.kv_state_remove_sequence");
    begin_ = Global("vm.builtin.kv_state_begin_forward");
    end_ = Global("vm.builtin.kv_state_end_forward");
    prefill_ = ModuleFunc(*vm_, "prefill");
    decode_ = ModuleFunc(*vm_, "decode");
    load_s_ = Seconds(t0, Clock::now());
    return load_s_;
  }

  int64_t context_window() const { return context_window_; }
  double load_s() const { return load_s_; }

  void Reset() {
    if (seq_open_) remove_seq_(cache_, kSeqId);
    add_seq_(cache_, kSeqId);
    seq_open_ = true;
    seq_len_ = 0;
  }

  void TouchKvCache() {
    Reset();
    PrefillAll(std::vector<int64_t>(static_cast<size_t>(context_window_), 0));
    Reset();
  }

  struct Generation {
    std::vector<int64_t> token_ids;
    double ttft_s = 0, prefill_tok_s = 0, decode_tok_s = 0;
    int64_t prefill_tokens = 0, decode_tokens = 0;
    std::string finish_reason = "length";
  };

  Generation Generate(const std::vector<int64_t>& prompt, int64_t max_new_tokens, const std::set<int64_t>& stops) {
    if (static_cast<int64_t>(prompt.size()) > context_window_) {
      throw InputError("prompt of " + std::to_string(prompt.size()) + " tokens is longer than the context window (" +
                       std::to_string(context_window_) + " tokens)");
    }
    Generation g;
    Reset();
    auto t0 = Clock::now();
    int64_t token = Argmax(PrefillAll(prompt));
    g.ttft_s = Seconds(t0, Clock::now());
    int64_t steps = 0;
    auto t1 = Clock::now();
    if (max_new_tokens > 0) {
      g.token_ids.push_back(token);
      while (true) {
        if (stops.count(token)) {
          g.finish_reason = "stop";
          break;
        }
        if (static_cast<int64_t>(g.token_ids.size()) >= max_new_tokens) break;
        if (seq_len_ >= context_window_) {
          g.finish_reason = "context";
          break;
        }
        token = Argmax(Forward(decode_, {token}));
        ++steps;
        g.token_ids.push_back(token);
      }
    }
    double decode_s = Seconds(t1, Clock::now());
    g.prefill_tokens = static_cast<int64_t>(prompt.size());
    g.decode_tokens = steps;
    g.prefill_tok_s = g.ttft_s > 0 ? g.prefill_tokens / g.ttft_s : 0.0;
    g.decode_tok_s = steps && decode_s > 0 ? steps / decode_s : 0.0;
    return g;
  }

 private:
  ffi::Tensor Empty(const std::vector<int64_t>& shape, DLDataType dtype) {
    return alloc_(ffi::Shape(shape), dtype, dev_, ffi::Optional<ffi::String>()).cast<ffi::Tensor>();
  }

  void LoadParams(const std::string& weights_index, const std::set<std::string>& files) {
    std::string index = JoinPath(bundle_, weights_index);
    if (!IsFile(index)) throw InputError(bundle_ + ": no " + weights_index + " (weights) in the bundle");
    JObj cache = AsObj(ParseJson(ReadFile(index, "weights index"), index), index);
    std::map<std::string, std::pair<std::string, JObj>> records;  // name -> (shard file, record)
    auto shards = Need(cache, "records", index).as<JArr>();
    if (!shards) throw InputError(index + ": 'records' must be a list");
    for (const ffi::Any& s : *shards) {
      JObj shard = AsObj(s, index);
      std::string data_path = SafeName(AsStr(Need(shard, "dataPath", index), "dataPath"), index);
      if (!files.count(data_path) || data_path == weights_index) {
        throw InputError(index + ": shard '" + data_path + "' is not a weights file listed in bundle.json");
      }
      auto recs = Need(shard, "records", index).as<JArr>();
      if (!recs) throw InputError(index + ": a shard's 'records' must be a list");
      for (const ffi::Any& r : *recs) {
        JObj rec = AsObj(r, index);
        records[AsStr(Need(rec, "name", index), "name")] = {data_path, rec};
      }
    }
    auto params = Need(meta_, "params", "_metadata").as<JArr>();
    if (!params) throw InputError("_metadata: 'params' must be a list");
    std::map<std::string, int> fds;
    std::vector<char> staging;  // only for non-CPU devices
    std::vector<ffi::Tensor> out;
    try {
      for (const ffi::Any& pa : *params) {
        JObj p = AsObj(pa, "_metadata param");
        std::string name = AsStr(Need(p, "name", "_metadata"), "name");
        std::vector<int64_t> shape = AsIntList(Need(p, "shape", "_metadata"), "shape");
        std::string dtype = AsStr(Need(p, "dtype", "_metadata"), "dtype");
        auto it = records.find(name);
        if (it == records.end()) throw InputError(index + ": weights lack parameter '" + name + "'");
        const JObj& rec = it->second.second;
        std::string rdtype = AsStr(Need(rec, "dtype", index), "dtype");
        std::vector<int64_t> rshape = AsIntList(Need(rec, "shape", index), "shape");
        auto fmt = Find(rec, "format");
        if (rshape != shape || rdtype != dtype || (fmt && AsStr(*fmt, "format") != "raw")) {
          throw InputError(index + ": " + name + " is " + rdtype + IntList(rshape) + ", the library expects " + dtype +
                           IntList(shape));
        }
        DLDataType dt = ffi::StringToDLDataType(ffi::String(dtype));
        int64_t nbytes = (dt.bits * dt.lanes + 7) / 8;
        for (int64_t d : shape) nbytes *= d;
        int64_t rec_bytes = AsInt(Need(rec, "nbytes", index), "nbytes");
        if (rec_bytes != nbytes) {
          throw InputError(index + ": " + name + " has " + std::to_string(rec_bytes) + " bytes, expected " +
                           std::to_string(nbytes));
        }
        const std::string& shard = it->second.first;
        if (!fds.count(shard)) {
          int fd = open(JoinPath(bundle_, shard).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
          if (fd < 0) throw InputError(JoinPath(bundle_, shard) + ": cannot open weight shard (" + std::strerror(errno) + ")");
          fds[shard] = fd;
        }
        ffi::Tensor arr = Empty(shape, dt);
        char* dst = static_cast<char*>(arr.data_ptr()) + arr.byte_offset();
        if (dev_.device_type != kDLCPU) {
          staging.resize(static_cast<size_t>(nbytes));
          dst = staging.data();
        }
        PreadAll(fds[shard], dst, nbytes, AsInt(Need(rec, "byteOffset", index), "byteOffset"));
        if (dev_.device_type != kDLCPU) copy_from_(arr, static_cast<void*>(dst), nbytes);
        out.push_back(arr);
      }
    } catch (...) {
      for (auto& kv : fds) close(kv.second);
      throw;
    }
    for (auto& kv : fds) close(kv.second);
    params_ = ffi::Array<ffi::Tensor>(out.begin(), out.end());
  }

  static void PreadAll(int fd, char* dst, int64_t nbytes, int64_t offset) {
    int64_t done = 0;
    while (done < nbytes) {
      ssize_t got = pread(fd, dst + done, static_cast<size_t>(nbytes - done), static_cast<off_t>(offset + done));
      if (got <= 0) {
        throw InputError("weight shard ends early (wanted " + std::to_string(nbytes) + " bytes at offset " +
                         std::to_string(offset) + ")");
      }
      done += got;
    }
  }

  void CheckIds(const std::vector<int64_t>& ids) const {
    for (int64_t t : ids) {
      // The embedding gather does not bounds-check; an out-of-range id would read wild memory.
      if (t < 0 || t >= vocab_size_) {
        throw InputError("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                         std::to_string(vocab_size_ - 1) + ")");
      }
    }
  }

  // One forward over ids (begin_forward ... end_forward); returns the float32 logits of the last token.
  std::vector<float> Forward(const ffi::Function& fn, const std::vector<int64_t>& ids) {
    const int64_t n = static_cast<int64_t>(ids.size());
    if (seq_len_ + n > context_window_) {
      throw InputError("KV cache full: " + std::to_string(seq_len_) + " + " + std::to_string(n) +
                       " tokens exceed the context window of " + std::to_string(context_window_));
    }
    std::vector<int32_t> host(ids.begin(), ids.end());
    ffi::Tensor data = Empty({1, n}, DLDataType{kDLInt, 32, 1});
    copy_from_(data, static_cast<void*>(host.data()), static_cast<int64_t>(host.size() * sizeof(int32_t)));
    begin_(cache_, ffi::Shape({kSeqId}), ffi::Shape({n}));
    ffi::Tensor logits;
    try {
      auto out = fn(data, cache_, params_).cast<ffi::Array<ffi::Any>>();
      logits = out[0].cast<ffi::Tensor>();
      cache_ = out[1];
    } catch (const std::exception& e) {
      end_(cache_);
      throw RuntimeFailure(std::string("model run failed: ") + e.what());
    }
    end_(cache_);
    seq_len_ += n;
    if (logits.dtype() != DLDataType{kDLFloat, 32, 1}) throw RuntimeFailure("the model's logits are not float32");
    const int64_t count = logits.numel();
    std::vector<float> values(static_cast<size_t>(count));
    copy_to_(logits, static_cast<void*>(values.data()), static_cast<int64_t>(count * sizeof(float)));
    return values;
  }

  // Feed ids in chunks of at most prefill_chunk; return the last chunk's logits.
  std::vector<float> PrefillAll(const std::vector<int64_t>& ids) {
    if (ids.empty()) throw InputError("empty prompt");
    const int64_t n = static_cast<int64_t>(ids.size());
    if (seq_len_ + n > context_window_) {
      throw InputError("prompt of " + std::to_string(n) + " tokens does not fit the context window of " +
                       std::to_string(context_window_) + " tokens (" + std::to_string(seq_len_) + " already used)");
    }
    CheckIds(ids);
    std::vector<float> logits;
    for (int64_t i = 0; i < n; i += prefill_chunk_) {
      auto end = ids.begin() + std::min(n, i + prefill_chunk_);
      logits = Forward(prefill_, std::vector<int64_t>(ids.begin() + i, end));
    }
    return logits;
  }

  // Index of the first maximum, as numpy.argmax.
  static int64_t Argmax(const std::vector<float>& v) {
    if (v.empty()) throw RuntimeFailure("the model returned empty logits");
    size_t best = 0;
    for (size_t i = 1; i < v.size(); ++i) {
      if (v[i] > v[best] || (std::isnan(v[i]) && !std::isnan(v[best]))) best = i;
      if (std::isnan(v[best])) break;  // numpy: the first NaN wins
    }
    return static_cast<int64_t>(best);
  }

  std::string bundle_, library_;
  DLDevice dev_;
  std::optional<ffi::Module> vm_;
  JObj meta_;
  ffi::Array<ffi::Tensor> params_;
  ffi::Any cache_;
  ffi::Function alloc_, copy_from_, copy_to_, add_seq_, remove_seq_, begin_, end_, prefill_, decode_;
  int64_t context_window_ = 0, prefill_chunk_ = 0, page_size_ = 0, vocab_size_ = 0, seq_len_ = 0;
  bool seq_open_ = false;
  double load_s_ = 0;
};

// The library to load: --library, else the manifest's; a .tar of objects must have been linked
// into a shared library beside it (model.tar -> model.so) for the machine that runs it.
std::string ResolveLibrary(const RunOptions& o, const Manifest& m) {
  if (!o.library.empty()) return o.library;
  std::string lib = JoinPath(o.bundle_dir, m.library);
  if (EndsWith(lib, ".tar")) {
    std::string so = lib.substr(0, lib.size() - 4) + ".so";
    if (IsFile(so)) return so;
    throw InputError(lib + ": holds unlinked objects; link them into " + so +
                     " (edgedeploy.runtime.native.link_aarch64_library, or the NDK's clang for Android) "
                     "or pass --library");
  }
  return lib;
}

DLDevice ResolveDevice(const RunOptions& o, const Manifest& m) {
  std::string d = o.device.empty() ? (m.target == "android-opencl" ? "opencl" : "cpu") : o.device;
  if (d == "cpu") return DLDevice{kDLCPU, 0};
  if (d == "opencl") return DLDevice{kDLOpenCL, 0};
  throw InputError("--device must be cpu or opencl, not '" + d + "'");
}

const char* kUsage =
    "usage: edgedeploy-runner BUNDLE_DIR --prompt-file F [--max-new-tokens N] [--threads N] [--touch-kv] "
    "[--no-verify] [--library PATH] [--device cpu|opencl]";

RunOptions ParseArgs(const std::vector<std::string>& args) {
  RunOptions o;
  auto value = [&](size_t* i) -> const std::string& {
    if (*i + 1 >= args.size()) throw InputError(args[*i] + " needs a value; " + kUsage);
    return args[++*i];
  };
  auto integer = [&](size_t* i) -> int {
    const std::string& name = args[*i];
    const std::string& v = value(i);
    char* end = nullptr;
    long x = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0') throw InputError(name + ": invalid int value '" + v + "'");
    return static_cast<int>(x);
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--prompt-file") o.prompt_file = value(&i);
    else if (a == "--max-new-tokens") o.max_new_tokens = integer(&i);
    else if (a == "--threads") {
      o.threads = integer(&i);
      if (o.threads <= 0) throw InputError("--threads must be a positive count, not " + std::to_string(o.threads));
    }
    else if (a == "--touch-kv") o.touch_kv = true;
    else if (a == "--no-verify") o.verify = false;
    else if (a == "--library") o.library = value(&i);
    else if (a == "--device") o.device = value(&i);
    else if (!a.empty() && a[0] == '-') throw InputError("unknown option " + a + "; " + kUsage);
    else if (o.bundle_dir.empty()) o.bundle_dir = a;
    else throw InputError("unexpected argument " + a + "; " + kUsage);
  }
  if (o.bundle_dir.empty() || o.prompt_file.empty()) throw InputError(std::string("missing arguments; ") + kUsage);
  return o;
}

// The CPUs of a run without --threads (edgedeploy/runtime/cpus.py's rule): every CPU this process may
// run on, less the slowest cluster of a big.LITTLE chip; the process is pinned to them so TVM's pool
// never lands on a little core. With --threads, the allowed CPUs as they are.
struct CpuPlan {
  int threads = 0;
  std::vector<int64_t> cpus;
  bool by_default = false;
};

int64_t MaxFreqKhz(int cpu) {
  std::ifstream f("/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/cpufreq/cpuinfo_max_freq");
  int64_t khz = 0;
  return (f >> khz) ? khz : 0;
}

CpuPlan PlanThreads(int requested) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int64_t> allowed;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) if (CPU_ISSET(c, &set)) allowed.push_back(c);
  }
  if (allowed.empty()) allowed.push_back(0);
  CpuPlan plan;
  if (requested > 0) {
    plan.threads = requested;
    plan.cpus = allowed;
    return plan;
  }
  std::map<int64_t, int64_t> freq;
  std::set<int64_t> clocks;
  for (int64_t c : allowed) clocks.insert(freq[c] = MaxFreqKhz(static_cast<int>(c)));
  plan.cpus = allowed;
  if (!clocks.count(0) && clocks.size() > 1) {
    plan.cpus.clear();
    CPU_ZERO(&set);
    for (int64_t c : allowed) {
      if (freq[c] > *clocks.begin()) {
        plan.cpus.push_back(c);
        CPU_SET(static_cast<int>(c), &set);
      }
    }
    sched_setaffinity(0, sizeof(set), &set);
  }
  plan.threads = static_cast<int>(plan.cpus.size());
  plan.by_default = true;
  return plan;
}

JsonLine Header(const CpuPlan& cpu) {
  JsonLine line;
  line.Int("schema_version", kResultSchema);
  line.Str("runner", "native");
  line.Str("runner_abi", MachineName());
  line.Int("pid", static_cast<int64_t>(getpid()));
  line.Int("threads", cpu.threads);
  line.Set("cpus", IntList(cpu.cpus));
  line.Bool("threads_default", cpu.by_default);
  return line;
}

std::string Finish(JsonLine line, int code, int* exit_code, const std::string& error = "", const char* kind = "") {
  if (code != kExitOk) {
    line.Str("error", error);
    line.Str("error_kind", kind);
  }
  AddMemoryFields(&line);
  *exit_code = code;
  return line.Dump();
}

}  // namespace

std::string Run(const RunOptions& o, int* exit_code) {
  const CpuPlan cpu = PlanThreads(o.threads);
  JsonLine line = Header(cpu);
  Prompt prompt;
  try {
    prompt = ReadPrompt(o.prompt_file);
  } catch (const InputError& e) {
    return Finish(line, kExitInput, exit_code, e.what(), "input");
  }
  setenv("TVM_NUM_THREADS", std::to_string(cpu.threads).c_str(), 1);  // read once, at pool creation
  try {
    Manifest m = ReadManifest(o.bundle_dir, o.verify);
    line.Str("target", m.target);
    line.Str("dtype", m.dtype);
    line.Int("context_window", m.context_window);
    line.Int("kv_bytes_per_token", m.kv_bytes_per_token);
    Global("runtime.config_threadpool")(0, cpu.threads);
    Engine engine(o.bundle_dir, ResolveLibrary(o, m), ResolveDevice(o, m));
    // The runtime's own base, before the weights load (`edgedeploy calibrate` records it).
    line.Int("base_rss_bytes", CurrentRss());
    engine.Load(m.weights_index, m.files);
    if (o.touch_kv) engine.TouchKvCache();
    int64_t max_new = o.max_new_tokens >= 0 ? o.max_new_tokens : prompt.max_new_tokens.value_or(32);
    std::vector<int64_t> stop_list = prompt.stop_token_ids.value_or(m.stop_token_ids);
    // CLOCK_BOOTTIME (what /proc/uptime counts) around generation, as the Python runner stamps it: the
    // profiler lines the phases up with the fuel-gauge samples it stamps with /proc/uptime.
    const double gen_start = BootSeconds();
    Engine::Generation g = engine.Generate(prompt.token_ids, max_new, std::set<int64_t>(stop_list.begin(), stop_list.end()));
    line.Set("phase_clock", "{\"clock\": \"boottime\", \"generate_start\": " + Num(gen_start) +
                                ", \"generate_end\": " + Num(BootSeconds()) + "}");
    line.Int("prompt_tokens", g.prefill_tokens);
    line.Set("token_ids", IntList(g.token_ids));
    line.Str("finish_reason", g.finish_reason);
    line.Float("load_s", engine.load_s());
    line.Float("ttft_s", g.ttft_s);
    line.Float("prefill_tok_s", g.prefill_tok_s);
    line.Float("decode_tok_s", g.decode_tok_s);
    line.Int("prefill_tokens", g.prefill_tokens);
    line.Int("decode_tokens", g.decode_tokens);
    line.Bool("kv_touched", o.touch_kv);
    line.Null("error");
  } catch (const InputError& e) {
    return Finish(line, kExitInput, exit_code, e.what(), "input");
  } catch (const RuntimeFailure& e) {
    return Finish(line, kExitRuntime, exit_code, e.what(), "runtime");
  } catch (const ffi::Error& e) {
    return Finish(line, kExitRuntime, exit_code, e.kind() + ": " + e.message(), "runtime");
  } catch (const std::exception& e) {
    return Finish(line, kExitRuntime, exit_code, e.what(), "runtime");
  }
  return Finish(line, kExitOk, exit_code);
}

std::string RunCommandLine(const std::vector<std::string>& args, int* exit_code) {
  RunOptions o;
  try {
    o = ParseArgs(args);
  } catch (const InputError& e) {
    return Finish(Header(CpuPlan{}), kExitInput, exit_code, e.what(), "input");
  }
  return Run(o, exit_code);
}

}  // namespace edgedeploy
