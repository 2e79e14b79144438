// Moving a loaded TorchScript module's tensors between its device and one block of host
// memory, in place: every tensor the module holds (parameters, buffers, tensor attributes of
// every submodule, tensor constants of its methods' and functions' graphs) keeps its identity
// (`set_data` swaps what it points at), so the module object, its graph executors and what they
// optimised stay as they are. Tensors sharing a storage keep sharing one.
//
// The host block is one anonymous mapping, page-locked for the CUDA copies when asked
// (cudaHostRegister, in chunks on several threads, looked up by name: the CUDA runtime is
// libtorch's, not a dependency of this binary); when that fails the block stays pageable and
// the reason is reported. Every function catches C++ exceptions and reports failure; a move that
// fails leaves every tensor where it was.
#include <torch/script.h>
#include <torch/cuda.h>
#include <c10/core/InferenceMode.h>

#include <caffe2/serialize/read_adapter_interface.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/csrc/jit/serialization/storage_context.h>

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

char* dup_tier(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

std::atomic<int> g_fail_pinning{0};

using RegisterFn = int (*)(void*, size_t, unsigned int);
using UnregisterFn = int (*)(void*);
using ErrorStringFn = const char* (*)(int);

constexpr size_t kAlign = 4096;            // each storage starts on its own page
constexpr size_t kChunk = size_t(256) << 20;  // registered per thread at a time (at least)

// One mapping of host memory, page-locked or not.
struct Block {
  char* base = nullptr;
  size_t size = 0;
  std::vector<char*> registered;  // chunk starts

  ~Block() {
    if (!registered.empty()) {
      static const auto unregister = reinterpret_cast<UnregisterFn>(dlsym(RTLD_DEFAULT, "cudaHostUnregister"));
      if (unregister != nullptr) {
        for (char* p : registered) unregister(p);
      }
    }
    if (base != nullptr) munmap(base, size);
  }

  // Page-locks the whole block, in chunks that begin at `starts` (ascending, the first 0: a
  // copy must not span two registrations, so chunks end on storage boundaries); "" on success,
  // else why not (nothing stays locked).
  std::string pin(const std::vector<size_t>& starts, unsigned int flags = /*cudaHostRegisterPortable=*/1) {
    if (g_fail_pinning.load() != 0) return "page-locked allocation failed (injected for a test)";
    static const auto reg = reinterpret_cast<RegisterFn>(dlsym(RTLD_DEFAULT, "cudaHostRegister"));
    static const auto unregister = reinterpret_cast<UnregisterFn>(dlsym(RTLD_DEFAULT, "cudaHostUnregister"));
    static const auto text = reinterpret_cast<ErrorStringFn>(dlsym(RTLD_DEFAULT, "cudaGetErrorString"));
    if (reg == nullptr || unregister == nullptr) return "the CUDA runtime is not loaded in this process";
    std::vector<char*> chunks;
    std::vector<size_t> lengths;
    for (size_t i = 0; i < starts.size(); ++i) {
      const size_t end = i + 1 < starts.size() ? starts[i + 1] : size;
      if (end > starts[i]) {
        chunks.push_back(base + starts[i]);
        lengths.push_back(end - starts[i]);
      }
    }
    std::vector<int> codes(chunks.size(), 0);
    const size_t threads = std::min<size_t>(8, chunks.size());
    std::atomic<size_t> next{0};
    auto work = [&] {
      for (size_t i = next.fetch_add(1); i < chunks.size(); i = next.fetch_add(1)) {
        // Portable (the default): page-locked for every device, not only the current one.
        codes[i] = reg(chunks[i], lengths[i], flags);
      }
    };
    std::vector<std::thread> pool;
    try {
      for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
    } catch (...) {
      // No more threads (a pids limit, say): the ones started and this one do the rest.
    }
    work();
    for (auto& t : pool) t.join();
    int failed = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (codes[i] == 0) {
        registered.push_back(chunks[i]);
      } else if (failed == 0) {
        failed = codes[i];
      }
    }
    if (failed == 0) return "";
    for (char* p : registered) unregister(p);
    registered.clear();
    std::string why = "cudaHostRegister failed: error " + std::to_string(failed);
    if (text != nullptr) why += std::string(" (") + text(failed) + ")";
    return why;
  }
};

// Byte-identical storages of models (parameters only), held once on a device: a class of equal
// contents, found by a fingerprint and confirmed byte by byte, and the device storage its members
// use now (weak: the models' tensors own it, so it is freed when no model on the device uses it).
struct ContentClass {
  std::mutex mu;
  c10::weak_intrusive_ptr<c10::StorageImpl> live{c10::intrusive_ptr<c10::StorageImpl>()};
};

// The tensors of one storage, and where that storage goes in the host block.
struct Group {
  std::vector<at::Tensor> tensors;
  size_t nbytes = 0;
  size_t offset = 0;
  // The tensors' version counters when the host block last matched them (-1: unknown).
  std::vector<int64_t> versions;
  // Every tensor of the storage is a module parameter (the only storages shared).
  bool param = false;
  // Its content class, once shared (see tessera_tier_share).
  std::shared_ptr<ContentClass> cls;
};

int64_t version_of(const at::Tensor& t) {
  try {
    return static_cast<int64_t>(t._version());
  } catch (...) {
    return -1;  // inference tensors have none
  }
}

