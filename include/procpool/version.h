/// \file
/// procpool's version, for code that must know which procpool it was compiled against.
///
/// ```cpp
/// #include "procpool/version.h"
/// static_assert(PROCPOOL_VERSION_MAJOR == 0 && PROCPOOL_VERSION_MINOR >= 1);
/// std::puts(PROCPOOL_VERSION_STRING);  // "0.1.0"
/// ```
///
/// These three numbers are the one source of the version: CMakeLists.txt reads them for the CMake
/// package version (procpoolConfigVersion.cmake) and procpool.pc, and CHANGELOG.md's newest entry
/// names the same number. Semantic versioning; before 1.0 a minor release may break the API.

#ifndef PROCPOOL_VERSION_H_
#define PROCPOOL_VERSION_H_

/// The major version: a change breaks the API (before 1.0, so may a minor one).
#define PROCPOOL_VERSION_MAJOR 0
/// The minor version: new API, compatible (from 1.0 on).
#define PROCPOOL_VERSION_MINOR 1
/// The patch version: fixes only.
#define PROCPOOL_VERSION_PATCH 0

/// "MAJOR.MINOR.PATCH", made from the three numbers above so it cannot disagree with them.
#define PROCPOOL_VERSION_STRING                           \
  PROCPOOL_INTERNAL_STRINGIFY(PROCPOOL_VERSION_MAJOR) "." \
  PROCPOOL_INTERNAL_STRINGIFY(PROCPOOL_VERSION_MINOR) "." \
  PROCPOOL_INTERNAL_STRINGIFY(PROCPOOL_VERSION_PATCH)
#define PROCPOOL_INTERNAL_STRINGIFY(x) PROCPOOL_INTERNAL_STRINGIFY_(x)
#define PROCPOOL_INTERNAL_STRINGIFY_(x) #x

#endif  // PROCPOOL_VERSION_H_
