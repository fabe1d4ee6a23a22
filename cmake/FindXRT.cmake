# Finds the XRT host runtime (Debian's libxrt-dev, or a Xilinx install under /opt/xilinx/xrt)
# and defines the imported target XRT::coreutil (libxrt_coreutil with its include directory and
# libuuid). Debian's xrt.pc is wrong and xrt_core must not be linked directly (FPGA-NOTES.md),
# hence this module instead of pkg-config. Installed beside mempipeConfig.cmake so that an
# installed mempipe built with XRT finds it the same way.
#   find_package(XRT)        -> XRT_FOUND, XRT::coreutil
# Debian puts the headers under /usr/include/xrt (xrt/xrt_device.h, experimental/, xclbin.h).
find_path(XRT_INCLUDE_DIR xrt/xrt_device.h PATHS /usr/include/xrt /opt/xilinx/xrt/include)
find_library(XRT_COREUTIL_LIBRARY xrt_coreutil PATHS /usr/lib/x86_64-linux-gnu /opt/xilinx/xrt/lib)
find_library(XRT_UUID_LIBRARY uuid)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(XRT
  REQUIRED_VARS XRT_COREUTIL_LIBRARY XRT_INCLUDE_DIR XRT_UUID_LIBRARY)
mark_as_advanced(XRT_INCLUDE_DIR XRT_COREUTIL_LIBRARY XRT_UUID_LIBRARY)

if(XRT_FOUND AND NOT TARGET XRT::coreutil)
  add_library(XRT::coreutil UNKNOWN IMPORTED)
  set_target_properties(XRT::coreutil PROPERTIES
    IMPORTED_LOCATION "${XRT_COREUTIL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${XRT_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${XRT_UUID_LIBRARY}")
endif()
