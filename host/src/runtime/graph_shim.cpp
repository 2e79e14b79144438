// CUDA-graph capture and replay of a TorchScript method (libtorch's at::cuda::CUDAGraph, which
// tch does not bind). A graph owns static input and output tensors: a replay reads whatever was
// copied into its inputs and writes its outputs in place. Only functions exported by libtorch's
// CUDA libraries are called (no CUDA runtime calls of our own, so the binary needs no direct
// libcudart dependency). Every function catches C++ exceptions and reports failure.
//
// Built without CUDA headers (TESSERA_NO_CUDA_GRAPHS), every entry point reports "unsupported".
#include <torch/script.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {
char* dup_text(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}
}  // namespace

#ifndef TESSERA_NO_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace {

// libtorch's CUDAGraph, with what a failed capture needs: in torch 2.11 capture_end throws (when
// a call synchronised with the host and invalidated the capture) before it ends the allocator's
// recording into the graph's pool, and reset() releases the pool only after a successful capture.
// Left so, the allocator would go on recording into a pool whose filter points at a freed graph,
// and could no longer free cached memory.
struct Capture : at::cuda::CUDAGraph {
  void abandon() {
    if (capture_dev_ < 0) return;  // capture_begin failed before touching the allocator
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(capture_dev_, mempool_id_);
    } catch (...) {  // already ended
    }
    if (!capture_ended_) {
      try {
        c10::cuda::CUDACachingAllocator::releasePool(capture_dev_, mempool_id_);
      } catch (...) {  // no pool was created
      }
    }
  }
};

struct Graph {
  Capture graph;
  std::vector<at::Tensor> inputs;
  std::vector<at::Tensor> outputs;
  std::string output_names;  // newline-separated, one per output
};

// The method's arguments: tensors [0, list_from) positional, the rest as one List[Tensor]
// (list_from < 0: all positional).
std::vector<c10::IValue> arguments(const std::vector<at::Tensor>& inputs, int list_from) {
  std::vector<c10::IValue> args;
  const size_t split = list_from < 0 ? inputs.size() : static_cast<size_t>(list_from);
  for (size_t i = 0; i < split && i < inputs.size(); ++i) args.emplace_back(inputs[i]);
  if (list_from >= 0) {
    c10::List<at::Tensor> rest;
    for (size_t i = split; i < inputs.size(); ++i) rest.push_back(inputs[i]);
    args.emplace_back(rest);
  }
  return args;
}

// Flattens a method's result into tensors and names (output0.. or a dict's keys).
void flatten(const c10::IValue& v, std::vector<at::Tensor>& out, std::string& names) {
  auto add = [&](const at::Tensor& t, const std::string& name) {
    out.push_back(t);
    names += name;
    names += '\n';
  };
  if (v.isTensor()) {
    add(v.toTensor(), "output" + std::to_string(out.size()));
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector()) add(t, "output" + std::to_string(out.size()));
  } else if (v.isTuple() || v.isList()) {
    const auto items = v.isTuple() ? v.toTupleRef().elements().vec() : v.toListRef().vec();
    for (const c10::IValue& item : items) {
      if (!item.isTensor()) throw std::runtime_error("a graphed method must return tensors only");
      add(item.toTensor(), "output" + std::to_string(out.size()));
    }
  } else if (v.isGenericDict()) {
    for (const auto& kv : v.toGenericDict()) {
      if (!kv.key().isString() || !kv.value().isTensor())
        throw std::runtime_error("a graphed method's dict must map strings to tensors");
      add(kv.value().toTensor(), kv.key().toStringRef());
    }
  } else {
    throw std::runtime_error("a graphed method must return tensors only");
  }
}

int64_t pool_bytes(const at::cuda::MempoolId_t& pool) {
  int64_t total = 0;
  auto snapshot = c10::cuda::CUDACachingAllocator::snapshot(pool, /*include_traces=*/false);
  for (const auto& seg : snapshot.segments) {
    if (seg.owner_private_pool_id == pool) total += static_cast<int64_t>(seg.total_size);
  }
  return total;
}

}  // namespace