// Remembers the tensors' versions: the host block matches them now.
void mark_clean(Group& g) {
  g.versions.clear();
  for (const at::Tensor& t : g.tensors) g.versions.push_back(version_of(t));
}

// Whether no tensor of `g` was written since mark_clean (an in-place op bumps its version).
bool clean(const Group& g) {
  if (g.versions.size() != g.tensors.size()) return false;
  for (size_t i = 0; i < g.tensors.size(); ++i) {
    const int64_t v = version_of(g.tensors[i]);
    if (v < 0 || v != g.versions[i]) return false;
  }
  return true;
}

struct Moved {
  c10::Device device{c10::DeviceType::CPU};
  std::vector<Group> groups;
  size_t total = 0;  // bytes of the block (page-aligned storages)
  std::shared_ptr<Block> block;
  bool pinned = false;
  bool on_host = false;
  // Bytes copied at the latest move: to the host, those not kept exact from an earlier move; to
  // the device, those not found there already (shared with another model).
  size_t copied = 0;
};

void collect_tensor(const at::Tensor& t, const c10::Device& device,
                    std::unordered_map<const void*, size_t>& by_storage,
                    std::unordered_map<const void*, bool>& seen, Moved& out) {
  if (!t.defined() || !t.has_storage() || t.device() != device || t.storage().nbytes() == 0) return;
  if (!seen.emplace(t.unsafeGetTensorImpl(), true).second) return;
  const void* key = t.storage().unsafeGetStorageImpl();
  auto it = by_storage.find(key);
  if (it == by_storage.end()) {
    Group g;
    g.nbytes = t.storage().nbytes();
    it = by_storage.emplace(key, out.groups.size()).first;
    out.groups.push_back(std::move(g));
  }
  out.groups[it->second].tensors.push_back(t);
}

void collect_graph(const std::shared_ptr<torch::jit::Graph>& graph,
                   const std::function<void(const c10::IValue&)>& visit) {
  std::function<void(const torch::jit::Block*)> walk = [&](const torch::jit::Block* b) {
    for (const torch::jit::Node* node : b->nodes()) {
      if (node->kind() == c10::prim::Constant && node->output()->type()->kind() == c10::TypeKind::TensorType) {
        auto value = torch::jit::toIValue(node->output());
        if (value) visit(*value);
      }
      for (const torch::jit::Block* sub : node->blocks()) walk(sub);
    }
  };
  walk(graph->block());
}

// A byte view of a whole storage.
at::Tensor storage_bytes(const at::Tensor& any) {
  at::Tensor t = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(any.device()));
  t.set_(any.storage(), 0, {static_cast<int64_t>(any.storage().nbytes())}, {1});
  return t;
}

// Points every tensor of every group at its new bytes (`bytes[i]`: a byte tensor as long as
// group i's storage). The views are all built first, so that an error (an allocation) leaves
// every tensor where it was.
void repoint(std::vector<Group>& groups, const std::vector<at::Tensor>& bytes) {
  std::vector<std::vector<at::Tensor>> views(groups.size());
  for (size_t i = 0; i < groups.size(); ++i) {
    for (const at::Tensor& t : groups[i].tensors) {
      at::Tensor view = at::empty({0}, at::TensorOptions().dtype(t.dtype()).device(bytes[i].device()));
      view.set_(bytes[i].storage(), t.storage_offset(), t.sizes(), t.strides());
      views[i].push_back(view);
    }
  }
  for (size_t i = 0; i < groups.size(); ++i) {
    for (size_t k = 0; k < groups[i].tensors.size(); ++k) groups[i].tensors[k].set_data(views[i][k]);
    mark_clean(groups[i]);
  }
}

// Points the tensors of one group at `bytes` (a byte tensor as long as its storage), keeping each
// tensor's offset, sizes and strides. The views are built first: an error changes nothing.
void repoint_group(Group& g, const at::Tensor& bytes) {
  std::vector<at::Tensor> views;
  for (const at::Tensor& t : g.tensors) {
    at::Tensor view = at::empty({0}, at::TensorOptions().dtype(t.dtype()).device(bytes.device()));
    view.set_(bytes.storage(), t.storage_offset(), t.sizes(), t.strides());
    views.push_back(view);
  }
  for (size_t k = 0; k < g.tensors.size(); ++k) g.tensors[k].set_data(views[k]);
}

// Content classes by "scope|device|bytes|fingerprint"; dead classes are pruned as buckets are
// visited, and all of them every kSweepEvery new classes.
std::mutex g_shared_mu;
std::unordered_map<std::string, std::vector<std::weak_ptr<ContentClass>>> g_shared;
// Which class a live storage is the storage of: a handle collected after the model was shared
// (the host tier's, see collect_modules) finds its groups' classes here. An entry counts only
// while its class's live storage is that very storage (an address reused after a free does not).
std::unordered_map<const void*, std::weak_ptr<ContentClass>> g_member;
size_t g_shared_added = 0;
constexpr size_t kSweepEvery = 4096;
// Live classes compared byte by byte at most per storage (a fingerprint chosen to collide costs
// a tenant at most this many comparisons of its own bytes).
constexpr size_t kMaxCandidates = 4;
constexpr int64_t kSamples = 4096;
// Storages smaller than this are not shared: little memory, and a model of a million tiny
// parameters would otherwise pay a fingerprint (a gather and a copy) for each.
constexpr size_t kMinShared = size_t(64) << 10;

