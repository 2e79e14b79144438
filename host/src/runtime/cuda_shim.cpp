// CUDA memory statistics and cache control through libtorch's device-generic allocator
// interface (c10::DeviceAllocator), which tch does not bind. Needs no CUDA headers; every
// function answers -1 instead of throwing when CUDA is absent or not initialised.
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>

static c10::DeviceAllocator* cuda_allocator() {
  try {
    auto* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    return (a != nullptr && a->initialized()) ? a : nullptr;
  } catch (...) {
    return nullptr;
  }
}

static int64_t stat_current(int device, bool reserved) {
  try {
    auto* a = cuda_allocator();
    if (a == nullptr) return -1;
    auto stats = a->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    return reserved ? stats.reserved_bytes[agg].current : stats.allocated_bytes[agg].current;
  } catch (...) {
    return -1;
  }
}

extern "C" int64_t tessera_cuda_allocated_bytes(int device) { return stat_current(device, false); }
extern "C" int64_t tessera_cuda_reserved_bytes(int device) { return stat_current(device, true); }

extern "C" int tessera_cuda_empty_cache() {
  try {
    auto* a = cuda_allocator();
    if (a == nullptr) return -1;
    a->emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}

extern "C" int tessera_cuda_mem_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  try {
    auto* a = cuda_allocator();
    if (a == nullptr) return -1;
    auto info = a->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free_bytes = info.first;
    *total_bytes = info.second;
    return 0;
  } catch (...) {
    return -1;
  }
}

// libtorch's global math settings, as bits, for the start-up log: 1 cuDNN may use TF32,
// 2 cuDNN benchmark mode, 4 cuDNN deterministic, 8 cuDNN enabled, 16 cuBLAS may use TF32.
#include <ATen/Context.h>
extern "C" int tessera_math_flags() {
  try {
    auto& ctx = at::globalContext();
    return (ctx.allowTF32CuDNN() ? 1 : 0) | (ctx.benchmarkCuDNN() ? 2 : 0) |
           (ctx.deterministicCuDNN() ? 4 : 0) | (ctx.userEnabledCuDNN() ? 8 : 0) |
           (ctx.allowTF32CuBLAS() ? 16 : 0);
  } catch (...) {
    return -1;
  }
}