// Captures `method` of the module, called on copies of `inputs` (all on one CUDA device), as a
// CUDA graph: `warmup` uncaptured calls first on a side stream (lazy initialisation, cuBLAS
// workspaces, the profiling executor's optimisation), then one captured call. Returns the graph,
// or null with the error in *err (freed with tessera_free). *bytes: the graph's private memory
// pool plus its static inputs.
extern "C" void* tessera_graph_capture(void* module_ptr, const char* method, void** inputs, int n_inputs,
                                       int list_from, int warmup, int64_t* bytes, char** err) {
  *err = nullptr;
  *bytes = 0;
  std::optional<c10::cuda::CUDAStream> restore;  // the caller's stream while the side one is current
  try {
    auto* module = static_cast<torch::jit::Module*>(module_ptr);
    if (n_inputs < 1) throw std::runtime_error("a graphed method needs at least one tensor input");
    auto graph = std::make_unique<Graph>();
    c10::DeviceIndex device = -1;
    for (int i = 0; i < n_inputs; ++i) {
      const at::Tensor& t = *static_cast<at::Tensor*>(inputs[i]);
      if (!t.is_cuda()) throw std::runtime_error("graph inputs must be CUDA tensors");
      if (device < 0) device = t.get_device();
      if (t.get_device() != device) throw std::runtime_error("graph inputs span devices");
      graph->inputs.push_back(t.clone(at::MemoryFormat::Contiguous));
      *bytes += static_cast<int64_t>(t.numel() * t.element_size());
    }
    c10::cuda::set_device(device);
    torch::jit::Method m = module->get_method(method);
    const c10::cuda::CUDAStream previous = c10::cuda::getCurrentCUDAStream(device);
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device);
    c10::cuda::device_synchronize();  // the copies above are done before the side stream reads
    c10::cuda::setCurrentCUDAStream(side);
    restore = previous;
    for (int w = 0; w < warmup; ++w) m(arguments(graph->inputs, list_from));
    c10::cuda::device_synchronize();
    // Thread-local capture: other threads' forwards (other models) go on meanwhile.
    graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    c10::IValue result;
    try {
      result = m(arguments(graph->inputs, list_from));
    } catch (...) {
      try {
        graph->graph.capture_end();
      } catch (...) {
      }
      graph->graph.abandon();
      throw;
    }
    try {
      graph->graph.capture_end();
    } catch (...) {
      graph->graph.abandon();
      throw;
    }
    flatten(result, graph->outputs, graph->output_names);
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(previous);
    restore.reset();
    *bytes += pool_bytes(graph->graph.pool());
    return graph.release();
  } catch (const std::exception& e) {
    if (restore) c10::cuda::setCurrentCUDAStream(*restore);
    *err = dup_text(e.what());
  } catch (...) {
    if (restore) c10::cuda::setCurrentCUDAStream(*restore);
    *err = dup_text("unknown C++ exception");
  }
  return nullptr;
}

// Copies `src` into static input `k` (any device; the copy is queued on the current stream).
extern "C" int tessera_graph_set_input(void* g, int k, void* src) {
  try {
    auto* graph = static_cast<Graph*>(g);
    if (k < 0 || static_cast<size_t>(k) >= graph->inputs.size()) return -1;
    const at::Tensor& t = *static_cast<at::Tensor*>(src);
    if (t.sizes() != graph->inputs[k].sizes() || t.scalar_type() != graph->inputs[k].scalar_type()) return -2;
    graph->inputs[k].copy_(t, /*non_blocking=*/false);
    return 0;
  } catch (...) {
    return -3;
  }
}

