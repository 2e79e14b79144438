// TorchScript pieces tch does not bind: listing every operator a model file can run, weighing
// the tensors a loaded module holds, and a cap on CPU tensor memory. Every function catches
// C++ exceptions and reports failure instead of unwinding into Rust.
#include <torch/script.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

namespace {

char* dup(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

void collect_block(const torch::jit::Block* block, std::set<std::string>& ops) {
  for (const torch::jit::Node* node : block->nodes()) {
    std::string name = node->kind().toQualString();
    if (const c10::FunctionSchema* schema = node->maybeSchema()) {
      if (!schema->overload_name().empty()) name += "." + schema->overload_name();
    }
    ops.insert(name);
    for (const torch::jit::Block* sub : node->blocks()) collect_block(sub, ops);
  }
}

void collect_function(torch::jit::Function* fn, std::set<std::string>& ops) {
  if (auto* gf = dynamic_cast<torch::jit::GraphFunction*>(fn)) {
    collect_block(gf->graph()->block(), ops);
  } else {
    // Not a graph we can read: name it so the policy refuses it.
    ops.insert("<opaque function " + fn->qualname().qualifiedName() + ">");
  }
}

}  // namespace

// Loads `path` on the CPU (running the file's `__setstate__` methods: callers do this only in
// a sandboxed child process) and returns a newline-separated, sorted list of every operator
// in every function and method of its compilation unit and of every submodule. On failure
// returns the error text with *ok = 0. The caller frees the result with tessera_free.
extern "C" void* tessera_load_module(const char* path, int device_type, int index, char** err);

extern "C" char* tessera_torchscript_ops(const char* path, int* ok) {
  *ok = 0;
  try {
    // Read as the server will (records on several threads), onto the CPU.
    char* load_error = nullptr;
    std::unique_ptr<torch::jit::Module> owned(
        static_cast<torch::jit::Module*>(tessera_load_module(path, 0, 0, &load_error)));
    if (!owned) {
      // What the server would do: libtorch's own load (which also takes formats the parallel
      // reader's zip path does not).
      std::free(load_error);
      owned = std::make_unique<torch::jit::Module>(torch::jit::load(path, c10::Device(c10::DeviceType::CPU)));
    }
    torch::jit::Module& module = *owned;
    std::set<std::string> ops;
    auto cu = module._ivalue()->compilation_unit();
    for (torch::jit::Function* fn : cu->get_functions()) collect_function(fn, ops);
    for (const torch::jit::Module& m : module.modules()) {
      for (const torch::jit::Method& method : m.get_methods()) {
        collect_function(&method.function(), ops);
      }
    }
    std::string out;
    for (const auto& op : ops) {
      out += op;
      out += '\n';
    }
    *ok = 1;
    return dup(out);
  } catch (const std::exception& e) {
    return dup(e.what());
  } catch (...) {
    return dup("unknown C++ exception");
  }
}

extern "C" void tessera_free(char* p) { std::free(p); }

// Bytes of the distinct storages a module holds: parameters, buffers, tensor attributes of
// every submodule and tensor constants of its methods' graphs. Answers -1 on failure.
extern "C" int64_t tessera_module_tensor_bytes(void* module_ptr) {
  try {
    auto* module = static_cast<torch::jit::Module*>(module_ptr);
    std::unordered_set<const void*> seen;
    int64_t total = 0;
    auto add = [&](const at::Tensor& t) {
      if (!t.defined()) return;
      if (!t.has_storage()) {
        // Opaque tensors (oneDNN's, after optimize_for_inference) have no storage to share.
        if (seen.insert(t.unsafeGetTensorImpl()).second) {
          total += static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
        }
        return;
      }
      const auto& storage = t.storage();
      const void* key = storage.unsafeGetStorageImpl();
      if (seen.insert(key).second) total += static_cast<int64_t>(storage.nbytes());
    };
    std::function<void(const c10::IValue&)> visit = [&](const c10::IValue& v) {
      if (v.isTensor()) {
        add(v.toTensor());
      } else if (v.isTensorList()) {
        for (const at::Tensor& t : v.toTensorVector()) add(t);
      } else if (v.isList()) {
        for (const c10::IValue& item : v.toListRef()) visit(item);
      } else if (v.isTuple()) {
        for (const c10::IValue& item : v.toTupleRef().elements()) visit(item);
      } else if (v.isGenericDict()) {
        for (const auto& kv : v.toGenericDict()) visit(kv.value());
      }
    };
    for (const torch::jit::Module& m : module->modules()) {
      for (const auto& attr : m.named_attributes(/*recurse=*/false)) visit(attr.value);
      for (const torch::jit::Method& method : m.get_methods()) {
        auto* gf = dynamic_cast<torch::jit::GraphFunction*>(&method.function());
        if (gf == nullptr) continue;
        for (const torch::jit::Node* node : gf->graph()->nodes()) {
          if (node->kind() == c10::prim::Constant && node->output()->type()->kind() == c10::TypeKind::TensorType) {
            auto value = torch::jit::toIValue(node->output());
            if (value) visit(*value);
          }
        }
      }
    }
    return total;
  } catch (...) {
    return -1;
  }
}

// Rewrites a loaded module in place (it must be in eval mode): mode 1 freezes it
// (`torch.jit.freeze`: parameters and attributes become constants, then the frozen-graph passes
// fold what they can, e.g. batch norms into convolutions); mode 2 freezes it and runs
// `torch.jit.optimize_for_inference` (on the CPU: oneDNN layouts for convolutions and linear
// layers). Every method besides `forward` is kept. Returns null on success, else the error text
// (the module is then unchanged); the caller frees it with tessera_free.
extern "C" char* tessera_module_optimize(void* module_ptr, int mode) {
  try {
    auto* module = static_cast<torch::jit::Module*>(module_ptr);
    std::vector<std::string> others;
    for (const torch::jit::Method& method : module->get_methods()) {
      if (method.name() != "forward") others.push_back(method.name());
    }
    torch::jit::Module out = torch::jit::freeze(*module, others, /*optimize_numerics=*/true);
    if (mode == 2) out = torch::jit::optimize_for_inference(out, others);
    *module = out;
    return nullptr;
  } catch (const std::exception& e) {
    return dup(e.what());
  } catch (...) {
    return dup("unknown C++ exception");
  }
}

namespace {

// Wraps the CPU allocator and refuses allocations past a cap on the bytes live at once, with
// the out-of-memory error libtorch raises for any failed allocation. A forward that allocates
// without bound then fails on its own instead of taking the process down. Each block carries a
// small header (its size) in front of the data, so the data pointer is also the context and the
// allocator supports raw allocations (oneDNN's scratch memory uses them).
struct CappedCpuAllocator final : c10::Allocator {
  static constexpr size_t kHeader = 64;  // keeps c10's 64-byte alignment of the data
  c10::Allocator* base;
  c10::DeleterFnPtr base_free;
  std::atomic<int64_t> live{0};
  std::atomic<int64_t> cap;