// A fingerprint of a storage's bytes: FNV-1a over up to kSamples bytes at evenly spaced offsets
// (all of them when fewer), gathered on the storage's device. Equal contents give equal
// fingerprints; unequal ones are told apart by the byte comparison that follows.
uint64_t fingerprint(const at::Tensor& bytes) {
  const int64_t n = bytes.numel();
  at::Tensor sample;
  if (n <= kSamples) {
    sample = bytes.to(at::kCPU).contiguous();
  } else {
    std::vector<int64_t> offsets(kSamples);
    for (int64_t i = 0; i < kSamples; ++i) offsets[i] = i * (n - 1) / (kSamples - 1);
    at::Tensor index = at::tensor(offsets, at::TensorOptions().dtype(at::kLong)).to(bytes.device());
    sample = bytes.index_select(0, index).to(at::kCPU).contiguous();
  }
  uint64_t h = 1469598103934665603ull;
  const auto* p = sample.data_ptr<uint8_t>();
  for (int64_t i = 0; i < sample.numel(); ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

// Drops dead classes and stale memberships; under g_shared_mu.
void sweep_shared() {
  for (auto it = g_member.begin(); it != g_member.end();) {
    bool stale = true;
    if (auto cls = it->second.lock()) {
      std::lock_guard<std::mutex> lock(cls->mu);
      stale = cls->live.lock().get() != it->first;
    }
    it = stale ? g_member.erase(it) : std::next(it);
  }
  for (auto it = g_shared.begin(); it != g_shared.end();) {
    auto& bucket = it->second;
    bucket.erase(std::remove_if(bucket.begin(), bucket.end(), [](const std::weak_ptr<ContentClass>& w) { return w.expired(); }),
                 bucket.end());
    it = bucket.empty() ? g_shared.erase(it) : std::next(it);
  }
}

// The live device storage of `cls` as a byte tensor, if it has one of `nbytes` on `device`.
at::Tensor live_bytes(ContentClass& cls, size_t nbytes, const c10::Device& device) {
  std::lock_guard<std::mutex> lock(cls.mu);
  auto impl = cls.live.lock();
  if (!impl || impl->nbytes() != nbytes || impl->device() != device) return at::Tensor();
  at::Tensor t = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(device));
  t.set_(c10::Storage(std::move(impl)), 0, {static_cast<int64_t>(nbytes)}, {1});
  return t;
}

void set_live(const std::shared_ptr<ContentClass>& cls, const at::Tensor& bytes) {
  {
    std::lock_guard<std::mutex> lock(cls->mu);
    cls->live = bytes.storage().getWeakStorageImpl();
  }
  std::lock_guard<std::mutex> lock(g_shared_mu);
  g_member[bytes.storage().unsafeGetStorageImpl()] = cls;
  if (++g_shared_added % kSweepEvery == 0) sweep_shared();
}

// The class whose live storage `impl` is, if any.
std::shared_ptr<ContentClass> member_class(const c10::StorageImpl* impl) {
  std::shared_ptr<ContentClass> cls;
  {
    std::lock_guard<std::mutex> lock(g_shared_mu);
    auto it = g_member.find(impl);
    if (it == g_member.end()) return nullptr;
    cls = it->second.lock();
  }
  if (!cls) return nullptr;
  std::lock_guard<std::mutex> lock(cls->mu);
  auto live = cls->live.lock();
  return live.get() == impl ? cls : nullptr;
}

// Whether two byte tensors of one length on one device are equal, compared 32 MiB at a time (a
// whole-storage comparison would allocate a result as large as the storage).
bool equal_bytes(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kStep = int64_t(32) << 20;
  const int64_t n = a.numel();
  for (int64_t off = 0; off < n; off += kStep) {
    const int64_t len = std::min(kStep, n - off);
    if (!at::equal(a.narrow(0, off, len), b.narrow(0, off, len))) return false;
  }
  return true;
}

// Waits for the copies queued so far, ignoring errors (on an error path, before the host
// block may be freed).
void settle(const c10::Device& d) {
  try {
    if (d.is_cuda()) torch::cuda::synchronize(d.index());
  } catch (...) {
  }
}

void sync_if_cuda(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}


// Allocates the handle's host block if it has none (page-locked if `pin`; when that fails it
// stays pageable and *pin_error says why). Returns null or the error.
char* allocate(Moved* m, int pin, char** pin_error) {
  if (!m->block && m->total > 0) {
    auto block = std::make_shared<Block>();
    void* p = mmap(nullptr, m->total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return dup_tier("out of memory: could not map " + std::to_string(m->total) + " bytes of host memory");
    block->base = static_cast<char*>(p);
    block->size = m->total;
    if (pin != 0) {
      std::vector<size_t> starts;
      size_t chunk_start = 0;
      for (const Group& g : m->groups) {
        if (starts.empty() || g.offset - chunk_start >= kChunk) {
          starts.push_back(g.offset);
          chunk_start = g.offset;
        }
      }
      std::string why = block->pin(starts);
      m->pinned = why.empty();
      if (!why.empty()) *pin_error = dup_tier(why);
    }
    m->block = block;
  }
  return nullptr;
}

// Collects the tensors of `modules` that live on `device`, grouped by storage: parameters,
// buffers and tensor attributes of every submodule (inside lists, tuples, dicts and non-module
// objects too) and tensor constants of every method's and compilation-unit function's graph.
std::unique_ptr<Moved> collect_modules(const std::vector<torch::jit::Module*>& modules, const c10::Device& device) {
  c10::InferenceMode off(false);
  auto out = std::make_unique<Moved>();
  out->device = device;
  std::unordered_map<const void*, size_t> by_storage;
  std::unordered_map<const void*, bool> seen;
  std::unordered_map<const void*, bool> objects;
  std::function<void(const c10::IValue&)> visit = [&](const c10::IValue& v) {
    if (v.isTensor()) {
      collect_tensor(v.toTensor(), out->device, by_storage, seen, *out);
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorVector()) collect_tensor(t, out->device, by_storage, seen, *out);
    } else if (v.isList()) {
      for (const c10::IValue& item : v.toListRef()) visit(item);
    } else if (v.isTuple()) {
      for (const c10::IValue& item : v.toTupleRef().elements()) visit(item);
    } else if (v.isGenericDict()) {
      for (const auto& kv : v.toGenericDict()) visit(kv.value());
    } else if (v.isObject()) {
      // Submodules are walked below; other objects (a scripted class instance) here, once.
      const auto& obj = v.toObjectRef();
      if (!obj.type()->is_module() && objects.emplace(&obj, true).second) {
        for (const c10::IValue& slot : obj.slots()) visit(slot);
      }
    }
  };
  for (torch::jit::Module* module : modules) {
    for (const torch::jit::Module& m : module->modules()) {
      for (const auto& attr : m.named_attributes(/*recurse=*/false)) visit(attr.value);
      for (const torch::jit::Method& method : m.get_methods()) {
        if (auto* gf = dynamic_cast<torch::jit::GraphFunction*>(&method.function())) {
          collect_graph(gf->graph(), visit);
        }
      }
    }
    auto cu = module->_ivalue()->compilation_unit();
    for (torch::jit::Function* fn : cu->get_functions()) {
      if (auto* gf = dynamic_cast<torch::jit::GraphFunction*>(fn)) collect_graph(gf->graph(), visit);
    }
  }
  std::unordered_set<const void*> params;
  for (torch::jit::Module* module : modules) {
    for (const auto& p : module->named_parameters(/*recurse=*/true)) params.insert(p.value.unsafeGetTensorImpl());
  }
  for (Group& g : out->groups) {
    g.param = std::all_of(g.tensors.begin(), g.tensors.end(),
                          [&](const at::Tensor& t) { return params.count(t.unsafeGetTensorImpl()) > 0; });
    // Shared when the model was (tessera_tier_share on an earlier handle): the same class.
    if (g.param) g.cls = member_class(g.tensors.front().storage().unsafeGetStorageImpl());
  }
  size_t offset = 0;
  for (Group& g : out->groups) {
    g.offset = offset;
    offset += (g.nbytes + kAlign - 1) / kAlign * kAlign;
  }
  out->total = offset;
  return out;
}

// The device the shims' (type, index) pairs name: type 1 CUDA (`index` its ordinal), else CPU.
c10::Device device_of(int device_type, int index) {
  return device_type == 1 ? c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index))
                          : c10::Device(c10::DeviceType::CPU);
}