// Replays the graph on the current stream.
extern "C" int tessera_graph_replay(void* g) {
  try {
    static_cast<Graph*>(g)->graph.replay();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Copies each output j into static input j + offset, except where they are one tensor already
// (a loop step's unchanged state). For a loop: one step's outputs are the next step's inputs
// (shapes and aliasing checked once, at capture: tessera_graph_check_feedback).
extern "C" int tessera_graph_outputs_to_inputs(void* g, int offset) {
  try {
    auto* graph = static_cast<Graph*>(g);
    if (offset < 0 || graph->outputs.size() + offset != graph->inputs.size()) return -1;
    for (size_t j = 0; j < graph->outputs.size(); ++j) {
      at::Tensor& dst = graph->inputs[j + offset];
      const at::Tensor& src = graph->outputs[j];
      if (!src.is_same(dst)) dst.copy_(src);
    }
    return 0;
  } catch (...) {
    return -3;
  }
}

// Whether a loop step's graph can feed its outputs back into its inputs from `offset` on: as many
// outputs as inputs there, each of its input's shape and dtype, and none sharing memory with
// another input (copied back one after the other, it would overwrite what a later copy reads).
// 0 when it can; otherwise -1, with the reason in *err (freed with tessera_free).
extern "C" int tessera_graph_check_feedback(void* g, int offset, char** err) {
  *err = nullptr;
  try {
    auto* graph = static_cast<Graph*>(g);
    const auto& in = graph->inputs;
    const auto& out = graph->outputs;
    if (offset < 0 || out.size() + offset != in.size())
      throw std::runtime_error("step returns " + std::to_string(out.size()) + " tensors for a state of " +
                               std::to_string(in.size() - std::min<size_t>(in.size(), offset)));
    for (size_t j = 0; j < out.size(); ++j) {
      if (out[j].sizes() != in[j + offset].sizes() || out[j].scalar_type() != in[j + offset].scalar_type())
        throw std::runtime_error("step output " + std::to_string(j) + " changes its state entry's shape or dtype");
      for (size_t k = 0; k < in.size(); ++k) {
        if (k != j + static_cast<size_t>(offset) && out[j].is_alias_of(in[k]))
          throw std::runtime_error("step output " + std::to_string(j) + " shares memory with another input");
      }
    }
    return 0;
  } catch (const std::exception& e) {
    *err = dup_text(e.what());
  } catch (...) {
    *err = dup_text("unknown C++ exception");
  }
  return -1;
}

// A new reference to static output j (an at::Tensor* the caller owns, tch's tensor handle), or
// static input j when `input` is set; null when out of range.
extern "C" void* tessera_graph_tensor(void* g, int j, int input) {
  try {
    auto* graph = static_cast<Graph*>(g);
    auto& list = input ? graph->inputs : graph->outputs;
    if (j < 0 || static_cast<size_t>(j) >= list.size()) return nullptr;
    return new at::Tensor(list[j]);
  } catch (...) {
    return nullptr;
  }
}

extern "C" int tessera_graph_counts(void* g, int* inputs, int* outputs) {
  auto* graph = static_cast<Graph*>(g);
  *inputs = static_cast<int>(graph->inputs.size());
  *outputs = static_cast<int>(graph->outputs.size());
  return 0;
}

// Newline-separated output names (freed with tessera_free).
extern "C" char* tessera_graph_output_names(void* g) {
  return dup_text(static_cast<Graph*>(g)->output_names);
}

// Frees the graph, its static tensors and its private memory pool (returned to the caching
// allocator, which hands it to the driver at the next empty_cache).
extern "C" void tessera_graph_free(void* g) { delete static_cast<Graph*>(g); }

#else  // TESSERA_NO_CUDA_GRAPHS

extern "C" void* tessera_graph_capture(void*, const char*, void**, int, int, int, int64_t* bytes, char** err) {
  *bytes = 0;
  *err = dup_text("this build has no CUDA graph support (libtorch without CUDA headers)");
  return nullptr;
}
extern "C" int tessera_graph_set_input(void*, int, void*) { return -1; }
extern "C" int tessera_graph_replay(void*) { return -1; }
extern "C" int tessera_graph_outputs_to_inputs(void*, int) { return -1; }
extern "C" int tessera_graph_check_feedback(void*, int, char** err) {
  *err = dup_text("unsupported");
  return -1;
}
extern "C" void* tessera_graph_tensor(void*, int, int) { return nullptr; }
extern "C" int tessera_graph_counts(void*, int* inputs, int* outputs) {
  *inputs = 0;
  *outputs = 0;
  return -1;
}
extern "C" char* tessera_graph_output_names(void*) { return dup_text(""); }
extern "C" void tessera_graph_free(void*) {}

#endif

// Whether the module has a method `name` (1), not (0), or the check failed (-1).
extern "C" int tessera_module_has_method(void* module_ptr, const char* name) {
  try {
    return static_cast<torch::jit::Module*>(module_ptr)->find_method(name).has_value() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Gives the shape arithmetic of a module loaded onto a GPU its 0-dim constants back on the CPU:
// loading on the device moved them there, so `size // heads` (diffusers' attention) lands on the
// GPU and reading it as an int synchronises with the host at every call, which no CUDA graph can
// capture and which stalls the launch queue uncaptured. Only a use whose result is only read back
// as a number (aten::Int/Float/ScalarImplicit, directly or through more arithmetic) gets a fresh
// CPU copy of the constant; the constant itself, which other operations may share, stays. Call before the module's first
// run (executors copy their graphs then). Returns how many uses changed, or -1.
#include <functional>
namespace {
bool reads_a_number(const torch::jit::Node* node) {
  using namespace torch::jit;
  const auto kind = node->kind();
  return kind == aten::Int || kind == aten::Float || kind == aten::ScalarImplicit;
}

bool is_arithmetic(const torch::jit::Node* node) {
  using namespace torch::jit;
  const auto kind = node->kind();
  return node->outputs().size() == 1 &&
         (kind == aten::add || kind == aten::sub || kind == aten::mul || kind == aten::floor_divide ||
          kind == aten::div || kind == aten::remainder);
}

// Whether every use of `v` reads it back as a number, directly or through more arithmetic.
bool read_back_as_number(const torch::jit::Value* v, int depth) {
  if (depth > 8 || v->uses().empty()) return false;
  for (const torch::jit::Use& use : v->uses()) {
    if (reads_a_number(use.user)) continue;
    if (is_arithmetic(use.user) && read_back_as_number(use.user->output(), depth + 1)) continue;
    return false;
  }
  return true;
}
}  // namespace

extern "C" int64_t tessera_module_shape_constants_to_host(void* module_ptr) {
  using namespace torch::jit;
  try {
    auto* module = static_cast<Module*>(module_ptr);
    int64_t moved = 0;
    std::function<void(Block*)> visit = [&](Block* block) {
      for (Node* node : block->nodes()) {
        for (Block* sub : node->blocks()) visit(sub);
        if (node->kind() != prim::Constant || !node->hasAttribute(attr::value) ||
            node->kindOf(attr::value) != AttributeKind::t)
          continue;
        const at::Tensor value = node->t(attr::value);
        if (value.dim() != 0 || value.is_cpu()) continue;
        const std::vector<Use> uses = node->output()->uses();
        for (const Use& use : uses) {
          const bool host_only =
              reads_a_number(use.user) || (is_arithmetic(use.user) && read_back_as_number(use.user->output(), 0));
          if (!host_only) continue;
          torch::jit::Graph* graph = block->owningGraph();
          WithInsertPoint guard(use.user);
          use.user->replaceInput(use.offset, graph->insertConstant(value.cpu()));
          ++moved;
        }
      }
    };
    for (const Module& m : module->modules()) {
      for (const Method& method : m.get_methods()) {
        if (auto* gf = dynamic_cast<GraphFunction*>(&method.function())) visit(gf->graph()->block());
      }
    }
    return moved;
  } catch (...) {
    return -1;
  }
}
