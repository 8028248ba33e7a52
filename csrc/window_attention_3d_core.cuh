// Fused 3D window attention (Video Swin WindowAttention3D + SwinTransformerBlock3D padding/shift),
// per-thread math and index arithmetic shared by the CUDA kernels (window_attention_3d.cu) and their
// CPU emulation (window_attention_3d_cpu.cpp).
//
// Everything a CUDA thread computes lives here as a "phase" function taking the thread (or row) index
// explicitly. A kernel is a fixed sequence of phases separated by __syncthreads(); the CPU emulation
// runs the same sequence with loops standing in for the threads of a block, so the CPU tests exercise
// this very code. The one step that differs is the tile product of the tensor-core kernels
// (TileProduct): WMMA in the .cu, plain loops in the emulation, both on the operands that shared
// phases staged. The headers depend on nothing but the C++ standard library and compile with both
// nvcc and the host compiler.
//
// Semantics: the reference of ssltm_kernels.ops.window_attention_3d (window enumeration, padded
// tokens as pad_k/pad_v keys, cyclic shift with Swin's region mask, relative-position bias computed
// from coordinates).
//
// The parts, each including the ones it builds on:
//   geometry.cuh       sizes, call geometry, token coordinates
//   arguments.cuh      kernel arguments (Args, Problem), the finished score of a (query, key) pair
//   cuda_cores.cuh     CUDA-core passes: forward, backward dq and dk/dv
//   tensor_cores.cuh   tensor-core passes (fp16/bf16): forward and backward
//   backward_plan.cuh  the backward's plan, the kernel families, the table and pad-row reductions
#pragma once

#include "window_attention_3d/geometry.cuh"
#include "window_attention_3d/arguments.cuh"
#include "window_attention_3d/cuda_cores.cuh"
#include "window_attention_3d/tensor_cores.cuh"
#include "window_attention_3d/backward_plan.cuh"