// Runs work(i) for i in [0, n) on up to `threads` threads (this one included; fewer if no more
// threads can be started).
void parallel(size_t n, size_t threads, const std::function<void(size_t)>& work) {
  std::atomic<size_t> next{0};
  auto run = [&] {
    for (size_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) work(i);
  };
  std::vector<std::thread> pool;
  try {
    for (size_t t = 1; t < std::min(threads, n); ++t) pool.emplace_back(run);
  } catch (...) {
  }
  run();
  for (auto& t : pool) t.join();
}

constexpr size_t kPiece = size_t(8) << 20;  // one thread's share of a large read
constexpr size_t kCopyThreads = 8;

// A TorchScript file read with pread, large records in pieces on several threads (a record
// of a model's weights is one read of up to gigabytes: libtorch's own file reader makes it on
// one thread).
struct ParallelFile final : caffe2::serialize::ReadAdapterInterface {
  int fd = -1;
  size_t len = 0;
  ~ParallelFile() override {
    if (fd >= 0) close(fd);
  }
  size_t size() const override { return len; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= len) return 0;
    n = std::min<size_t>(n, len - pos);
    std::atomic<bool> failed{false};
    auto read_at = [&](size_t at, size_t count) {
      char* dst = static_cast<char*>(buf) + at;
      while (count > 0) {
        const ssize_t got = pread(fd, dst, count, static_cast<off_t>(pos + at));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
          failed = true;
          return;
        }
        dst += got;
        at += static_cast<size_t>(got);
        count -= static_cast<size_t>(got);
      }
    };
    if (n < 2 * kPiece) {
      read_at(0, n);
    } else {
      const size_t pieces = (n + kPiece - 1) / kPiece;
      parallel(pieces, kCopyThreads, [&](size_t i) { read_at(i * kPiece, std::min(kPiece, n - i * kPiece)); });
    }
    // A short read makes libtorch report the record as corrupt.
    return failed ? 0 : n;
  }
};