  CappedCpuAllocator(c10::Allocator* b, int64_t c) : base(b), base_free(b->raw_deleter()), cap(c) {}

  static void release(void* data);

  c10::DataPtr allocate(size_t n) override {
    const int64_t bytes = static_cast<int64_t>(n);
    const int64_t now = live.fetch_add(bytes) + bytes;
    if (now > cap.load()) {
      live.fetch_sub(bytes);
      TORCH_CHECK_WITH(OutOfMemoryError, false,
                       "CPU tensor memory cap reached: can't allocate memory: you tried to allocate ", n,
                       " bytes with ", now - bytes, " of ", cap.load(), " bytes in use");
    }
    void* block = nullptr;
    try {
      c10::DataPtr inner = base->allocate(n + kHeader);
      block = inner.release_context();
    } catch (...) {
      live.fetch_sub(bytes);
      throw;
    }
    *static_cast<int64_t*>(block) = bytes;
    void* data = static_cast<char*>(block) + kHeader;
    return c10::DataPtr(data, data, &CappedCpuAllocator::release, c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CappedCpuAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CappedCpuAllocator* g_capped = nullptr;

void CappedCpuAllocator::release(void* data) {
  if (data == nullptr) return;
  void* block = static_cast<char*>(data) - kHeader;
  g_capped->live.fetch_sub(*static_cast<int64_t*>(block));
  g_capped->base_free(block);
}

}  // namespace

// Installs the cap (once per process; later calls change the cap). Returns 0 on success.
extern "C" int tessera_cap_cpu_memory(int64_t bytes) {
  try {
    if (g_capped == nullptr) {
      c10::Allocator* base = c10::GetCPUAllocator();
      // The wrapper frees blocks through the base's raw deleter; without one it cannot wrap.
      if (base->raw_deleter() == nullptr) return -1;
      g_capped = new CappedCpuAllocator(base, bytes);
      c10::SetCPUAllocator(g_capped, /*priority=*/100);
    } else {
      g_capped->cap = bytes;
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// Bytes of CPU tensor memory live through the capped allocator, or -1 without a cap.
extern "C" int64_t tessera_cpu_tensor_bytes() {
  return g_capped == nullptr ? -1 : g_capped->live.load();
}

// TorchScript executor settings. Whether the graph executor optimises at all (profiling, shape
// specialisation, fusion) is per thread in libtorch; the profiling executor and its number of
// profiled runs are process-wide.
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
extern "C" int tessera_jit_set_thread_optimize(int optimize) {
  try {
    torch::jit::setGraphExecutorOptimize(optimize != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}
extern "C" int tessera_jit_get_thread_optimize() {
  return torch::jit::getGraphExecutorOptimize() ? 1 : 0;
}

// Puts the calling thread in inference mode for the rest of its life: autograd's dispatch keys
// and version counters are skipped on every op (torch.inference_mode() in Python; a no-grad
// guard alone still pays them). The guard is leaked on purpose: forward threads run nothing else.
#include <c10/core/InferenceMode.h>
extern "C" int tessera_enter_inference_mode() {
  try {
    thread_local c10::InferenceMode* guard = new c10::InferenceMode(true);
    (void)guard;
    return c10::InferenceMode::is_enabled() ? 0 : -1;
  } catch (...) {
    return -1;
  }
}

// Intra-op threads (OpenMP) for the calling thread's own ops. libtorch reads the count per
// thread (the thread's OpenMP ICV, omp_get_max_threads), seeding it from a process-wide number
// the first time the thread asks; at::set_num_threads would also change that number and resize
// the process-wide pthreadpool other threads' XNNPACK ops use. So: seed this thread (the count
// query does), then set only this thread's OpenMP and MKL counts, through the runtime libtorch
// itself loaded (looked up by name: neither is a direct dependency of this binary; MKL's C
// entry point is the mixed-case one, its lower-case names take a pointer).
#include <ATen/Parallel.h>
#include <dlfcn.h>
extern "C" int tessera_set_thread_intra_op_threads(int threads) {
  try {
    if (threads < 1) return -1;
    at::get_num_threads();
    using SetCount = void (*)(int);
    static const auto omp_set = reinterpret_cast<SetCount>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
    static const auto mkl_set = reinterpret_cast<int (*)(int)>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    if (omp_set == nullptr) return -1;
    omp_set(threads);
    if (mkl_set != nullptr) mkl_set(threads);
    return at::get_num_threads() == threads ? 0 : -1;
  } catch (...) {
    return -1;
  }
}

// The calling thread's intra-op thread count.
extern "C" int tessera_get_thread_intra_op_threads() {
  try {
    return at::get_num_threads();
  } catch (...) {
    return -1;
  }
}

// The legacy graph executor (`executor: legacy`): libtorch picks a function's executor kind
// from a process-wide flag when the executor is created (at the function's first call), so a
// model that wants the legacy one has its executors created at load, under a lock, with the
// flag set for that moment and put back. Every method of every submodule and every function of
// the compilation unit gets its executor. Returns how many, or -1 with the error in *err.
#include <mutex>
namespace {
std::mutex g_executor_kind;

template <typename F>
void each_graph_function(torch::jit::Module& module, F&& f) {
  for (const torch::jit::Module& m : module.modules()) {
    for (const torch::jit::Method& method : m.get_methods()) {
      if (auto* gf = dynamic_cast<torch::jit::GraphFunction*>(&method.function())) f(*gf);
    }
  }
  for (torch::jit::Function* fn : module._ivalue()->compilation_unit()->get_functions()) {
    if (auto* gf = dynamic_cast<torch::jit::GraphFunction*>(fn)) f(*gf);
  }
}
}  // namespace

extern "C" int64_t tessera_module_use_legacy_executor(void* module_ptr, char** err) {
  *err = nullptr;
  auto* module = static_cast<torch::jit::Module*>(module_ptr);
  try {
    // The slow part first, outside the flip: each function's optimised graph (cached in the
    // function), so that the flag is flipped only while executor objects are constructed
    // (microseconds). Another thread creating an executor for the first time in that window
    // would get a legacy one too: libtorch has no other way to choose the kind.
    int64_t n = 0;
    each_graph_function(*module, [&](torch::jit::GraphFunction& gf) {
      gf.optimized_graph();
      ++n;
    });
    std::lock_guard<std::mutex> lock(g_executor_kind);
    struct Flip {
      std::atomic<bool>& profiling;
      bool before;
      explicit Flip(std::atomic<bool>& p) : profiling(p), before(p.load()) { profiling = false; }
      ~Flip() { profiling = before; }
    } flip(torch::jit::getExecutorMode());
    each_graph_function(*module, [&](torch::jit::GraphFunction& gf) { gf.get_executor(); });
    return n;
  } catch (const std::exception& e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return -1;
}

// libtorch's process-wide executor flag: 1 profiling (its default), 0 legacy (tests).
extern "C" int tessera_jit_executor_mode() { return torch::jit::getExecutorMode().load() ? 1 : 0; }

// How many of the module's functions have a legacy executor (tests): creating the executors
// of those without one (as the process's flag says), then asking each for its state, which only
// the legacy executor fills with its graph.
extern "C" int64_t tessera_module_legacy_executors(void* module_ptr) {
  auto* module = static_cast<torch::jit::Module*>(module_ptr);
  int64_t n = 0;
  try {
    each_graph_function(*module, [&](torch::jit::GraphFunction& gf) {
      try {
        if (gf.get_executor().getDebugState().graph != nullptr) ++n;
      } catch (...) {
        // The profiling executor has no state to give before it optimised.
      }
    });
  } catch (...) {
    return -1;
  }
  return n;
}
