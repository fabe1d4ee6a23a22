# GPU build of mempipe's HIP-dialect sources (*.hip), one source for both vendors:
#   cuda: nvcc compiles them as CUDA for CMAKE_CUDA_ARCHITECTURES (default 80;90) and links.
#   hip:  Debian's hipcc compiles them for MEMPIPE_HIP_ARCHS (default gfx90a;gfx940; clang-15
#         rejects gfx942) into objects only: no AMD GPU runtime is linked or run here.
if(MEMPIPE_GPU_BACKEND STREQUAL "cuda")
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80 90)
  endif()
  enable_language(CUDA)
  # CMake 3.25 does not know nvcc 13's C++20 flag; tell it (newer CMake already knows).
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
elseif(MEMPIPE_GPU_BACKEND STREQUAL "hip")
  find_program(MEMPIPE_HIPCC hipcc REQUIRED)
  set(MEMPIPE_HIP_ARCHS "gfx90a;gfx940" CACHE STRING "AMD offload targets")
endif()

# mempipe_add_gpu_library(mempipe_<short> SOURCES <*.hip> LIBS <targets> [NO_INSTALL])
#   cuda: a library, aliased (and, unless NO_INSTALL, exported) as mempipe::<short>
#         (mempipe_setup_target).
#   hip:  a custom target building the objects only (nothing links them here), so no alias:
#         CMake aliases name libraries and executables only.
function(mempipe_add_gpu_library name)
  cmake_parse_arguments(ARG "NO_INSTALL" "" "SOURCES;LIBS" ${ARGN})
  string(REGEX REPLACE "^mempipe_" "" short_name ${name})
  if(MEMPIPE_GPU_BACKEND STREQUAL "cuda")
    set_source_files_properties(${ARG_SOURCES} PROPERTIES LANGUAGE CUDA)
    add_library(${name} ${ARG_SOURCES})
    target_link_libraries(${name} PUBLIC ${ARG_LIBS} CUDA::cudart)
    if(ARG_NO_INSTALL)
      mempipe_setup_target(${name} ${short_name})
    else()
      mempipe_setup_target(${name} ${short_name} INSTALL)
    endif()
  elseif(MEMPIPE_GPU_BACKEND STREQUAL "hip")
    set(objects)
    set(arch_flags)
    foreach(arch IN LISTS MEMPIPE_HIP_ARCHS)
      list(APPEND arch_flags --offload-arch=${arch})
    endforeach()
    foreach(src IN LISTS ARG_SOURCES)
      get_filename_component(stem ${src} NAME_WE)
      set(obj ${CMAKE_CURRENT_BINARY_DIR}/${stem}.hip.o)
      add_custom_command(
        OUTPUT ${obj}
        COMMAND ${MEMPIPE_HIPCC} -std=c++20 -O3 -fPIC -Wall -Werror ${arch_flags}
                -I${PROJECT_SOURCE_DIR} -c ${CMAKE_CURRENT_SOURCE_DIR}/${src} -o ${obj}
        DEPENDS ${src}
        IMPLICIT_DEPENDS CXX ${CMAKE_CURRENT_SOURCE_DIR}/${src}
        COMMENT "hipcc ${MEMPIPE_HIP_ARCHS}: ${src}"
        VERBATIM)
      list(APPEND objects ${obj})
    endforeach()
    add_custom_target(${name} ALL DEPENDS ${objects})
  endif()
endfunction()