std::shared_ptr<ParallelFile> open_parallel(const char* path) {
  auto file = std::make_shared<ParallelFile>();
  file->fd = open(path, O_RDONLY | O_CLOEXEC);
  if (file->fd < 0) throw std::runtime_error(std::string("cannot open ") + path + ": " + std::strerror(errno));
  struct stat st {};
  if (fstat(file->fd, &st) != 0) throw std::runtime_error(std::string("cannot stat ") + path + ": " + std::strerror(errno));
  file->len = static_cast<size_t>(st.st_size);
  return file;
}

}  // namespace

// Loads the TorchScript file at `path` onto device (type 0 CPU, 1 CUDA; `index` its ordinal),
// its records read on several threads (libtorch's own file reader reads each on one thread).
// Returns a new `torch::jit::Module*` (a tch CModule's pointer), or null with the error in *err.
extern "C" void* tessera_load_module(const char* path, int device_type, int index, char** err) {
  *err = nullptr;
  try {
    const c10::Device device = device_of(device_type, index);
    return new torch::jit::Module(torch::jit::load(open_parallel(path), device));
  } catch (const std::exception& e) {
    *err = dup_tier(e.what());
  } catch (...) {
    *err = dup_tier("unknown C++ exception");
  }
  return nullptr;
}

// Collects the tensors of `n` modules that live on the modules' device (type 0 CPU, 1 CUDA;
// `index` its ordinal), grouped by storage. Returns a handle (free with tessera_tier_free), or
// null with the error in *err.
extern "C" void* tessera_tier_collect(void** modules, int n, int device_type, int index, char** err) {
  *err = nullptr;
  try {
    const c10::Device device = device_of(device_type, index);
    std::vector<torch::jit::Module*> list;
    for (int k = 0; k < n; ++k) list.push_back(static_cast<torch::jit::Module*>(modules[k]));
    return collect_modules(list, device).release();
  } catch (const std::exception& e) {
    *err = dup_tier(e.what());
  } catch (...) {
    *err = dup_tier("unknown C++ exception");
  }
  return nullptr;
}

// Bytes the handle's host block takes (allocated or to be).
extern "C" int64_t tessera_tier_bytes(void* handle) {
  return static_cast<int64_t>(static_cast<Moved*>(handle)->total);
}

// Whether the host block is page-locked (1), pageable (0), or not allocated (-1).
extern "C" int tessera_tier_pinned(void* handle) {
  auto* m = static_cast<Moved*>(handle);
  if (!m->block) return -1;
  return m->pinned ? 1 : 0;
}

// Makes the next page-locking fail (1) or not (0): the fallback's test.
extern "C" void tessera_tier_fail_pinning(int fail) { g_fail_pinning.store(fail); }

// Copies the tensors into the host block (allocated on the first move, page-locked if `pin`;
// kept for later moves) and points them there, freeing their device memory. A storage whose
// tensors were not written since the block last matched them (their version counters, which
// every in-place op bumps, are unchanged) is not copied again. Returns null on
// success, else the error (tensors unchanged). `*pin_error` gets why page-locking failed, if it
// did (the block is then pageable and the move goes on).
extern "C" char* tessera_tier_to_host(void* handle, int pin, int force, char** pin_error) {
  *pin_error = nullptr;
  auto* m = static_cast<Moved*>(handle);
  try {
    if (m->on_host) return nullptr;
    if (force != 0) {
      for (Group& g : m->groups) g.versions.clear();
    }
    c10::InferenceMode off(false);
    if (char* err = allocate(m, pin, pin_error)) return err;
    std::vector<at::Tensor> hosts;
    hosts.reserve(m->groups.size());
    std::shared_ptr<Block> block = m->block;
    m->copied = 0;
    for (Group& g : m->groups) {
      at::Tensor host = at::from_blob(
          block->base + g.offset, {static_cast<int64_t>(g.nbytes)}, {1},
          [block](void*) {}, at::TensorOptions().dtype(at::kByte));
      // A copy kept from an earlier move is still exact unless a tensor was written since.
      if (!clean(g)) {
        host.copy_(storage_bytes(g.tensors.front()), /*non_blocking=*/m->pinned);
        m->copied += g.nbytes;
      }
      hosts.push_back(host);
    }
    sync_if_cuda(m->device);
    repoint(m->groups, hosts);
    m->on_host = true;
    return nullptr;
  } catch (const std::exception& e) {
    settle(m->device);
    return dup_tier(e.what());
  } catch (...) {
    settle(m->device);
    return dup_tier("unknown C++ exception");
  }
}

