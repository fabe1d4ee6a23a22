// mempipe core: status propagation macros.
//
// Debian's Abseil (20220623) ships no status_macros.h, so the project defines its own pair once.
//
//   absl::Status Step() {
//     MEMPIPE_RETURN_IF_ERROR(Validate(x));
//     MEMPIPE_ASSIGN_OR_RETURN(auto plan, MakePlan(x));
//     ...
//   }
#ifndef MEMPIPE_CORE_STATUS_MACROS_H_
#define MEMPIPE_CORE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MEMPIPE_STATUS_CONCAT_INNER_(a, b) a##b
#define MEMPIPE_STATUS_CONCAT_(a, b) MEMPIPE_STATUS_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function if `expr` is not OK.
#define MEMPIPE_RETURN_IF_ERROR(expr)                  \
  do {                                                 \
    ::absl::Status mempipe_status_ = (expr);           \
    if (!mempipe_status_.ok()) return mempipe_status_; \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); returns its status on error, else moves the value
// into `lhs` (which may be a declaration such as `auto x`).
#define MEMPIPE_ASSIGN_OR_RETURN(lhs, rexpr) \
  MEMPIPE_ASSIGN_OR_RETURN_IMPL_(MEMPIPE_STATUS_CONCAT_(mempipe_statusor_, __LINE__), lhs, rexpr)

#define MEMPIPE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                   \
  if (!tmp.ok()) return std::move(tmp).status();        \
  lhs = std::move(tmp).value()

#endif  // MEMPIPE_CORE_STATUS_MACROS_H_
