// mempipe GPU portability layer: the one place that knows whether HIP or CUDA compiles us.
//
// Kernels are written in the HIP dialect (hipStream_t, hipMalloc, ...). Under nvcc the HIP
// names used by mempipe map onto the CUDA runtime; under hipcc they are the real thing. No
// other file carries a platform #ifdef.
//
// Lanes: every kernel reduces over logical groups of kGpuLanes = 32 threads (the canonical
// score order of retriever/relevancy.h is 32 lanes wide). On AMD (64-wide wavefronts) a
// wavefront holds two independent groups; GpuShflXor32 never crosses a group.
//
//   #include "backend/base/gpu_compat.h"
//   float s = GpuShflXor32(partial, 16);   // lane ^ 16 of the same 32-lane group
//   float f = mempipe::gpu::LoadFloat(ptr, i);  // fp32 / fp16 / bf16 storage -> fp32
#ifndef MEMPIPE_BACKEND_BASE_GPU_COMPAT_H_
#define MEMPIPE_BACKEND_BASE_GPU_COMPAT_H_

#include <cstdint>

#if defined(__HIPCC__)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>

using hipError_t = cudaError_t;
using hipStream_t = cudaStream_t;
using hipEvent_t = cudaEvent_t;
inline constexpr cudaError_t hipSuccess = cudaSuccess;
inline constexpr cudaMemcpyKind hipMemcpyHostToDevice = cudaMemcpyHostToDevice;
inline constexpr cudaMemcpyKind hipMemcpyDeviceToHost = cudaMemcpyDeviceToHost;
inline constexpr cudaMemcpyKind hipMemcpyDeviceToDevice = cudaMemcpyDeviceToDevice;
inline constexpr cudaDeviceAttr hipDeviceAttributeMultiprocessorCount =
    cudaDevAttrMultiProcessorCount;
#define hipGetLastError cudaGetLastError
#define hipGetErrorString cudaGetErrorString
#define hipGetDeviceCount cudaGetDeviceCount
#define hipGetDevice cudaGetDevice
#define hipDeviceGetAttribute cudaDeviceGetAttribute
#define hipMalloc cudaMalloc
#define hipFree cudaFree
#define hipMemcpy cudaMemcpy
#define hipMemcpyAsync cudaMemcpyAsync
#define hipMemsetAsync cudaMemsetAsync
#define hipStreamSynchronize cudaStreamSynchronize
#define hipDeviceSynchronize cudaDeviceSynchronize
#define hipSetDevice cudaSetDevice
#endif

inline constexpr int kGpuLanes = 32;

#if defined(__HIPCC__)
template <typename V>
__device__ __forceinline__ V GpuShflXor32(V v, int mask) {
  return __shfl_xor(v, mask, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflUp32(V v, int delta) {
  return __shfl_up(v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflDown32(V v, int delta) {
  return __shfl_down(v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShfl32(V v, int src_lane) {
  return __shfl(v, src_lane, kGpuLanes);
}
// HIP exposes no L2 prefetch for gfx90a/gfx940: a no-op, the plain loads still follow.
__device__ __forceinline__ void GpuPrefetchL2(const void*) {}
// Bit i: lane i of this thread's 32-lane group has `pred` (1-D blocks: the group is the low or
// high half of the 64-wide wavefront).
__device__ __forceinline__ uint32_t GpuBallot32(bool pred) {
  return static_cast<uint32_t>(__ballot(pred) >> (threadIdx.x & 32));
}
__device__ __forceinline__ float GpuHalfBitsToFloat(uint16_t b) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ uint16_t GpuFloatToHalfBits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
#else
template <typename V>
__device__ __forceinline__ V GpuShflXor32(V v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflUp32(V v, int delta) {
  return __shfl_up_sync(0xffffffffu, v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflDown32(V v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShfl32(V v, int src_lane) {
  return __shfl_sync(0xffffffffu, v, src_lane, kGpuLanes);
}
__device__ __forceinline__ uint32_t GpuBallot32(bool pred) {
  return __ballot_sync(0xffffffffu, pred);
}
// Starts moving the 128-byte line holding `ptr` into L2; holds no register.
__device__ __forceinline__ void GpuPrefetchL2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}
__device__ __forceinline__ float GpuHalfBitsToFloat(uint16_t b) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ uint16_t GpuFloatToHalfBits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
#endif

namespace mempipe::gpu {

// Storage types inside kernels: fp32 as float, fp16 and bf16 as raw 16-bit patterns (the
// bf16 conversions are plain bit operations, so no vendor bf16 header is needed).
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(F16 v) { return GpuHalfBitsToFloat(v.bits); }
__device__ __forceinline__ float ToF32(BF16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T FromF32(float f);
template <>
__device__ __forceinline__ float FromF32<float>(float f) {
  return f;
}
template <>
__device__ __forceinline__ F16 FromF32<F16>(float f) {
  return F16{GpuFloatToHalfBits(f)};
}
template <>
__device__ __forceinline__ BF16 FromF32<BF16>(float f) {
  // Round to nearest even, NaN kept quiet (matches mempipe::BFloat16::FromFloat).
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40)};
  return BF16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// Elements of a 16-byte vector, and its conversion to fp32.
template <typename T>
inline constexpr int kVec16 = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ void Unpack16(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec16<T>; ++i) out[i] = ToF32(e[i]);
}

}  // namespace mempipe::gpu

#endif  // MEMPIPE_BACKEND_BASE_GPU_COMPAT_H_