// Fills the host block (allocated and page-locked as for a move) with the tensors' current
// bytes while they stay on their device and in use: a later move to the host then copies only
// what was written since. Versions are taken before the copy, so a write during it leaves the
// storage marked as changed. Returns null on success, else the error.
extern "C" char* tessera_tier_stage(void* handle, int pin, int force, char** pin_error) {
  *pin_error = nullptr;
  auto* m = static_cast<Moved*>(handle);
  try {
    if (m->on_host) return nullptr;
    if (force != 0) {
      for (Group& g : m->groups) g.versions.clear();
    }
    c10::InferenceMode off(false);
    if (char* err = allocate(m, pin, pin_error)) return err;
    std::shared_ptr<Block> block = m->block;
    for (Group& g : m->groups) {
      if (clean(g)) continue;
      mark_clean(g);
      at::Tensor host = at::from_blob(
          block->base + g.offset, {static_cast<int64_t>(g.nbytes)}, {1},
          [block](void*) {}, at::TensorOptions().dtype(at::kByte));
      host.copy_(storage_bytes(g.tensors.front()), /*non_blocking=*/m->pinned);
    }
    sync_if_cuda(m->device);
    return nullptr;
  } catch (const std::exception& e) {
    settle(m->device);
    for (Group& g : m->groups) g.versions.clear();
    return dup_tier(e.what());
  } catch (...) {
    settle(m->device);
    for (Group& g : m->groups) g.versions.clear();
    return dup_tier("unknown C++ exception");
  }
}

// Copies the tensors back to their device (fresh allocations) and points them there. Returns
// null on success, else the error (an allocation that failed frees the others: the tensors
// stay on the host). The host block is kept for the next move to the host.
extern "C" char* tessera_tier_to_device(void* handle) {
  auto* m = static_cast<Moved*>(handle);
  try {
    if (!m->on_host) return nullptr;
    c10::InferenceMode off(false);
    std::vector<at::Tensor> fresh;
    std::vector<bool> copy;
    fresh.reserve(m->groups.size());
    // A shared storage already on the device (another model's, or an earlier group's of this
    // move) is used as it is; the others are allocated and copied.
    std::unordered_map<const ContentClass*, size_t> here;
    m->copied = 0;
    for (Group& g : m->groups) {
      at::Tensor bytes;
      if (g.cls) {
        auto it = here.find(g.cls.get());
        if (it != here.end()) {
          bytes = fresh[it->second];
        } else {
          bytes = live_bytes(*g.cls, g.nbytes, m->device);
          here.emplace(g.cls.get(), fresh.size());
        }
      }
      copy.push_back(!bytes.defined());
      if (!bytes.defined()) {
        m->copied += g.nbytes;
        bytes = at::empty({static_cast<int64_t>(g.nbytes)}, at::TensorOptions().dtype(at::kByte).device(m->device));
      }
      fresh.push_back(bytes);
    }
    for (size_t i = 0; i < m->groups.size(); ++i) {
      if (copy[i]) fresh[i].copy_(storage_bytes(m->groups[i].tensors.front()), /*non_blocking=*/m->pinned);
    }
    sync_if_cuda(m->device);
    repoint(m->groups, fresh);
    m->on_host = false;
    // Copied and in place: other models coming back may use these now.
    for (size_t i = 0; i < m->groups.size(); ++i) {
      if (copy[i] && m->groups[i].cls) set_live(m->groups[i].cls, fresh[i]);
    }
    return nullptr;
  } catch (const std::exception& e) {
    settle(m->device);
    return dup_tier(e.what());
  } catch (...) {
    settle(m->device);
    return dup_tier("unknown C++ exception");
  }
}

// Shares the handle's parameter storages (of at least kMinShared bytes) with byte-identical ones
// of other models under the same `scope` (a tenant) on its device: a storage whose fingerprint
// matches a live one's, and whose bytes are then found equal, is dropped and its tensors view
// the other one (each keeps its own offset, sizes, strides and dtype); the others become the
// first of their class. Storages of one model that are equal are shared too. Only while the
// weights are on the device. Returns null on success (*joined: bytes now shared rather than
// held, *classes: storages that took part), else the error (storages handled before it stay
// shared: each group is switched whole).
extern "C" char* tessera_tier_share(void* handle, const char* scope, int64_t* joined, int64_t* classes) {
  auto* m = static_cast<Moved*>(handle);
  *joined = 0;
  *classes = 0;
  try {
    if (m->on_host) return dup_tier("the weights are in host memory");
    c10::InferenceMode off(false);
    for (Group& g : m->groups) {
      if (!g.param || g.cls || g.nbytes < kMinShared) continue;
      const at::Tensor mine = storage_bytes(g.tensors.front());
      const std::string key = std::string(scope) + "|" + m->device.str() + "|" + std::to_string(g.nbytes) + "|" +
                              std::to_string(fingerprint(mine));
      // Up to kMaxCandidates classes whose storage is live on this device (classes whose
      // members are all in host memory are passed over).
      std::vector<std::pair<std::shared_ptr<ContentClass>, at::Tensor>> candidates;
      {
        std::lock_guard<std::mutex> lock(g_shared_mu);
        auto it = g_shared.find(key);
        if (it != g_shared.end()) {
          auto& bucket = it->second;
          bucket.erase(std::remove_if(bucket.begin(), bucket.end(),
                                      [](const std::weak_ptr<ContentClass>& w) { return w.expired(); }),
                       bucket.end());
          for (const auto& w : bucket) {
            if (candidates.size() == kMaxCandidates) break;
            auto c = w.lock();
            if (!c) continue;
            at::Tensor theirs = live_bytes(*c, g.nbytes, m->device);
            if (theirs.defined()) candidates.emplace_back(std::move(c), std::move(theirs));
          }
        }
      }
      for (const auto& [c, theirs] : candidates) {
        if (theirs.storage().unsafeGetStorageImpl() == mine.storage().unsafeGetStorageImpl() ||
            equal_bytes(theirs, mine)) {
          repoint_group(g, theirs);
          g.cls = c;
          *joined += static_cast<int64_t>(g.nbytes);
          break;
        }
      }
      if (!g.cls) {
        auto c = std::make_shared<ContentClass>();
        set_live(c, mine);
        g.cls = c;
        std::lock_guard<std::mutex> lock(g_shared_mu);
        g_shared[key].push_back(c);
      }
      *classes += 1;
    }
    sync_if_cuda(m->device);
    return nullptr;
  } catch (const std::exception& e) {
    settle(m->device);
    return dup_tier(e.what());
  } catch (...) {
    settle(m->device);
    return dup_tier("unknown C++ exception");
  }
}

// The distinct shared storages the handle's tensors use on the device (none while on the host):
// up to `cap` identities (StorageImpl addresses) and sizes; returns how many there are.
extern "C" int64_t tessera_tier_shared(void* handle, int64_t* ids, int64_t* sizes, int64_t cap) {
  auto* m = static_cast<Moved*>(handle);
  if (m->on_host) return 0;
  std::unordered_set<const void*> seen;
  int64_t n = 0;
  for (const Group& g : m->groups) {
    if (!g.cls || g.tensors.empty()) continue;
    const void* id = g.tensors.front().storage().unsafeGetStorageImpl();
    if (!seen.insert(id).second) continue;
    if (n < cap) {
      ids[n] = static_cast<int64_t>(reinterpret_cast<intptr_t>(id));
      sizes[n] = static_cast<int64_t>(g.tensors.front().storage().nbytes());
    }
    ++n;
  }
  return n;
}

// Frees the host block (only while the tensors are on their device); whether it was freed.
extern "C" int tessera_tier_release_block(void* handle) {
  auto* m = static_cast<Moved*>(handle);
  if (m->on_host) return 0;
  m->block.reset();
  m->pinned = false;
  for (Group& g : m->groups) g.versions.clear();
  return 1;
}

// Lets go of the handle's tensors but the shared ones (parameters), keeping their content
// classes alive (the model holds them while it lives: a class outlives its device storage while
// members wait in host memory) and their version counters readable.
extern "C" void tessera_tier_keep_classes_only(void* handle) {
  auto* m = static_cast<Moved*>(handle);
  m->groups.erase(std::remove_if(m->groups.begin(), m->groups.end(), [](const Group& g) { return !g.cls; }),
                  m->groups.end());
  m->total = 0;
  m->block.reset();
}

// Bytes the latest move copied (see Moved::copied).
extern "C" int64_t tessera_tier_copied(void* handle) {
  return static_cast<int64_t>(static_cast<Moved*>(handle)->copied);
}

// The sum of the tensors' version counters (-1 if one has none): it changes when any of them is
// written in place through the dispatcher.
extern "C" int64_t tessera_tier_version_sum(void* handle) {
  int64_t sum = 0;
  for (const Group& g : static_cast<Moved*>(handle)->groups) {
    for (const at::Tensor& t : g.tensors) {
      const int64_t v = version_of(t);
      if (v < 0) return -1;
      sum += v;
    }
  }
  return sum;
}

// Storages (groups) the handle moves.
extern "C" int64_t tessera_tier_storages(void* handle) {
  return static_cast<int64_t>(static_cast<Moved*>(handle)->groups.size());
}

// Frees the handle (the tensors stay wherever they are, and keep the host block alive while
// they point into it).
extern "C" void tessera_tier_free(void* handle) { delete static_cast<Moved*>(handle); }

// ---- Unified copies: a TorchScript file in the layout torch.package uses ----
//
// libtorch's own load reads every weight record through its zip reader (a CRC-32 per record on
// one thread, a fresh allocation, a copy) and then copies each storage to the device from
// pageable memory: ~2 GB/s for SD2's 2.6 GB on an H100 host. In the unified layout every storage
// is a record `.data/<key>.storage` named by one key shared by the data and constants pickles, so
// a loader may hand libtorch the storages it read itself (a DeserializationStorageContext) and
// libtorch reads only the pickles and the code. The copy is the server's own output from a
// checked file (written once, atomically, by the caller); `source` tags what it was made from.

namespace {

constexpr const char* kUnifiedTag = "tessera_source";
constexpr const char* kUnifiedPickle = ".data/ts_code/0/data.pkl";

}  // namespace

// Writes `module` to `path` in the unified layout, with `source` as its tag record. Returns
// null on success, else the error (the caller removes what was written).
extern "C" char* tessera_save_unified(void* module_ptr, const char* path, const char* source) {
  std::unique_ptr<caffe2::serialize::PyTorchStreamWriter> writer;
  std::string error;
  try {
    auto* module = static_cast<torch::jit::Module*>(module_ptr);
    writer = std::make_unique<caffe2::serialize::PyTorchStreamWriter>(std::string(path));
    // The current format version (the writer's default is the oldest it can produce): libtorch
    // reads a file's version as the version of its code and applies the operator upgraders of
    // older versions to it (integer `/` made floor division, `full` made float, `gelu`'s
    // `approximate` refused), so a copy left at the default would not compute what it copies.
    writer->setMinVersion(caffe2::serialize::kProducedFileFormatVersion);
    torch::jit::ScriptModuleSerializer serializer(*writer);
    serializer.serialize_unified_format(*module, 0);
    serializer.writeFiles(".data/ts_code/code/");
    writer->writeRecord(kUnifiedTag, source, std::strlen(source));
    writer->writeEndOfFile();
    return nullptr;
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "unknown C++ exception";
  }
  // A writer that failed (a full disk, say) throws again from the end-of-file its destructor
  // writes, and a destructor's throw ends the process: finish it here, where that is caught.
  if (writer && !writer->finalized()) {
    try {
      writer->writeEndOfFile();
    } catch (...) {
    }
  }
  return dup_tier(error);
}

// Loads a unified copy onto the device (type 0 CPU, 1 CUDA; `index` its ordinal). Its storages
// are read by the server: onto the CPU, each into its own allocation with reads on several
// threads; for CUDA, the file is mapped and page-locked read-only (one cudaHostRegister of the
// page cache, no copy) and libtorch's unpickler copies each storage to the device from there.
// Returns a new `torch::jit::Module*`, or null with *stale = 1 when the copy's tag is not
// `source`, or with the error in *err. `*note` gets why the mapping could not be page-locked,
// if it could not (the copies then run from pageable memory).
extern "C" void* tessera_load_unified(const char* path, int device_type, int index, const char* source,
                                      int* stale, char** note, char** err) {
  *stale = 0;
  *note = nullptr;
  *err = nullptr;
  try {
    const c10::Device device = device_of(device_type, index);
    const bool cuda = device.is_cuda();
    std::shared_ptr<ParallelFile> file = open_parallel(path);
    auto reader = std::make_shared<caffe2::serialize::PyTorchStreamReader>(
        std::static_pointer_cast<caffe2::serialize::ReadAdapterInterface>(file));
    if (!reader->hasRecord(kUnifiedPickle) || !reader->hasRecord(kUnifiedTag)) {
      throw std::runtime_error("not a unified copy (no " + std::string(kUnifiedPickle) + " or tag)");
    }
    auto [tag, tag_len] = reader->getRecord(kUnifiedTag);
    if (std::string(static_cast<const char*>(tag.get()), tag_len) != source) {
      *stale = 1;
      return nullptr;
    }
    struct Record {
      std::string key;
      size_t offset;
      size_t size;
    };
    std::vector<Record> records;
    const std::string prefix = ".data/";
    const std::string suffix = ".storage";
    for (const std::string& name : reader->getAllRecords()) {
      if (name.size() <= prefix.size() + suffix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
        continue;
      }
      const size_t offset = reader->getRecordOffset(name);
      const size_t size = reader->getRecordSize(name);
      if (offset > file->len || size > file->len - offset) {
        throw std::runtime_error("record " + name + " lies outside the file");
      }
      records.push_back({name.substr(prefix.size()), offset, size});
    }
    auto context = std::make_shared<torch::jit::DeserializationStorageContext>();
    if (cuda) {
      // The mapping lives as long as a storage over it does (each holds a reference).
      auto mapping = std::make_shared<Block>();
      void* base = mmap(nullptr, file->len, PROT_READ, MAP_SHARED, file->fd, 0);
      if (base == MAP_FAILED) throw std::runtime_error(std::string("cannot map ") + path + ": " + std::strerror(errno));
      mapping->base = static_cast<char*>(base);
      mapping->size = file->len;
      // One registration (a copy must not span two); portable (page-locked for every device's
      // context, as the host tier's blocks are) and read-only: the page cache is not written.
      const std::string why = mapping->pin({0}, /*cudaHostRegisterPortable | cudaHostRegisterReadOnly=*/1 | 8);
      if (!why.empty()) *note = dup_tier(why);
      for (const Record& r : records) {
        auto* owner = new std::shared_ptr<Block>(mapping);
        at::DataPtr data(mapping->base + r.offset, owner,
                         [](void* p) { delete static_cast<std::shared_ptr<Block>*>(p); }, c10::Device(c10::DeviceType::CPU));
        context->addStorage(r.key, c10::Storage(c10::Storage::use_byte_size_t(), r.size, std::move(data),
                                                /*allocator=*/nullptr, /*resizable=*/false));
      }
    } else {
      std::vector<at::Tensor> bytes;
      bytes.reserve(records.size());
      for (const Record& r : records) bytes.push_back(at::empty({static_cast<int64_t>(r.size)}, at::kByte));
      // Small records on several threads; a large one is split across threads by the reader.
      std::atomic<bool> short_read{false};
      parallel(records.size(), kCopyThreads, [&](size_t i) {
        const Record& r = records[i];
        if (r.size > 0 && file->read(r.offset, bytes[i].data_ptr(), r.size, "unified copy") != r.size) short_read = true;
      });
      if (short_read) throw std::runtime_error(std::string("short read from ") + path);
      for (size_t i = 0; i < records.size(); ++i) context->addStorage(records[i].key, bytes[i].storage());
    }
    auto cu = std::make_shared<torch::jit::CompilationUnit>();
    return new torch::jit::Module(torch::jit::import_ir_module(cu, reader, context, device, "0"));
  } catch (const std::exception& e) {
    *err = dup_tier(e.what());
  } catch (...) {
    *err = dup_tier("unknown C++ exception");
  }
  return nullptr;
}
